"""demix's pipeline, cut along the data path. Each layer imports only the layers below it
(tests/test_layout.py checks it, with no import cycles and our own imports at module top):

    core      ``stems`` (stem names, the silence rule), ``errors`` (StagedError), ``markdown`` (tables)
    io/       storage (URIs, atomic and create-once outputs), decode, conform (channels, rate), encode;
              ``read_slice``, the one way to read part of a file; ``pages`` and ``plots`` (static
              HTML and matplotlib figures for the run and evaluation reports)   imports: core
    models    (the top-level ``models/`` folder, ``demix.models``) networks, registry, weights
                                                                         imports: core, io
    engine/   overlap-add, the one-track job, frame features, presence detectors
                                                                         imports: core, io, models
    data/     MUSDB-layout reader, training sampler, the synthetic song generator (``synth/``)
                                                                         imports: core, io
    batch/    catalog, manifests, run spec, Ray workers (the only ray importer), remix, exports, run reports
                                                                         imports: core, io, models, engine
    learn/    training loop, checkpoints, BSS Eval, oracles, evaluation reports, presence training/scoring
                                                                         imports: core, io, models, engine, data
    flows     (the top-level ``flows/`` folder) Prefect flows, each a table of contents over ``batch``
    cli/      the ``demix`` command, one module per command group       imports: everything

Only ``cli`` and the flows print, exit or set states; everything below raises.
"""
