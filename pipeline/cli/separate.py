"""``demix separate``: files, folders or URIs into stems, in this process."""

from __future__ import annotations

import argparse
import os
import string
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from tqdm import tqdm

from demix.models.base import ModelLoadError, Separator
from demix.models.registry import load_model, model_options
from demix.pipeline.cli.common import device, fail
from demix.pipeline.cli.console import EXIT_INTERRUPTED
from demix.pipeline.engine import (
    Cancelled, ModelBatcher, SeparationSettings, StemPlan, TrackError, make_runner, plan_stems, separate_track,
    settings_kwargs,
)
from demix.pipeline.io import (
    Encoding, StorageError, check_output_root, encoding_kwargs, expand_inputs, is_remote, join, local_path, safe_component,
)

DEFAULT_FILENAME = "{track}/{stem}.{ext}"
"""``--filename``: where each stem goes under OUT (demucs' default layout)."""
FILENAME_FIELDS = ("track", "stem", "ext")
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    sep = sub.add_parser(
        "separate",
        parents=[common],
        help="separate audio files, folders or URIs into stems",
        description=(
            "Separate each INPUT into stems written to OUT/<track>/<stem>.<ext> (see --filename). The model is "
            "loaded once. A bad input prints one line naming it and why; the others still complete; the exit "
            "status is 1 when any input failed, 2 for bad arguments (checked before any work). Ctrl-C abandons "
            "the tracks being written (nothing partial is left at their final names), says how many were "
            "finished, and exits 130; a second Ctrl-C exits at once."
        ),
    )
    sep.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files, folders (searched recursively), globs or fsspec URIs (s3://...)")
    sep.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder or URI")
    sep.add_argument(
        "--filename", default=DEFAULT_FILENAME, metavar="TEMPLATE",
        help="where each stem goes under OUT, with the fields {track} (the input's name), {stem} and {ext} "
        f"(default: {DEFAULT_FILENAME!r}, as demucs; e.g. '{{track}}-{{stem}}.{{ext}}'); a template that leaves OUT "
        "or gives two stems one path is refused",
    )
    sep.add_argument(
        "-j", "--jobs", type=int, default=1, metavar="N",
        help="separate N inputs at once: N threads decode, cut, assemble and encode, and one model thread "
        "runs full batches of --batch-size chunks drawn from all of them (default: 1; same output for any N)",
    )
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


def filename_paths(out: str, template: str, names: Sequence[str], stems: Sequence[str], ext: str) -> list[dict[str, str]]:
    """Per track name, ``{stem: URI}`` under ``out`` from the ``--filename`` ``template``.

    Raises:
        ValueError: a field other than track, stem and ext; a path that is absolute or holds an
            empty, ``.`` or ``..`` component (it would leave ``out``); two stems or tracks on one path.
    """
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is not None and field_name not in FILENAME_FIELDS:
            raise ValueError(f"--filename {template!r}: unknown field {{{field_name}}}; use {{track}}, {{stem}} and {{ext}}")
    seen: dict[str, tuple[str, str]] = {}
    result = []
    for name in names:
        paths = {}
        for stem in stems:
            rel = template.format(track=name, stem=stem, ext=ext)
            if rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
                raise ValueError(f"--filename {template!r} gives {rel!r}, which is not a path inside OUT")
            if rel in seen:
                raise ValueError(
                    f"--filename {template!r} writes {seen[rel][0]}/{seen[rel][1]} and {name}/{stem} to one path {rel!r}"
                )
            seen[rel] = (name, stem)
            paths[stem] = join(out, rel)
        result.append(paths)
    return result


def _check_arguments(args: argparse.Namespace) -> None:
    """What can be refused before a model loads: the output folder, ``--jobs``, the template's syntax."""
    check_output_root(args.out)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1. Found: {args.jobs}")
    filename_paths(args.out, args.filename, ["track"], ["stem"], "ext")


def cmd_separate(args: argparse.Namespace) -> int:
    try:
        return _separate(args)
    except KeyboardInterrupt:  # Ctrl-C before the tracks started (their own Ctrl-C is handled in _run_all)
        print("demix: interrupted before any track was written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _separate(args: argparse.Namespace) -> int:
    try:
        _check_arguments(args)
        encoding = Encoding(**encoding_kwargs(args))
        settings = SeparationSettings(**settings_kwargs(args), device=device(args.device))
        inputs = expand_inputs(args.inputs)
    except (ValueError, StorageError) as err:
        return fail(err)
    if not inputs:
        return fail("no audio files found in the inputs")
    try:
        model = load_model(
            args.model, weights=args.weights, sha256=args.weights_sha256, trust=args.trust_weights,
            device=settings.device, **model_options(args),
        )
        plan = plan_stems(model.sources, stems=args.stems, two_stems=args.two_stems)
        outputs = filename_paths(args.out, args.filename, track_names(inputs), plan.names, encoding.extension)
    except (ModelLoadError, ValueError) as err:
        return fail(err)
    if args.weights:
        print(f"demix: weights {args.weights} verified by: {model.weights_verified_by}", file=sys.stderr)
    if model.weights_uri is None and any(True for _ in model.parameters()):
        print(
            f"demix: warning: model {args.model!r} has no trained weights yet; its stems are not meaningful "
            "(pass --weights or use a trained model)",
            file=sys.stderr,
        )
    job = _Batch(model, plan, encoding, settings, list(zip(inputs, outputs)))
    with tqdm(total=len(inputs), unit="track", disable=args.no_progress, dynamic_ncols=True) as bar:
        tally = _run_all(job, args.jobs, bar)
    if tally.interrupted:
        _remove_empty_folders(args.out, [outputs[i] for i in tally.abandoned])
        print(
            f"demix: interrupted: {tally.ok} of {len(inputs)} tracks finished in {args.out}"
            + (f", {tally.failed} failed" if tally.failed else "")
            + f"; {len(tally.abandoned)} not written (nothing partial left; rerun them)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(f"demix: {tally.ok} of {len(inputs)} tracks separated into {args.out}" + (f", {tally.failed} failed" if tally.failed else ""))
    return 1 if tally.failed else 0


@dataclass(frozen=True)
class _Batch:
    """What every track of one ``demix separate`` shares, and its ``(input, {stem: URI})`` pairs."""

    model: Separator
    plan: StemPlan
    encoding: Encoding
    settings: SeparationSettings
    tracks: list[tuple[str, dict[str, str]]]


@dataclass
class _Tally:
    ok: int = 0
    failed: int = 0
    interrupted: bool = False
    abandoned: list[int] = field(default_factory=list)  # indices of tracks not written


def _run_all(batch: _Batch, jobs: int, bar) -> _Tally:
    """Separate every track on ``jobs`` threads sharing one model stage (a :class:`ModelBatcher`
    thread running full batches of ``--batch-size`` chunks drawn from all of them, with all of
    torch's threads).

    The main thread only waits, so Ctrl-C reaches it and never a commit: it sets the cancel event,
    running tracks stop before their next chunk and discard their staged stems, queued ones never
    start. A second Ctrl-C while they stop exits at once.
    """
    cancel = threading.Event()
    tally = _Tally()
    settings = batch.settings
    stage = ModelBatcher(make_runner(batch.model, settings.device, settings.dtype), settings.batch_size)

    def one(uri: str, outputs: dict[str, str]) -> None:
        separate_track(
            batch.model, uri, outputs, plan=batch.plan, encoding=batch.encoding, settings=batch.settings,
            progress=_ticker(bar, uri), cancel=cancel, stage=stage,
        )

    with stage:
        return _run_on(batch, jobs, bar, one, cancel, tally)


def _run_on(batch: _Batch, jobs: int, bar, one, cancel: threading.Event, tally: _Tally) -> _Tally:
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="demix-separate")
    futures: dict[Future, int] = {pool.submit(one, uri, out): i for i, (uri, out) in enumerate(batch.tracks)}
    try:
        for fut in as_completed(futures):
            _count(fut, batch.tracks[futures[fut]][0], tally)
            bar.update(1)
    except KeyboardInterrupt:
        tally.interrupted = True
        cancel.set()
        pool.shutdown(wait=False, cancel_futures=True)
        _wait_or_exit(futures)
        tally.ok = tally.failed = 0
        for fut, i in futures.items():
            if fut.cancelled() or isinstance(fut.exception(), Cancelled):
                tally.abandoned.append(i)
            else:
                _count(fut, batch.tracks[i][0], tally, quiet=True)
    finally:
        pool.shutdown(wait=True)
    tally.abandoned.sort()
    return tally


def _count(fut: Future, uri: str, tally: _Tally, *, quiet: bool = False) -> None:
    """Add a finished track to ``tally``; a failed one prints its line (unless ``quiet``)."""
    err = fut.exception()
    if err is None:
        tally.ok += 1
    elif isinstance(err, TrackError):
        tally.failed += 1
        if not quiet:
            tqdm.write(f"demix: failed: {err}", file=sys.stderr)
    else:
        raise err


def _wait_or_exit(futures) -> None:
    """Wait for the running tracks to stop; a second Ctrl-C exits the process at once (status 130)."""
    print("demix: interrupted: stopping the tracks being written (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
    try:
        wait(futures)
    except KeyboardInterrupt:
        print("demix: interrupted twice: quitting now", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)


def _remove_empty_folders(out: str, abandoned: Sequence[dict[str, str]]) -> None:
    """Remove the local folders under ``out`` that abandoned tracks created and left empty."""
    if is_remote(out):
        return
    root = os.path.abspath(local_path(out))
    for outputs in abandoned:
        for uri in outputs.values():
            folder = os.path.dirname(os.path.abspath(local_path(uri)))
            while folder.startswith(root + os.sep):
                try:
                    os.rmdir(folder)
                except OSError:
                    break
                folder = os.path.dirname(folder)


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
