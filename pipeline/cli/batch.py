"""``demix run``, ``demix remix`` and ``demix export``: the catalog commands (Prefect flows on Ray).

The flows are imported when their command runs, not at the top: importing Prefect takes seconds, and
every other command (and ``--help``) would pay for it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from tqdm import tqdm

from demix.models.base import ModelLoadError
from demix.models.registry import get_entry, model_options
from demix.pipeline.batch import preflight, report as reports
from demix.pipeline.batch.catalog import CatalogError
from demix.pipeline.batch.export import ClipRule, ExportError, export_lyrics, export_transcription
from demix.pipeline.batch.remix import RemixConfig, RemixError
from demix.pipeline.cli.common import add_no_progress, fail, progress
from demix.pipeline.cli.console import EXIT_INTERRUPTED, Chatter, Interrupts, Status, quiet_libraries
from demix.pipeline.engine import DETECTORS, SeparationSettings, plan_stems, settings_kwargs
from demix.pipeline.io import Encoding, StorageError, check_output_root, encoding_kwargs, output_root


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    _add_run(sub, common)
    _add_remix(sub)
    _add_export(sub)


def _add_run(sub, common: argparse.ArgumentParser) -> None:
    run = sub.add_parser(
        "run",
        parents=[common],
        help="separate a whole catalog with the Prefect flow on Ray (exactly once, resumable)",
        description=(
            "Run the separate-catalog flow: plan -> execute on a Ray actor pool -> commit per shard -> report. "
            "Writes OUT/stems/<track_id>/<settings_hash>/<attempt>/<stem>.<ext> (a new folder per try; never "
            "overwritten; `demix gc` removes old ones) and OUT/manifests/{tracks,stems,failures}.parquet. "
            "A rerun skips tracks already committed with the same model and settings. Storage credentials and "
            "endpoints come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ~/.aws/...). "
            "Exit status 1 when any track failed."
        ),
    )
    run.add_argument("catalog", metavar="CATALOG", help="folder, glob, fsspec URI, or CSV/Parquet file with a 'uri' column (optional 'track_id')")
    run.add_argument("-o", "--out", required=True, metavar="OUT_URI", help="output root: a local path or s3://bucket/prefix")
    run.add_argument(
        "--workers", type=int,
        help="without model actors: host workers each holding the model (default: 1); with GPUs: at most this many model actors",
    )
    run.add_argument(
        "--model-actors", type=int, metavar="N",
        help="run the model in N model actors fed full --batch-size batches by every host worker (default: one per GPU; "
        "none on a cluster without GPUs, where each host worker holds the model)",
    )
    run.add_argument(
        "--host-workers", type=int, metavar="N",
        help="with model actors: host workers reading, assembling and writing tracks (default: the cluster's CPUs "
        "minus those of the model actors)",
    )
    run.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local instance)")
    run.add_argument("--shard-size", type=int, default=16, help="tracks per commit (default: 16)")
    run.add_argument("--force", action="store_true", help="redo tracks already committed")
    run.add_argument(
        "--dry-run", action="store_true",
        help="say what would be done (tracks in the catalog, already committed, to do, shards) and exit; starts neither Prefect nor Ray",
    )
    run.add_argument(
        "--presence", choices=DETECTORS, default="combined",
        help="stem presence detector filling present/presence_score/active_segments (default: combined = the shipped "
        "'presence' classifier and the energy detector must agree; classifier or energy alone; none: leave the columns null)",
    )
    add_output_flags(run)
    run.set_defaults(handler=cmd_run)


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """What ``run`` and ``remix`` show: ``-v``, ``--quiet``, ``--json``."""
    g = parser.add_argument_group("output")
    g.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="show Prefect's and Ray's own log lines (hidden by default)",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no status line, no progress: errors and the summary line only")
    g.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout (nothing else goes to stdout)")


INTERRUPT_NOTICE = (
    "Ctrl-C: stopping; no new work is taken, unfinished shards are abandoned (committed ones are kept). "
    "Ctrl-C again to abort at once."
)


def _check_run(args: argparse.Namespace) -> None:
    """Everything cheap to validate before Prefect and Ray start (raises ValueError or ModelLoadError)."""
    Encoding(**encoding_kwargs(args))
    SeparationSettings(**settings_kwargs(args))
    entry = get_entry(args.model)
    if entry.kind != "separator":
        raise ValueError(f"{args.model!r} is a {entry.kind} model, not a separation model")
    plan_stems(entry.sources, stems=args.stems, two_stems=args.two_stems)
    if args.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device for `demix run` is auto, cpu or cuda (one actor per GPU). Found: {args.device}")
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1. Found: {args.shard_size}")
    for flag in ("workers", "model_actors", "host_workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1. Found: {getattr(args, flag)}")
    check_output_root(args.out)


def _run_params(args: argparse.Namespace) -> dict:
    """The catalog flow's parameters from the command line."""
    return dict(
        catalog=args.catalog, out=args.out, model=args.model, weights=args.weights,
        weights_sha256=args.weights_sha256, trust_weights=args.trust_weights, model_options=model_options(args) or None,
        settings=settings_kwargs(args), encoding=encoding_kwargs(args), stems=args.stems,
        two_stems=args.two_stems, workers_count=args.workers, model_actors=args.model_actors,
        host_workers=args.host_workers, device=args.device, ray_address=args.ray_address, shard_size=args.shard_size, force=args.force,
        progress=not (args.no_progress or args.quiet), presence=args.presence, verbose=_verbose(args),
    )


def _verbose(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "verbose", False))


def _preflight(args: argparse.Namespace) -> preflight.Pending:
    """What the run has to do, from the catalog and the manifests alone (before Prefect or Ray)."""
    p = _run_params(args)
    spec = preflight.run_spec(
        output_root(args.out), args.model, weights=p["weights"], weights_sha256=p["weights_sha256"],
        trust_weights=p["trust_weights"],
        model_options=p["model_options"], settings=p["settings"], encoding=p["encoding"], stems=p["stems"],
        two_stems=p["two_stems"], presence=p["presence"],
    )
    return preflight.pending_tracks(args.catalog, spec, args.force)


def cmd_run(args: argparse.Namespace) -> int:
    quiet_libraries(_verbose(args))
    status = Status(enabled=not args.quiet)
    try:  # before Prefect and Ray: nothing to shut down, so Ctrl-C is a plain KeyboardInterrupt here
        _check_run(args)
        status("reading the catalog and the committed manifests")
        todo = _preflight(args)
    except (ValueError, ModelLoadError, StorageError) as err:  # CatalogError is a ValueError
        return fail(err)
    except KeyboardInterrupt:
        print("\ndemix: interrupted before anything was run", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        status(None)
    if args.weights:  # the preflight loaded (fetched, verified) them before reading the catalog
        print(f"demix: weights {args.weights} verified by: {todo.weights_verified_by}", file=sys.stderr)
    if args.dry_run:
        return _print_dry_run(args, todo)
    if not todo.pending:  # a no-op rerun: the committed summary, without Prefect or Ray
        return _finish_run(args, preflight.committed_summary(output_root(args.out), len(todo.tracks), todo.skipped))
    with Chatter(_verbose(args), "run"), Interrupts(INTERRUPT_NOTICE) as interrupts:
        status("starting Prefect")
        from demix.flows.separate_catalog import separate_catalog  # lazy: Prefect takes seconds to import

        try:
            with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
                summary = separate_catalog(**_run_params(args), should_stop=interrupts.should_stop, status=status)
        except (CatalogError, StorageError, ModelLoadError) as err:
            return fail(err)
        except Exception as err:  # noqa: BLE001 - the flow's own failure (Ray, Prefect): one line, not a traceback
            return fail(f"the run failed: {type(err).__name__}: {err} (rerun to resume; committed tracks are kept)")
        finally:
            status(None)
        return _finish_run(args, summary)


def _print_dry_run(args: argparse.Namespace, todo: preflight.Pending) -> int:
    shards = -(-len(todo.pending) // args.shard_size)
    facts = {
        "dry_run": True, "catalog_tracks": len(todo.tracks), "already_committed": todo.committed,
        "to_do": len(todo.pending), "shards": shards, "shard_size": args.shard_size, "settings_hash": todo.settings_hash,
    }
    if args.json:
        print(json.dumps(facts))
    else:
        print(
            f"demix run --dry-run: {facts['catalog_tracks']} tracks in catalog, {facts['already_committed']} already "
            f"committed with these settings{' (redone: --force)' if args.force else ''}, {facts['to_do']} to do in "
            f"{shards} shard(s) of up to {args.shard_size}; nothing was run"
        )
    return 0


def _finish_run(args: argparse.Namespace, summary: dict) -> int:
    """Print the summary (text, one line with ``--quiet``, or JSON) and return the exit status."""
    out = output_root(args.out)
    if args.json:
        print(json.dumps({**summary, "out": out}, default=str))
    else:
        print_run_summary(summary, out, brief=args.quiet)
    if summary.get("interrupted"):
        return EXIT_INTERRUPTED
    return 1 if summary["failed_now"] else 0


def print_run_summary(summary: dict, out: str, brief: bool = False) -> None:
    """One screen: counts, speed, where things are, and each failure on one line (``brief``: the
    first line and the failures)."""
    stopped = " (interrupted: rerun the same command to resume)" if summary.get("interrupted") else ""
    print(
        f"demix run: {summary['catalog_tracks']} tracks in catalog, {summary['skipped_already_committed']} already done, "
        f"{summary['ok_now']} separated, {summary['failed_now']} failed{stopped}"
    )
    if brief:
        for f in summary["failures"]:
            print(f"  failed [{f['stage']}] {f['source_uri']}: {f['error_type']}: {f['message'][:160]}")
        return
    print(
        f"  audio: {summary['audio_seconds_now']:.1f} s in {summary['wall_seconds_now']:.1f} s "
        f"({summary['realtime_factor_now']:.2f}x real time); committed in total: {summary['committed_ok_total']} ok, "
        f"{summary['committed_failed_total']} failed, {summary['hours_of_audio_total']:.3f} h of audio"
    )
    if summary.get("model_stage"):
        print(f"  model stage: {reports.model_stage_line(summary['model_stage'])}")
    if summary.get("presence"):
        judged = ", ".join(f"{stem} {c['present']}/{c['tracks']}" for stem, c in summary["presence"].items())
        print(f"  stems present (committed): {judged}")
    print(f"  stem audio: {out.rstrip('/')}/stems/<track_id>/<settings_hash>/<attempt>/<stem>.<ext> (the stems manifest names each file)")
    for kind, uri in summary["manifests"].items():
        print(f"  {kind + ' manifest:':<18} {uri}")
    if summary.get("report"):
        print(f"  {'report:':<18} {summary['report']}")
    for f in summary["failures"]:
        print(f"  failed [{f['stage']}] {f['source_uri']}: {f['error_type']}: {f['message'][:160]}")


def _add_remix(sub) -> None:
    rx = sub.add_parser(
        "remix",
        help="build a remixed training set from a committed run (absent stems filled from other tracks)",
        description=(
            "Demucs-style unlabeled-data remixing. For a track where stem S is absent (per the run's presence "
            "columns), keep its other stems and add S from a track where it is present (tempo-closest of a few "
            "candidates, its longest active part looped in whole bars), with random gains; the mixture is the exact "
            "sum of the stems. Writes a MUSDB-layout dataset OUT/<split>/<example>/{mixture,vocals,drums,bass,other}.wav "
            "(32-bit float WAV; `demix train OUT/train` reads it), OUT/<split>/truth.json and "
            "OUT/manifests/remixes.parquet with lineage. Deterministic per seed; exactly once and resumable "
            "(rerun the same command); runs as a Prefect flow on Ray. "
            "With --labelled DATASET the examples are weakly supervised instead: the run's ORIGINAL audio over a "
            "window where S is silent (per presence segments) plus the TRUE S of a DATASET song; each example holds "
            "mixture.wav, <S>.wav (known), rest.wav (the known sum of the other stems) and weak.json; train on them "
            "with `demix train LABELLED --weak-data OUT/train`."
        ),
    )
    rx.add_argument("run", metavar="RUN_URI", help="output root of a committed `demix run` (with presence)")
    rx.add_argument("-o", "--out", required=True, metavar="OUT_URI", help="dataset root: a local path or s3://bucket/prefix")
    rx.add_argument("--examples", type=int, required=True, help="number of examples")
    rx.add_argument("--seed", type=int, default=0, help="(default: 0)")
    rx.add_argument("--seconds", type=float, help="example length (default: the recipient track's whole length; 6 with --labelled)")
    rx.add_argument(
        "--labelled", metavar="DATASET",
        help="weak examples: donors are the true stems of this local MUSDB-layout folder (see above)",
    )
    rx.add_argument("--gain-db", type=float, nargs=2, default=(-3.0, 3.0), metavar=("LOW", "HIGH"), help="random gain range per stem (default: -3 3)")
    rx.add_argument("--split", default="train", help="dataset folder name (default: train)")
    rx.add_argument("--workers", type=int, help="CPU actors (default: 1)")
    rx.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local instance)")
    rx.add_argument("--shard-size", type=int, default=32, help="examples per commit (default: 32)")
    add_no_progress(rx)
    add_output_flags(rx)
    rx.set_defaults(handler=cmd_remix)


def cmd_remix(args: argparse.Namespace) -> int:
    quiet_libraries(_verbose(args))
    try:
        RemixConfig(examples=args.examples, seed=args.seed, seconds=args.seconds, gain_db=tuple(args.gain_db), split=args.split)
        if args.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1. Found: {args.shard_size}")
        check_output_root(args.out)
        if args.labelled is not None and not Path(args.labelled).expanduser().is_dir():
            raise ValueError(f"--labelled: dataset folder not found: {args.labelled}")
    except (ValueError, StorageError) as err:
        return fail(err)
    status = Status(enabled=not args.quiet)
    with Chatter(_verbose(args), "remix"), Interrupts(INTERRUPT_NOTICE) as interrupts:
        status("starting Prefect")
        from demix.flows.build_remix_dataset import build_remix_dataset  # lazy: Prefect takes seconds to import

        try:
            with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
                summary = build_remix_dataset(
                    run_uri=args.run, out=args.out, examples=args.examples, seed=args.seed, seconds=args.seconds,
                    gain_db=tuple(args.gain_db), split=args.split, workers_count=args.workers,
                    ray_address=args.ray_address, shard_size=args.shard_size,
                    progress=not (args.no_progress or args.quiet), should_stop=interrupts.should_stop, status=status,
                    verbose=_verbose(args), labelled=args.labelled,
                )
        except (RemixError, StorageError) as err:
            return fail(err)
        except Exception as err:  # noqa: BLE001 - the flow's own failure: one line, not a traceback
            return fail(f"the remix run failed: {type(err).__name__}: {err} (rerun to resume; committed examples are kept)")
        finally:
            status(None)
    if args.json:
        print(json.dumps({**summary, "out": output_root(args.out)}, default=str))
    else:
        print_remix_summary(summary, brief=args.quiet, labelled=args.labelled)
    return EXIT_INTERRUPTED if summary.get("interrupted") else (1 if summary["failed_now"] else 0)


def print_remix_summary(summary: dict, brief: bool = False, labelled: str | None = None) -> None:
    stopped = " (interrupted: rerun the same command to resume)" if summary.get("interrupted") else ""
    print(
        f"demix remix: {summary['examples_planned']} examples planned, {summary['skipped_already_committed']} already done, "
        f"{summary['built_now']} built, {summary['failed_now']} failed; {summary['committed_total']} committed "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(summary['by_target_stem'].items()))}){stopped}"
    )
    if brief:
        return
    hint = f"demix train {labelled} --weak-data {summary['dataset']} ..." if labelled else f"demix train {summary['dataset']} ..."
    print(f"  dataset: {summary['dataset']}  ({hint})")
    for kind, uri in summary["manifests"].items():
        print(f"  {kind + ':':<10} {uri}")
    for f in summary["failures"]:
        print(f"  failed [{f['stage']}] {f['track_id']}: {f['error_type']}: {f['message'][:160]}")


def _add_export(sub) -> None:
    ex = sub.add_parser(
        "export",
        help="export a committed run for lyrics or transcription jobs (Parquet manifests)",
        description=(
            "--task lyrics: cut every present vocal stem into clips along its active segments (3-30 s; neighbours "
            "within 1 s joined, long parts split) written as FLAC under OUT/clips/<track_id>/, listed in "
            "OUT/lyrics.parquet (clip_uri, track_id, source_uri, stem, stem_uri, start_s, end_s, ...). "
            "--task transcription: OUT/transcription.parquet, one row per present bass/other/vocals stem with its "
            "URI and active segments. Plain Parquet for pandas, DuckDB and Hugging Face datasets."
        ),
    )
    ex.add_argument("--task", required=True, choices=("lyrics", "transcription"))
    ex.add_argument("run", metavar="RUN_URI", help="output root of a committed `demix run`")
    ex.add_argument("-o", "--out", required=True, metavar="OUT_URI")
    ex.add_argument("--min-seconds", type=float, default=3.0, help="lyrics: shortest clip (default: 3)")
    ex.add_argument("--max-seconds", type=float, default=30.0, help="lyrics: longest clip (default: 30)")
    add_no_progress(ex)
    ex.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    try:
        if args.task == "lyrics":
            rule = ClipRule(min_s=args.min_seconds, max_s=args.max_seconds)
            with tqdm(unit="stem", disable=args.no_progress) as bar:
                uri, n = export_lyrics(args.run, args.out, rule=rule, progress=progress(bar))
            print(f"demix export: {n} vocal clips; manifest {uri}")
        else:
            uri, n = export_transcription(args.run, args.out)
            print(f"demix export: {n} present bass/other/vocals stems; manifest {uri}")
    except (ExportError, StorageError, ValueError) as err:
        return fail(err)
    return 0
