"""Catalog-flow bench, run by hand: orchestration overhead per track and the flow's real-time factor.

    .venv/bin/python bench/catalog_bench.py [--rows 10000 100000] [--songs 6] [--seconds 20]

Section 1, overhead: a catalog CSV of N rows (distinct track ids, all pointing at one 0.05 s WAV)
runs through ``separate_catalog`` with the zero-cost ``mixture`` model writing one stem per track.
The same work without orchestration — ``demix.pipeline.batch.run.process_track`` called in a plain loop on a
sample of rows — is timed in the same run; overhead per track = (flow wall − Prefect/Ray start-up) / N
− plain work per track / actors. Goal: <= 20 ms per track, growing linearly with N.

Section 2, speed: the same ``--songs`` synthetic songs separated with the default model by
``demix separate`` (in-process, one model) and by the flow with one worker; the ratio of real-time
factors, with and without the flow's fixed start-up (Prefect ephemeral API + Ray). Goal: >= 0.9 x.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _say(*args) -> None:
    print(*args, flush=True)


def _tiny_wav(path: Path) -> None:
    import numpy as np
    import soundfile as sf

    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal((2205, 2))).astype("float32"), 44100)


def _catalog(folder: Path, rows: int, wav: Path) -> Path:
    path = folder / f"catalog-{rows}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "track_id"])
        w.writerows((str(wav), f"t{i:07d}") for i in range(rows))
    return path


def _plain_per_track(wav: Path, out: Path, n: int = 200) -> float:
    from demix.pipeline.batch.catalog import Track
    from demix.pipeline.batch.run import RunSpec, process_track

    spec = RunSpec(out=str(out), model="mixture", stems=("vocals",))
    model = spec.load()
    h = spec.settings_hash(None)
    started = time.perf_counter()
    for i in range(n):
        process_track(model, Track(f"p{i}", str(wav)), spec, settings_hash=h)
    return (time.perf_counter() - started) / n


def overhead(rows_list: list[int], workers: int, tmp: Path) -> None:
    from demix.flows.separate_catalog import separate_catalog

    wav = tmp / "tiny.wav"
    _tiny_wav(wav)
    plain = _plain_per_track(wav, tmp / "plain")
    _say(f"plain process_track (no Ray, no Prefect): {plain * 1000:.2f} ms per track")
    # fixed start-up: the same flow on a 1-row catalog
    started = time.perf_counter()
    separate_catalog(catalog=str(_catalog(tmp, 1, wav)), out=str(tmp / "warm"), model="mixture", stems=["vocals"],
                     workers_count=workers, progress=False)
    fixed = time.perf_counter() - started
    _say(f"fixed start-up (1-row flow, Prefect + Ray warm in this process): {fixed:.2f} s")
    _say(f"\n{'rows':>8} {'wall s':>9} {'ms/track':>9} {'overhead ms/track':>18}  goal <= 20 ms")
    for rows in rows_list:
        out = tmp / f"out-{rows}"
        started = time.perf_counter()
        summary = separate_catalog(catalog=str(_catalog(tmp, rows, wav)), out=str(out), model="mixture",
                                   stems=["vocals"], workers_count=workers, shard_size=256, progress=True)
        wall = time.perf_counter() - started
        assert summary["ok_now"] == rows, summary
        per = (wall - fixed) / rows
        over = per - plain / workers
        _say(f"{rows:>8} {wall:>9.1f} {per * 1000:>9.2f} {over * 1000:>18.2f}  {'OK' if over <= 0.020 else 'MISSED'}")
        shutil.rmtree(out, ignore_errors=True)


def speed(songs: int, seconds: float, tmp: Path) -> None:
    from demix.flows.separate_catalog import separate_catalog
    from demix.pipeline.cli import main
    from demix.pipeline.data.synth import SynthConfig, synth_dataset

    data = tmp / "songs"
    synth_dataset(data, SynthConfig(tracks=songs, seconds=seconds, seed=7))
    files = sorted(str(p) for p in data.glob("*/mixture.wav"))
    listing = tmp / "songs.csv"
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "track_id"])
        w.writerows((p, Path(p).parent.name) for p in files)
    audio = songs * seconds
    started = time.perf_counter()
    assert main(["separate", *files, "-o", str(tmp / "sep"), "--no-progress"]) == 0
    sep = time.perf_counter() - started
    started = time.perf_counter()
    summary = separate_catalog(catalog=str(listing), out=str(tmp / "flow"), workers_count=1, progress=False)
    flow_wall = time.perf_counter() - started
    exec_wall = summary["wall_seconds_now"]
    _say(f"\n{'method':<34} {'wall s':>8} {'RTF':>7} {'ratio':>7}")
    _say(f"{'demix separate (1 model)':<34} {sep:>8.1f} {audio / sep:>7.2f} {1.0:>7.2f}")
    _say(f"{'flow, 1 worker, whole flow':<34} {flow_wall:>8.1f} {audio / flow_wall:>7.2f} {sep / flow_wall:>7.2f}")
    _say(f"{'flow, 1 worker, execute step':<34} {exec_wall:>8.1f} {audio / exec_wall:>7.2f} {sep / exec_wall:>7.2f}")
    _say(f"goal: flow >= 0.9 x demix separate: whole flow {'OK' if sep / flow_wall >= 0.9 else 'MISSED'}, "
         f"execute step {'OK' if sep / exec_wall >= 0.9 else 'MISSED'}")


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--songs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    tmp = Path(tempfile.mkdtemp(prefix="demix-catbench-"))
    try:
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness():
            if not args.skip_overhead:
                overhead(args.rows, args.workers, tmp)
            if not args.skip_speed:
                speed(args.songs, args.seconds, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
