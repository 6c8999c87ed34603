"""The remix-dataset builder (Demucs' "unlabeled data remixing"): new, strongly labelled training
examples from a separated catalog.

For a track where stem ``S`` is absent (the presence detector says so), every other stem of that
track (the *recipient*) is kept, and ``S`` is taken from another track where it is present (the
*donor*). The example's stems are the recipient's separated stems (absent ones silent), the donor's
``S``, each with a random gain; the mixture is their exact sum, so the target for ``S`` is exactly
what was added, and the recipient's own mixture held no ``S`` to leak.

Planning (:func:`plan_remixes`) is a pure function of the committed run's manifests and the
:class:`RemixConfig`: example ``k`` draws from ``numpy.random.default_rng([seed, k])``, so the same
run and seed give the same examples, and asking for more examples later keeps the first ones. Each
example's id starts with a digest of the plan's inputs, so a rerun recognises committed examples.

Building one example (:func:`build_example`, run on the Ray layer by the flow):

- the recipient's stems are read over the example's window (the whole track, or ``seconds`` from a
  random offset);
- each donor candidate's tempo is estimated (onset autocorrelation), and the candidate whose tempo is
  closest to the recipient's (octave errors folded) is used: tempo-aware choice, no time stretching;
- the donor's ``S`` comes from its longest active segment, cut to a whole number of bars (4 beats at
  the donor's tempo) and looped with 10 ms crossfades to the example's length;
- gains are drawn per stem within ``gain_db``; if the mixture would peak above ``peak`` every stem
  is scaled by the same factor (recorded in the gains);
- stems and mixture are written as 32-bit float WAV in MUSDB layout,
  ``OUT/<split>/<example_id>/{mixture,<stems>}.wav``, all staged and committed together.

Lineage lands in ``OUT/manifests/remixes.parquet`` (:data:`REMIXES_SCHEMA`): per example the
recipient, the target stem, the donor, the seed, and per stem its source track, source URI, offset,
loop length, gain and role.

Weak examples (``demix remix --labelled DATASET``, :mod:`demix.pipeline.batch.remix.weak`) use no separator
estimate as a target: the recipient's ORIGINAL excerpt where ``S`` is silent plus a labelled song's true
``S``; only ``S`` and the sum of the other stems (``rest.wav``) are known, which ``weak.json`` says.

The code is in three modules, re-exported here: :mod:`demix.pipeline.batch.remix.plan` (schema, config,
recipes, ids, the committed view) and :mod:`demix.pipeline.batch.remix.build` (tempo, looping, one example),
:mod:`demix.pipeline.batch.remix.weak` (the weak kind's planning; its build is in ``build``).
"""

from demix.pipeline.batch.remix.build import build_example, estimate_tempo, example_uri, loop_to_length, tempo_distance
from demix.pipeline.batch.remix.plan import (
    REMIXES_SCHEMA, STEM_LINEAGE, TRUTH_MIN_ACTIVE_S, WEAK_REST, Recipe, RemixConfig, RemixError, StemSource,
    commit_examples, committed_examples, consolidated, is_weak, plan_remixes, shard_recipes, stem_sources, truth_of,
    write_truth,
)
from demix.pipeline.batch.remix.weak import DEFAULT_WEAK_SECONDS, SILENCE_MARGIN_S, labelled_donors, plan_weak, silent_windows

__all__ = [
    "DEFAULT_WEAK_SECONDS", "REMIXES_SCHEMA", "SILENCE_MARGIN_S", "STEM_LINEAGE", "TRUTH_MIN_ACTIVE_S", "WEAK_REST",
    "Recipe", "RemixConfig", "RemixError", "StemSource", "build_example", "commit_examples", "committed_examples",
    "consolidated", "estimate_tempo", "example_uri", "is_weak", "labelled_donors", "loop_to_length", "plan_remixes",
    "plan_weak", "shard_recipes", "silent_windows", "stem_sources", "tempo_distance", "truth_of", "write_truth",
]
