"""``demix evaluate``: BSS Eval scores of a model on a MUSDB-layout dataset, or stem presence scores."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from demix.models.base import ModelLoadError
from demix.models.registry import load_model, model_options
from demix.pipeline.cli.common import device, evaluation_parent, fail, progress
from demix.pipeline.engine import Detector, SeparationSettings, settings_kwargs
from demix.pipeline.learn.evaluate import evaluate_dataset, model_estimator
from demix.pipeline.learn.presence import evaluate_presence


def add_parser(sub) -> None:
    ev = sub.add_parser(
        "evaluate",
        parents=[evaluation_parent()],
        help="score a model on a MUSDB-layout dataset (museval v4 SDR/SIR/SAR, SI-SDR), or stem presence (--presence)",
        description=(
            "Separate every track of DATASET (a folder of <track>/{mixture,vocals,drums,bass,other}.wav; for "
            "MUSDB18-HQ its test/) and score each stem with BSS Eval v4 as museval does (1 s windows, median over "
            "windows, then median over tracks) plus SI-SDR. --model mixture and --model irm are the oracle floor "
            "and ceiling. Writes OUT/scores.parquet, OUT/summary.md and OUT/summary.html (SDR box plots per stem, a "
            "sortable per-track table, clips of the best and worst tracks under OUT/media/; a static page, no network). "
            "A reference below -90 dBFS "
            "(mean square) is silent: silent reference stems are left out and counted, and windows in which a "
            "stem's reference is silent are not scored for it (a stem with no scored window counts as silent)."
        ),
    )
    ev.add_argument("dataset", metavar="DATASET")
    ev.add_argument("-o", "--out", required=True, help="report folder")
    ev.add_argument(
        "--presence", action="store_true",
        help="score stem presence instead: precision/recall/F1 per stem of each detector (energy, classifier) "
        "against DATASET/truth.json, and frame F1 of the active segments; writes OUT/presence.md and Parquet",
    )
    ev.add_argument(
        "--previews", type=int, default=2, metavar="K",
        help="summary.html plays a clip of the K best and K worst tracks, estimate beside reference (default: 2; 0: none)",
    )
    ev.add_argument("--presence-weights", metavar="PATH", help="with --presence: classifier weights overriding the shipped ones")
    ev.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.presence:
        return cmd_presence(args)
    try:
        if args.previews < 0:
            raise ValueError(f"--previews must be >= 0. Found: {args.previews}")
        if args.model in ("mixture", "irm") and not args.weights:
            estimator = args.model  # the oracles, computed from the references
        else:
            settings = SeparationSettings(**settings_kwargs(args), device=device(args.device))
            model = load_model(
                args.model, weights=args.weights, sha256=args.weights_sha256, trust=args.trust_weights,
                device=settings.device, **model_options(args),
            )
            if args.weights:
                print(f"demix: weights {args.weights} verified by: {model.weights_verified_by}", file=sys.stderr)
            estimator = model_estimator(model, settings)
        with tqdm(unit="track", disable=args.no_progress) as bar:

            def on_track(track: str, done: int, total: int) -> None:
                bar.set_postfix_str(track[:40])
                progress(bar)(done, total)

            report = evaluate_dataset(
                args.dataset, estimator, out=args.out, progress=on_track, title=f"demix evaluate: {args.model}",
                model=args.model, previews=args.previews,
            )
    except (ValueError, ModelLoadError, FileNotFoundError) as err:
        return fail(err)
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


def cmd_presence(args: argparse.Namespace) -> int:
    try:
        settings = SeparationSettings(**settings_kwargs(args), device=device(args.device))
        separator = load_model(args.model, weights=args.weights, sha256=args.weights_sha256, trust=args.trust_weights, device=settings.device)
        detectors = {
            "energy": Detector("energy"),
            "classifier": Detector("classifier", weights=args.presence_weights),
            "combined": Detector("combined", weights=args.presence_weights),
        }
        with tqdm(unit="track", disable=args.no_progress) as bar:
            report = evaluate_presence(args.dataset, separator, detectors, out=args.out, settings=settings, progress=progress(bar))
    except (ValueError, ModelLoadError, FileNotFoundError) as err:
        return fail(err)
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
