"""``demix gc``: remove what no committed row of a catalog output references (see
:mod:`demix.pipeline.batch.gc`)."""

from __future__ import annotations

import argparse

from demix.pipeline.batch.gc import DEFAULT_GRACE_S, GcError, apply_gc, plan_gc
from demix.pipeline.cli.common import fail
from demix.pipeline.io import StorageError, output_root

DESCRIPTION = """Remove from a `demix run` output what no committed manifest row references: uncommitted
manifest parts, orphaned stems of failed or dead attempts, superseded attempts of a track beyond the
newest N, and stale run leases. Prints each file it removes and the bytes freed.

Never removed: the stems a current committed row references, nor anything a running run may still
commit: while a run holds its lease on OUT, unreferenced files newer than the run's start are left,
and so is every unreferenced file younger than --grace. Safe to run beside a run writing into OUT
(tested on a local OUT and on S3)."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "gc", help="remove uncommitted, orphaned and superseded files from a run's output",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", metavar="OUT_URI", help="the output root of `demix run` (local path or s3://...)")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    p.add_argument("--keep", type=int, default=1, metavar="N", help="ok attempts kept per track, the current one included (default: 1)")
    p.add_argument(
        "--grace", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
        help=f"leave unreferenced files younger than this (writers without a lease; default: {DEFAULT_GRACE_S:.0f})",
    )
    p.set_defaults(handler=cmd_gc)


def cmd_gc(args: argparse.Namespace) -> int:
    out = output_root(args.out)
    try:
        if args.keep < 1:
            raise ValueError(f"--keep must be >= 1 (the current attempt is always kept). Found: {args.keep}")
        if args.grace < 0:
            raise ValueError(f"--grace must be >= 0 seconds. Found: {args.grace}")
        plan = plan_gc(out, keep=args.keep, grace_s=args.grace)
        verb = "would remove" if args.dry_run else "removing"
        for r in plan.removals:
            print(f"{verb} {r.uri} ({r.bytes} bytes, {r.reason})")
        freed = plan.bytes if args.dry_run else apply_gc(plan)
    except (GcError, StorageError, ValueError) as err:
        return fail(f"gc: {err}")
    left = f"; left {plan.protected} unreferenced files a run may still commit" if plan.protected else ""
    runs = f"; runs writing now: {', '.join(plan.live_runs)}" if plan.live_runs else ""
    done = "would free" if args.dry_run else "freed"
    print(f"demix gc: {len(plan.removals)} files, {done} {freed} bytes ({freed / 2**20:.1f} MiB){left}{runs}")
    return 0
