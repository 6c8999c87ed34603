"""The ``demix`` command line. The only place (with the flows) that prints or exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import PurePosixPath

EPILOG = """examples:
  demix separate song.mp3 "My Album/" s3://bucket/in/*.flac -o stems/
  demix separate song.wav -o out/ --two-stems vocals --format flac --bit-depth 24
  demix separate song.wav -o out/ --model hdemucs-musdb --weights /models/hdemucs_high_trained.pt
  demix run catalog.csv -o s3://bucket/stems --workers 2
  demix remix runs/catalog -o remixed/ --examples 500 --seed 0
  demix export --task lyrics runs/catalog -o exports/lyrics
  demix evaluate --presence synth-heldout/ -o reports/presence
  demix models
"""


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"demix: --device {name} asked for, but torch sees no CUDA device")
    return name


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    from demix.models.registry import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="demix",
        description="Separate music catalogs into stems (vocals, drums, bass, other).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and separation")
    g.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"registered model (default: {DEFAULT_MODEL}; `demix models` lists them)")
    g.add_argument("--weights", metavar="PATH_OR_URI", help="weights file overriding the registry's (air-gapped clusters)")
    g.add_argument("--weights-sha256", metavar="HEX", help="expected sha256 of --weights")
    stems = g.add_mutually_exclusive_group()
    stems.add_argument("--two-stems", metavar="STEM", help="write STEM and no_STEM (the sum of the others), e.g. vocals")
    stems.add_argument("--stems", type=_comma_list, metavar="A,B", help="write only these stems")
    g.add_argument("--format", choices=("wav", "flac", "mp3"), default="wav", help="output format (default: wav)")
    g.add_argument("--bit-depth", choices=("16", "24", "32f"), default="16", help="PCM depth for wav/flac; 32f = float (wav only; default: 16)")
    g.add_argument("--clip-mode", choices=("rescale", "clamp", "none"), default="rescale", help="how to avoid clipping (default: rescale)")
    g.add_argument("--segment", type=float, metavar="SECONDS", help="chunk length (default: the model's)")
    g.add_argument("--overlap", type=float, default=0.25, help="chunk overlap fraction in [0, 1) (default: 0.25)")
    g.add_argument("--shifts", type=int, default=0, help="random-shift passes to average (default: 0)")
    g.add_argument("--batch-size", type=int, default=1, help="chunks per forward call (default: 1)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="compute dtype (default: float32)")
    g.add_argument("--phase", choices=("mixture", "griffinlim"), help="U-Net only: mixture phase or Griffin-Lim reconstruction")
    g.add_argument("--seed", type=int, default=0, help="seed for --shifts (default: 0)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    sep = sub.add_parser(
        "separate",
        parents=[common],
        help="separate audio files, folders or URIs into stems",
        description=(
            "Separate each INPUT into stems written to OUT/<track>/<stem>.<ext>. The model is loaded once. "
            "A bad input prints one line naming it and why; the others still complete; the exit status is 1 "
            "when any input failed."
        ),
    )
    sep.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files, folders (searched recursively), globs or fsspec URIs (s3://...)")
    sep.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder or URI")

    run = sub.add_parser(
        "run",
        parents=[common],
        help="separate a whole catalog with the Prefect flow on Ray (exactly once, resumable)",
        description=(
            "Run the separate-catalog flow: plan -> execute on a Ray actor pool -> commit per shard -> report. "
            "Writes OUT/stems/<track_id>/<stem>.<ext> and OUT/manifests/{tracks,stems,failures}.parquet. "
            "A rerun skips tracks already committed with the same model and settings. Storage credentials and "
            "endpoints come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ~/.aws/...). "
            "Exit status 1 when any track failed."
        ),
    )
    run.add_argument("catalog", metavar="CATALOG", help="folder, glob, fsspec URI, or CSV/Parquet file with a 'uri' column (optional 'track_id')")
    run.add_argument("-o", "--out", required=True, metavar="OUT_URI", help="output root: a local path or s3://bucket/prefix")
    run.add_argument("--workers", type=int, help="CPU actors when the cluster has no GPU (default: 1); with GPUs, one actor per GPU")
    run.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local instance)")
    run.add_argument("--shard-size", type=int, default=16, help="tracks per commit (default: 16)")
    run.add_argument("--force", action="store_true", help="redo tracks already committed")
    run.add_argument(
        "--presence", choices=("combined", "classifier", "energy", "none"), default="combined",
        help="stem presence detector filling present/presence_score/active_segments (default: combined = the shipped "
        "'presence' classifier and the energy detector must agree; classifier or energy alone; none: leave the columns null)",
    )

    syn = sub.add_parser(
        "synth",
        help="render a synthetic multitrack dataset (MUSDB layout) with FluidSynth",
        description=(
            "Render Slakh-style songs with FluidSynth and a General MIDI soundfont (drums, bass, other, "
            "espeak-ng sung vocals) into OUT/<track>/{mixture,vocals,drums,bass,other}.wav plus OUT/truth.json. "
            "Deterministic per seed; the mixture is exactly the sum of the stems; a share of tracks leaves stems out."
        ),
    )
    syn.add_argument("out", metavar="OUT")
    syn.add_argument("--tracks", type=int, default=10, help="number of songs (default: 10)")
    syn.add_argument("--seconds", type=float, default=30.0, help="length of each song (default: 30)")
    syn.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
    syn.add_argument("--sample-rate", type=int, default=44100, help="(default: 44100)")
    syn.add_argument("--absent-share", type=float, default=0.25, help="share of songs with stems left out (default: 0.25)")
    syn.add_argument("--soundfont", help="GM soundfont (default: Debian's FluidR3_GM.sf2 or $DEMIX_SOUNDFONT)")
    syn.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    tr = sub.add_parser(
        "train",
        help="train a registered model on a MUSDB-layout dataset",
        description=(
            "Train a registered model (e.g. the U-Net) on a MUSDB-layout folder with Demucs-style augmentation. "
            "Logs loss and validation SDR to OUT/log.jsonl, checkpoints OUT/state.pt (resumable: rerun the same "
            "command), keeps the best weights as OUT/best.safetensors with OUT/best.json (sha256 inside). "
            "--export DIR writes <model>-<sha8>.safetensors ready for --weights. --model presence trains the stem "
            "presence classifier instead, on unet separations of DATASET's songs and variants with stems left out "
            "(options: dropped_variants, hidden, layers, separator); it writes presence-<sha8>.safetensors."
        ),
    )
    tr.add_argument("dataset", metavar="DATASET", help="folder of track folders (for MUSDB18-HQ: its train/)")
    tr.add_argument("-o", "--out", required=True, help="run folder (state, logs, best weights)")
    tr.add_argument("-m", "--model", default="unet", help="registered model to train (default: unet)")
    tr.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="model option, e.g. channels=8 (repeatable)")
    tr.add_argument("--valid", metavar="DATASET", help="validation folder (default: hold out 10%% of DATASET)")
    tr.add_argument("--steps", type=int, default=10000)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--lr", type=float, default=3e-4)
    tr.add_argument("--excerpt", type=float, default=6.0, help="training excerpt seconds (default: 6)")
    tr.add_argument("--valid-every", type=int, default=500)
    tr.add_argument("--checkpoint-every", type=int, default=250)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    tr.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    tr.add_argument("--init-weights", metavar="PATH_OR_URI", help="start from these weights (fine-tuning) instead of from scratch")
    tr.add_argument("--export", metavar="DIR", help="after training, export the best weights to DIR")
    tr.add_argument("--half", action="store_true", help="export in float16 (half the size)")
    tr.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    ev = sub.add_parser(
        "evaluate",
        parents=[common],
        help="score a model on a MUSDB-layout dataset (museval v4 SDR/SIR/SAR, SI-SDR), or stem presence (--presence)",
        description=(
            "Separate every track of DATASET (a folder of <track>/{mixture,vocals,drums,bass,other}.wav; for "
            "MUSDB18-HQ its test/) and score each stem with BSS Eval v4 as museval does (1 s windows, median over "
            "windows, then median over tracks) plus SI-SDR. --model mixture and --model irm are the oracle floor "
            "and ceiling. Writes OUT/scores.parquet, OUT/summary.md and OUT/summary.html. Silent reference stems "
            "are left out and counted."
        ),
    )
    ev.add_argument("dataset", metavar="DATASET")
    ev.add_argument("-o", "--out", required=True, help="report folder")
    ev.add_argument(
        "--presence", action="store_true",
        help="score stem presence instead: precision/recall/F1 per stem of each detector (energy, classifier) "
        "against DATASET/truth.json, and frame F1 of the active segments; writes OUT/presence.md and Parquet",
    )
    ev.add_argument("--presence-weights", metavar="PATH", help="with --presence: classifier weights overriding the shipped ones")

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
            "(rerun the same command); runs as a Prefect flow on Ray."
        ),
    )
    rx.add_argument("run", metavar="RUN_URI", help="output root of a committed `demix run` (with presence)")
    rx.add_argument("-o", "--out", required=True, metavar="OUT_URI", help="dataset root: a local path or s3://bucket/prefix")
    rx.add_argument("--examples", type=int, required=True, help="number of examples")
    rx.add_argument("--seed", type=int, default=0, help="(default: 0)")
    rx.add_argument("--seconds", type=float, help="example length (default: the recipient track's whole length)")
    rx.add_argument("--gain-db", type=float, nargs=2, default=(-3.0, 3.0), metavar=("LOW", "HIGH"), help="random gain range per stem (default: -3 3)")
    rx.add_argument("--split", default="train", help="dataset folder name (default: train)")
    rx.add_argument("--workers", type=int, help="CPU actors (default: 1)")
    rx.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local instance)")
    rx.add_argument("--shard-size", type=int, default=32, help="examples per commit (default: 32)")
    rx.add_argument("--no-progress", action="store_true", help="hide the progress bar")

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
    ex.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    sub.add_parser("models", help="list registered models", description="List registered models and where their weights live.")
    return parser


def _track_names(inputs: Sequence[str]) -> list[str]:
    """Output folder name per input: the file name without extension, made safe and unique."""
    from demix.pipeline.io.storage import safe_component

    names, seen = [], {}
    for uri in inputs:
        base = safe_component(PurePosixPath(uri.replace("\\", "/")).stem or "track")
        n = seen.get(base, 0)
        seen[base] = n + 1
        names.append(base if n == 0 else f"{base}-{n + 1}")
    return names


def cmd_models(_: argparse.Namespace) -> int:
    from demix.models.registry import DEFAULT_MODEL, list_models

    for entry in list_models():
        default = " (default)" if entry.name == DEFAULT_MODEL else ""
        weights = entry.weights_uri
        if weights is None:
            trainable = any(True for _ in entry.factory().parameters())
            weights = "none: untrained unless --weights is given" if trainable else "none needed"
        kind = "" if entry.kind == "separator" else f" [{entry.kind} model: used by `demix run --presence`]"
        print(f"{entry.name}{default}{kind}\n  {entry.description}\n  rate {entry.sample_rate} Hz, stems {', '.join(entry.sources)}\n  weights {weights}")
        if entry.options():
            print(f"  options: {', '.join(entry.options())}")
    return 0


def _settings_kwargs(args: argparse.Namespace) -> dict:
    return {
        "segment": args.segment, "overlap": args.overlap, "shifts": args.shifts,
        "batch_size": args.batch_size, "dtype": args.dtype, "seed": args.seed,
    }


def _encoding_kwargs(args: argparse.Namespace) -> dict:
    return {"format": args.format, "bit_depth": args.bit_depth, "clip": args.clip_mode}


def cmd_separate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from demix.models.base import ModelLoadError
    from demix.models.registry import load_model
    from demix.pipeline.io.audio import Encoding
    from demix.pipeline.engine.separate import SeparationSettings, TrackError, plan_stems, separate_track
    from demix.pipeline.io.storage import StorageError, expand_inputs, join

    try:
        encoding = Encoding(**_encoding_kwargs(args))
        settings = SeparationSettings(**_settings_kwargs(args), device=_device(args.device))
    except ValueError as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    try:
        inputs = expand_inputs(args.inputs)
    except StorageError as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    if not inputs:
        print("demix: error: no audio files found in the inputs", file=sys.stderr)
        return 2
    options = {"phase": args.phase} if args.phase else {}
    try:
        model = load_model(args.model, weights=args.weights, sha256=args.weights_sha256, device=settings.device, **options)
        plan = plan_stems(model.sources, stems=args.stems, two_stems=args.two_stems)
    except (ModelLoadError, ValueError) as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    if model.weights_uri is None and any(True for _ in model.parameters()):
        print(
            f"demix: warning: model {args.model!r} has no trained weights yet; its stems are not meaningful "
            "(pass --weights or use a trained model)",
            file=sys.stderr,
        )

    failed = 0
    bar = tqdm(total=len(inputs), unit="track", disable=args.no_progress, dynamic_ncols=True)
    with bar:
        for uri, name in zip(inputs, _track_names(inputs)):
            bar.set_postfix_str(os.path.basename(uri)[:40])
            outputs = {stem: join(args.out, name, f"{stem}.{encoding.extension}") for stem in plan.names}
            secs = 0.0

            def tick(s: float) -> None:
                nonlocal secs
                secs += s
                bar.set_postfix_str(f"{os.path.basename(uri)[:40]} {secs:.0f}s")

            try:
                separate_track(model, uri, outputs, plan=plan, encoding=encoding, settings=settings, progress=tick)
            except TrackError as err:
                failed += 1
                tqdm.write(f"demix: failed: {err}", file=sys.stderr)
            bar.update(1)
    ok = len(inputs) - failed
    print(f"demix: {ok} of {len(inputs)} tracks separated into {args.out}" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    from demix.models.base import ModelLoadError
    from demix.models.registry import get_entry
    from demix.pipeline.io.audio import Encoding
    from demix.pipeline.batch.catalog import CatalogError
    from demix.pipeline.engine.separate import SeparationSettings, plan_stems
    from demix.pipeline.io.storage import StorageError

    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:  # validate everything cheap before starting Prefect and Ray
        Encoding(**_encoding_kwargs(args))
        SeparationSettings(**_settings_kwargs(args))
        entry = get_entry(args.model)
        if entry.kind != "separator":
            raise ValueError(f"{args.model!r} is a {entry.kind} model, not a separation model")
        plan_stems(entry.sources, stems=args.stems, two_stems=args.two_stems)
        if args.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device for `demix run` is auto, cpu or cuda (one actor per GPU). Found: {args.device}")
    except (ValueError, ModelLoadError) as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    from demix.flows.separate_catalog import separate_catalog

    try:
        summary = separate_catalog(
            catalog=args.catalog, out=args.out, model=args.model, weights=args.weights,
            weights_sha256=args.weights_sha256, model_options={"phase": args.phase} if args.phase else None,
            settings=_settings_kwargs(args), encoding=_encoding_kwargs(args), stems=args.stems,
            two_stems=args.two_stems, workers_count=args.workers, device=args.device,
            ray_address=args.ray_address, shard_size=args.shard_size, force=args.force,
            progress=not args.no_progress, presence=args.presence,
        )
    except (CatalogError, StorageError, ModelLoadError) as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the flow's own failure (Ray, Prefect): one line, not a traceback
        print(f"demix: error: the run failed: {type(err).__name__}: {err} (rerun to resume; committed tracks are kept)", file=sys.stderr)
        return 2
    out = args.out if "://" in args.out else os.path.abspath(args.out)
    print_run_summary(summary, out)
    return 1 if summary["failed_now"] else 0


def print_run_summary(summary: dict, out: str) -> None:
    """One screen: counts, speed, where things are, and each failure on one line."""
    print(
        f"demix run: {summary['catalog_tracks']} tracks in catalog, {summary['skipped_already_committed']} already done, "
        f"{summary['ok_now']} separated, {summary['failed_now']} failed"
    )
    print(
        f"  audio: {summary['audio_seconds_now']:.1f} s in {summary['wall_seconds_now']:.1f} s "
        f"({summary['realtime_factor_now']:.2f}x real time); committed in total: {summary['committed_ok_total']} ok, "
        f"{summary['committed_failed_total']} failed, {summary['hours_of_audio_total']:.3f} h of audio"
    )
    if summary.get("presence"):
        judged = ", ".join(f"{stem} {c['present']}/{c['tracks']}" for stem, c in summary["presence"].items())
        print(f"  stems present (committed): {judged}")
    print(f"  stem audio: {out.rstrip('/')}/stems/<track_id>/<stem>.<ext>")
    for kind, uri in summary["manifests"].items():
        print(f"  {kind + ' manifest:':<18} {uri}")
    for f in summary["failures"]:
        print(f"  failed [{f['stage']}] {f['source_uri']}: {f['error_type']}: {f['message'][:160]}")


def _progress(bar):
    """A ``progress(done, total)`` callback that moves the tqdm ``bar``."""

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return progress


def cmd_presence(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from demix.models.base import ModelLoadError
    from demix.models.registry import load_model
    from demix.pipeline.engine.presence import Detector
    from demix.pipeline.learn.presence import evaluate_presence
    from demix.pipeline.engine.separate import SeparationSettings

    try:
        settings = SeparationSettings(**_settings_kwargs(args), device=_device(args.device))
        separator = load_model(args.model, weights=args.weights, sha256=args.weights_sha256, device=settings.device)
        clf = Detector("classifier", weights=args.presence_weights)
        both = Detector("combined", weights=args.presence_weights)
        detectors = {"energy": Detector("energy"), "classifier": clf, "combined": both}
        with tqdm(unit="track", disable=args.no_progress) as bar:
            progress = _progress(bar)
            report = evaluate_presence(args.dataset, separator, detectors, out=args.out, settings=settings, progress=progress)
    except (ValueError, ModelLoadError, FileNotFoundError) as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    print(f"demix evaluate --presence: {args.model} separations of {args.dataset}")
    print(f"  {'detector':<10} {'stem':<8} {'P':>6} {'R':>6} {'F1':>6} {'absF1':>6} {'frameF1':>7}  present/absent")
    for name, scores in report.scores.items():
        for stem, m in scores.per_stem.items():
            print(
                f"  {name:<10} {stem:<8} {m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f} {m['absent_f1']:6.3f} "
                f"{m['frame_f1']:7.3f}  {m['present']}/{m['absent']}"
            )
    for kind, path in report.paths.items():
        print(f"  {kind}: {path}")
    return 0


def cmd_remix(args: argparse.Namespace) -> int:
    from demix.pipeline.batch.remix import RemixConfig, RemixError
    from demix.pipeline.io.storage import StorageError

    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        RemixConfig(examples=args.examples, seed=args.seed, seconds=args.seconds, gain_db=tuple(args.gain_db), split=args.split)
        if args.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1. Found: {args.shard_size}")
    except ValueError as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    from demix.flows.build_remix_dataset import build_remix_dataset

    try:
        summary = build_remix_dataset(
            run_uri=args.run, out=args.out, examples=args.examples, seed=args.seed, seconds=args.seconds,
            gain_db=tuple(args.gain_db), split=args.split, workers_count=args.workers, ray_address=args.ray_address,
            shard_size=args.shard_size, progress=not args.no_progress,
        )
    except (RemixError, StorageError) as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the flow's own failure: one line, not a traceback
        print(f"demix: error: the remix run failed: {type(err).__name__}: {err} (rerun to resume; committed examples are kept)", file=sys.stderr)
        return 2
    print(
        f"demix remix: {summary['examples_planned']} examples planned, {summary['skipped_already_committed']} already done, "
        f"{summary['built_now']} built, {summary['failed_now']} failed; {summary['committed_total']} committed "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(summary['by_target_stem'].items()))})"
    )
    print(f"  dataset: {summary['dataset']}  (demix train {summary['dataset']} ...)")
    for kind, uri in summary["manifests"].items():
        print(f"  {kind + ':':<10} {uri}")
    for f in summary["failures"]:
        print(f"  failed [{f['stage']}] {f['track_id']}: {f['error_type']}: {f['message'][:160]}")
    return 1 if summary["failed_now"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from demix.pipeline.batch.export import ClipRule, ExportError, export_lyrics, export_transcription
    from demix.pipeline.io.storage import StorageError

    try:
        if args.task == "lyrics":
            rule = ClipRule(min_s=args.min_seconds, max_s=args.max_seconds)
            with tqdm(unit="stem", disable=args.no_progress) as bar:
                uri, n = export_lyrics(args.run, args.out, rule=rule, progress=_progress(bar))
            print(f"demix export: {n} vocal clips; manifest {uri}")
        else:
            uri, n = export_transcription(args.run, args.out)
            print(f"demix export: {n} present bass/other/vocals stems; manifest {uri}")
    except (ExportError, StorageError, ValueError) as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.presence:
        return cmd_presence(args)

    from demix.models.base import ModelLoadError
    from demix.models.registry import load_model
    from demix.pipeline.learn.evaluate import evaluate_dataset, model_estimator
    from demix.pipeline.engine.separate import SeparationSettings

    try:
        if args.model in ("mixture", "irm") and not args.weights:
            estimator = args.model  # the oracles, computed from the references
        else:
            settings = SeparationSettings(**_settings_kwargs(args), device=_device(args.device))
            options = {"phase": args.phase} if args.phase else {}
            model = load_model(args.model, weights=args.weights, sha256=args.weights_sha256, device=settings.device, **options)
            estimator = model_estimator(model, settings)
        with tqdm(unit="track", disable=args.no_progress) as bar:

            def progress(track: str, done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.set_postfix_str(track[:40])
                bar.refresh()

            report = evaluate_dataset(args.dataset, estimator, out=args.out, progress=progress, title=f"demix evaluate: {args.model}")
    except (ValueError, ModelLoadError, FileNotFoundError) as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    print(f"demix evaluate: {args.model} on {args.dataset} (median over tracks of median over 1 s windows, dB)")
    print(f"  {'stem':<8} {'SDR':>7} {'SIR':>7} {'SAR':>7} {'SI-SDR':>7}  tracks (silent left out)")
    for stem, m in report.medians.items():
        print(
            f"  {stem:<8} {m.get('sdr', float('nan')):7.2f} {m.get('sir', float('nan')):7.2f} "
            f"{m.get('sar', float('nan')):7.2f} {m.get('si_sdr', float('nan')):7.2f}  {m.get('scored', m.get('tracks'))}"
        )
    if report.silent:
        print(f"  silent reference stems left out: {len(report.silent)}")
    for kind, path in report.paths.items():
        print(f"  {kind}: {path}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from demix.pipeline.data.synth import SynthConfig, SynthError, synth_dataset

    try:
        config = SynthConfig(
            tracks=args.tracks, seconds=args.seconds, seed=args.seed, sample_rate=args.sample_rate,
            absent_share=args.absent_share, soundfont=args.soundfont,
        )
        with tqdm(total=config.tracks, unit="song", disable=args.no_progress) as bar:
            truth = synth_dataset(args.out, config, progress=bar.update)
    except (ValueError, SynthError) as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    absent = sum(not all(t.values()) for t in truth.values())
    print(f"demix synth: {len(truth)} songs in {args.out} ({absent} with stems left out; see truth.json)")
    return 0


def _parse_option(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option expects KEY=VALUE. Found: {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def cmd_train(args: argparse.Namespace) -> int:
    import json

    from demix.models.base import ModelLoadError
    from demix.pipeline.learn.train import TrainConfig, export_checkpoint, train

    if args.model == "presence":  # the presence classifier: trained on separations of DATASET
        return cmd_train_presence(args)
    if args.model == "nmf":  # not gradient-trained: dictionaries are fitted to the training stems
        from demix.pipeline.learn.train import fit_nmf

        options = dict(_parse_option(o) for o in args.option)
        try:
            path, digest = fit_nmf(args.dataset, args.export or args.out, components=int(options.get("components", 32)), seed=args.seed)
        except ValueError as err:
            print(f"demix: error: {err}", file=sys.stderr)
            return 2
        print(f"demix train: NMF dictionaries {path} (sha256 {digest})")
        return 0
    try:
        config = TrainConfig(
            dataset=args.dataset, model=args.model, model_options=dict(_parse_option(o) for o in args.option),
            valid_dataset=args.valid, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            excerpt_seconds=args.excerpt, valid_every=args.valid_every, checkpoint_every=args.checkpoint_every,
            seed=args.seed, device=args.device, num_threads=args.threads, init_weights=args.init_weights,
        )

        def log(record: dict) -> None:
            if "valid_sdr" in record:
                print(json.dumps(record), flush=True)

        best = train(config, args.out, log=log, progress=not args.no_progress)
        print(f"demix train: best weights {best}")
        if args.export:
            path, digest = export_checkpoint(args.out, args.export, half=args.half)
            print(f"demix train: exported {path} (sha256 {digest})")
    except (ValueError, ModelLoadError) as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_train_presence(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from demix.models.base import ModelLoadError
    from demix.models.registry import load_model
    from demix.pipeline.learn.presence import labelled_examples, save_classifier, train_classifier

    options = dict(_parse_option(o) for o in args.option)
    try:
        separator = load_model(str(options.pop("separator", "unet")))
        variants = int(options.pop("dropped_variants", 2))
        with tqdm(unit="song", disable=args.no_progress, desc="separating") as bar:
            examples = labelled_examples(args.dataset, separator, dropped_variants=variants, seed=args.seed, progress=_progress(bar))
        model = train_classifier(examples, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, **options)
        path, digest = save_classifier(model, Path(args.export or args.out))
    except (ValueError, ModelLoadError) as err:
        print(f"demix: error: {err}", file=sys.stderr)
        return 2
    print(f"demix train: presence classifier on {len(examples)} separated songs: {path} (sha256 {digest})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``demix`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {
        "separate": cmd_separate, "run": cmd_run, "evaluate": cmd_evaluate, "synth": cmd_synth, "train": cmd_train,
        "models": cmd_models, "remix": cmd_remix, "export": cmd_export,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
