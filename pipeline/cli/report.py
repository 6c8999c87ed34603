"""``demix report``: rebuild the HTML report of a catalog run's output (see :mod:`demix.pipeline.batch.html`)."""

from __future__ import annotations

import argparse

from demix.pipeline.batch.html import PREVIEW_S, SAMPLES, rebuild_run_report
from demix.pipeline.cli.common import fail
from demix.pipeline.io import AudioError, StorageError, output_root

DESCRIPTION = """Rebuild OUT/report/index.html, the HTML report `demix run` writes at the end of a run, from what
is committed under OUT now: tracks ok / failed / skipped, hours of audio, throughput and time per stage
(the counters of the last run, kept in OUT/report/summary.json), the failures (file, stage, error),
presence counts per stem, and a gallery of sampled tracks: per stem a spectrogram, the presence
timeline and a short MP3 preview written under OUT/report/media/ (never the whole stem). The folder is
self-contained (relative links, no network requests): open it from disk or serve it from an object
store's static hosting."""


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0. Found: {text}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="rebuild the HTML report of a run's output (OUT/report/index.html)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", metavar="RUN_URI", help="the output root of `demix run` (local path or s3://...)")
    p.add_argument("--samples", type=int, default=SAMPLES, metavar="N", help=f"tracks in the gallery (default: {SAMPLES})")
    p.add_argument(
        "--preview-seconds", type=_positive, default=PREVIEW_S, metavar="S",
        help=f"length of each preview clip (default: {PREVIEW_S:g})",
    )
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    out = output_root(args.out)
    try:
        if args.samples < 0:
            raise ValueError(f"--samples must be >= 0. Found: {args.samples}")
        uri, summary = rebuild_run_report(out, samples=args.samples, preview_s=args.preview_seconds)
    except (StorageError, AudioError, ValueError) as err:
        return fail(f"report: {err}")
    if not summary["committed_ok_total"] + summary["committed_failed_total"]:
        print(f"demix report: nothing is committed under {out} yet")
    print(
        f"demix report: {summary['committed_ok_total']} ok, {summary['committed_failed_total']} failed, "
        f"{summary['hours_of_audio_total']:.3f} h of audio committed"
    )
    print(f"  report: {uri}")
    return 0
