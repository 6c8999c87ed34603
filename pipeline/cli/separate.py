"""``demix separate``: files, folders or URIs into stems, in this process."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import PurePosixPath

from tqdm import tqdm

from demix.models.base import ModelLoadError
from demix.models.registry import load_model, model_options
from demix.pipeline.cli.common import device, fail
from demix.pipeline.engine import SeparationSettings, TrackError, plan_stems, separate_track, settings_kwargs
from demix.pipeline.io import Encoding, StorageError, encoding_kwargs, expand_inputs, join, safe_component


def add_parser(sub, common: argparse.ArgumentParser) -> None:
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
    sep.set_defaults(handler=cmd_separate)


def track_names(inputs: Sequence[str]) -> list[str]:
    """Output folder name per input: the file name without extension, made safe and unique."""
    names, seen = [], {}
    for uri in inputs:
        base = safe_component(PurePosixPath(uri.replace("\\", "/")).stem or "track")
        n = seen.get(base, 0)
        seen[base] = n + 1
        names.append(base if n == 0 else f"{base}-{n + 1}")
    return names


def cmd_separate(args: argparse.Namespace) -> int:
    try:
        encoding = Encoding(**encoding_kwargs(args))
        settings = SeparationSettings(**settings_kwargs(args), device=device(args.device))
        inputs = expand_inputs(args.inputs)
    except (ValueError, StorageError) as err:
        return fail(err)
    if not inputs:
        return fail("no audio files found in the inputs")
    try:
        model = load_model(args.model, weights=args.weights, sha256=args.weights_sha256, device=settings.device, **model_options(args))
        plan = plan_stems(model.sources, stems=args.stems, two_stems=args.two_stems)
    except (ModelLoadError, ValueError) as err:
        return fail(err)
    if model.weights_uri is None and any(True for _ in model.parameters()):
        print(
            f"demix: warning: model {args.model!r} has no trained weights yet; its stems are not meaningful "
            "(pass --weights or use a trained model)",
            file=sys.stderr,
        )
    failed = 0
    with tqdm(total=len(inputs), unit="track", disable=args.no_progress, dynamic_ncols=True) as bar:
        for uri, name in zip(inputs, track_names(inputs)):
            outputs = {stem: join(args.out, name, f"{stem}.{encoding.extension}") for stem in plan.names}
            try:
                separate_track(model, uri, outputs, plan=plan, encoding=encoding, settings=settings, progress=_ticker(bar, uri))
            except TrackError as err:
                failed += 1
                tqdm.write(f"demix: failed: {err}", file=sys.stderr)
            bar.update(1)
    ok = len(inputs) - failed
    print(f"demix: {ok} of {len(inputs)} tracks separated into {args.out}" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


def _ticker(bar, uri: str):
    """A ``progress(seconds)`` callback showing the track's name and how much of it is done."""
    name = os.path.basename(uri)[:40]
    bar.set_postfix_str(name)
    secs = 0.0

    def tick(s: float) -> None:
        nonlocal secs
        secs += s
        bar.set_postfix_str(f"{name} {secs:.0f}s")

    return tick
