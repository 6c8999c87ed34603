"""The staged engine, measured side by side in one run (by hand; nothing here runs in the test suite).

    .venv/bin/python bench/engine_bench.py                       # sections a, b, c (and d on a GPU)
    .venv/bin/python bench/engine_bench.py --sections a --tracks 8 --seconds 210 --repeats 2
    .venv/bin/python bench/engine_bench.py --sections b --clips 40 --per-chunk-ms 60

a. Host throughput per core: ``demix separate --model mixture`` (the zero-cost model: all work is the
   host's) on ``--tracks`` x ``--seconds`` MP3 192 kbit/s stereo 44.1 kHz files into 4 stems, FLAC-16
   and WAV-16, against the codec-only limit measured in the same run: libsndfile decoding the same MP3s
   in 30 s blocks and encoding four files of the same audio per track, in this process. Per core =
   audio seconds / process CPU seconds (all threads). Goal: demix >= 0.8 x the limit.
b. Accelerator feeding: the catalog flow (Prefect + local Ray) with one model actor running
   ``standin-sleep`` (bench/standin_models.py: ``--per-chunk-ms`` of sleep per chunk, no CPU, the GIL
   released) on ``--clips`` x 30 s clips with ``--batch-size 8``; the host workers get the rest of the
   machine. Prints the model stage's busy fraction (time in forwards / span from the first forward's
   start to the last one's end) and mean batch fill. Also the same through ``demix separate``'s
   in-process stage (``--jobs 4``). Goals: busy >= 90 %, fill >= 95 %.
c. Catalog flow vs ``demix separate`` on the same songs and model (``--c-model``, default the shipped
   unet), one worker each, on ``--c-songs`` and twice as many 30 s songs: the flow's execute step
   against ``demix separate`` (model load removed), end to end and marginal (the extra songs' audio
   over their extra time, which leaves out each run's fixed start). Goal >= 0.95 x per worker.
d. Only with a CUDA device: hdemucs_high in bf16 (random weights), 3-minute tracks, end-to-end real-time
   factor per GPU and model-only on the same chunks. Without a GPU this section says so and measures
   nothing.

Load: the bench prints ``os.getloadavg()`` before each section; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("DO_NOT_TRACK", "1")
# as the demix command does (pipeline/cli/_process.py), before torch is imported: libgomp's idle threads
# sleep at barriers instead of spinning (on a busy machine spinning slows every torch op 2-4x)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402

import standin_models  # noqa: E402,F401 - registers standin-sleep
from demix.models.registry import load_model  # noqa: E402
from demix.pipeline.cli.main import main as demix  # noqa: E402
from demix.pipeline.engine import (  # noqa: E402
    ModelBatcher, SeparationSettings, make_runner, plan_stems, separate_track,
)
from demix.pipeline.io import AudioWriter, Encoding  # noqa: E402

RATE = 44100


def log(text: str) -> None:
    print(text, flush=True)


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def music(seconds: float, seed: int) -> np.ndarray:
    """Stereo float32 ``(frames, 2)``: a few drifting tones, a bass line, noise bursts (not silence, not white)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    out = np.zeros((n, 2), np.float32)
    for k in range(4):
        f = rng.uniform(80, 2000)
        out[:, k % 2] += (0.1 * np.sin(2 * np.pi * f * t * (1 + 0.001 * np.sin(t)))).astype(np.float32)
    beat = (np.sin(2 * np.pi * 2 * t) > 0.95).astype(np.float32)
    out += (0.2 * beat * rng.standard_normal(n).astype(np.float32))[:, None]
    return np.clip(out, -1, 1)


def write_audio(path: Path, seconds: float, seed: int, encoding: Encoding) -> Path:
    with AudioWriter(str(path), sample_rate=RATE, channels=2, encoding=encoding) as w:
        for start in range(0, int(seconds), 30):
            block = music(min(30, seconds - start), seed * 1000 + start)
            w.write(torch.from_numpy(block.T.copy()))
    return path


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0


def codec_only(files: list[Path], out: Path, fmt: str) -> Clock:
    """Decode each file in 30 s blocks; encode four 16-bit files of the same audio."""
    with Clock() as c:
        for f in files:
            outs = [sf.SoundFile(str(out / f"{f.stem}-{k}.{fmt}"), "w", RATE, 2, subtype="PCM_16", format=fmt.upper()) for k in range(4)]
            for block in sf.blocks(str(f), blocksize=30 * RATE, dtype="float32", always_2d=True):
                for o in outs:
                    o.write(block)
            for o in outs:
                o.close()
    return c


def section_a(args, work: Path) -> None:
    log(f"\n== a. host throughput per core (mixture model), {args.tracks} x {args.seconds:.0f} s MP3 192k; {load()}")
    mp3 = Encoding(format="mp3", mp3_bitrate=192)
    files = [write_audio(work / f"song{i}.mp3", args.seconds, i, mp3) for i in range(args.tracks)]
    warm = write_audio(work / "warm.mp3", 5, 99, mp3)
    audio = args.tracks * args.seconds
    log(f"{'output':<8} {'codec-only x/core':>18} {'demix x/core':>13} {'ratio':>6} {'codec wall x':>13} {'demix wall x':>13}")
    for fmt in ("flac", "wav"):
        best_codec = best_demix = None
        for _ in range(args.repeats):
            out = work / f"codec-{fmt}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            c = codec_only(files, out, fmt)
            best_codec = c if best_codec is None or c.cpu < best_codec.cpu else best_codec
            argv = ["separate", "--model", "mixture", "--format", fmt, "--bit-depth", "16", "--no-progress"]
            demix([*argv, str(warm), "-o", str(work / "warm-out")])  # start-up (imports, model) out of the timing
            out = work / f"demix-{fmt}"
            shutil.rmtree(out, ignore_errors=True)
            with Clock() as d:
                demix([*argv, *map(str, files), "-o", str(out)])
            best_demix = d if best_demix is None or d.cpu < best_demix.cpu else best_demix
        ratio = (audio / best_demix.cpu) / (audio / best_codec.cpu)
        log(
            f"{fmt:<8} {audio / best_codec.cpu:>17.0f}x {audio / best_demix.cpu:>12.0f}x {ratio:>6.2f} "
            f"{audio / best_codec.wall:>12.0f}x {audio / best_demix.wall:>12.0f}x"
        )
    log("goal: demix >= 0.8 x the codec-only limit per core")


def _clips(work: Path, n: int, seconds: float = 30.0) -> Path:
    folder = work / "clips"
    if not folder.exists():
        folder.mkdir()
        for i in range(n):
            write_audio(folder / f"clip{i:03d}.flac", seconds, 500 + i, Encoding(format="flac", bit_depth="16"))
    return folder


def section_b(args, work: Path) -> None:
    from demix.flows.separate_catalog import separate_catalog

    log(f"\n== b. feeding a stand-in accelerator: {args.clips} x 30 s clips, batch 8, {args.per_chunk_ms:.0f} ms per chunk; {load()}")
    clips = _clips(work, args.clips)
    options = {"per_chunk_s": args.per_chunk_ms / 1000}
    for old in ("b-flow", "b-sep"):
        shutil.rmtree(work / old, ignore_errors=True)
    summary = separate_catalog(
        catalog=str(clips), out=str(work / "b-flow"), model="standin-sleep", registry_module="standin_models",
        model_options=options, settings={"batch_size": 8}, encoding={"format": "wav", "bit_depth": "16"},
        model_actors=1, presence="none", progress=False, shard_size=8, verbose=False,
    )
    stage = summary["model_stage"]
    log(f"{'path':<34} {'forwards':>8} {'fill':>6} {'busy':>6} {'x real time':>12}")
    log(f"{'catalog flow, 1 model actor':<34} {stage['forwards']:>8} {stage['fill']:>6.1%} {stage['busy']:>6.1%} {summary['realtime_factor_now']:>11.1f}x")
    model = load_model("standin-sleep", **options)
    settings = SeparationSettings(batch_size=8)
    plan = plan_stems(model.sources)
    files = sorted(clips.iterdir())
    with ModelBatcher(make_runner(model), 8) as batcher, Clock() as c:
        def one(f: Path) -> None:
            outputs = {s: str(work / "b-sep" / f.stem / f"{s}.wav") for s in plan.names}
            separate_track(model, str(f), outputs, plan=plan, encoding=Encoding(bit_depth="16"), settings=settings, stage=batcher)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, files))
    s = batcher.stats
    log(f"{'demix separate stage, --jobs 4':<34} {s.forwards:>8} {s.fill:>6.1%} {s.busy:>6.1%} {30 * len(files) / c.wall:>11.1f}x")
    log("goals: busy >= 90 %, fill >= 95 %")


def section_c(args, work: Path) -> None:
    from demix.flows.separate_catalog import separate_catalog

    n = args.c_songs
    log(f"\n== c. catalog flow vs demix separate, model {args.c_model}, one worker each, {n} and {2 * n} x 30 s; {load()}")
    sets = {}
    for k in (n, 2 * n):
        folder = work / f"c-songs-{k}"
        folder.mkdir(exist_ok=True)
        for i in range(k):
            if not (folder / f"song{i}.flac").exists():
                write_audio(folder / f"song{i}.flac", 30, 700 + i, Encoding(format="flac", bit_depth="16"))
        sets[k] = folder
    best: dict = {}
    for r in range(args.repeats):
        for k, folder in sets.items():
            files = sorted(map(str, folder.iterdir()))
            with Clock() as m:
                load_model(args.c_model)
            with Clock() as c:
                demix(["separate", *files, "-o", str(work / f"c-sep-{k}-{r}"), "--model", args.c_model, "--no-progress"])
            shutil.rmtree(work / f"c-flow-{k}-{r}", ignore_errors=True)
            summary = separate_catalog(
                catalog=str(folder), out=str(work / f"c-flow-{k}-{r}"), model=args.c_model, workers_count=1,
                presence="none", progress=False, verbose=False,
            )
            for key, value in (("sep", c.wall - m.wall), ("flow", summary["wall_seconds_now"])):
                best[key, k] = min(best.get((key, k), value), value)
    audio = 30.0 * n
    rate = {key: audio / (best[key, 2 * n] - best[key, n]) for key in ("sep", "flow")}
    log(f"{'path':<40} {n:>3} songs s {2 * n:>3} songs s  marginal x real time")
    log(f"{'demix separate (model load removed)':<40} {best['sep', n]:>11.2f} {best['sep', 2 * n]:>11.2f} {rate['sep']:>20.1f}")
    log(f"{'catalog flow, execute step':<40} {best['flow', n]:>11.2f} {best['flow', 2 * n]:>11.2f} {rate['flow']:>20.1f}")
    log(f"flow / separate, per worker: marginal {rate['flow'] / rate['sep']:.2f}, end to end at {2 * n} songs "
        f"{best['sep', 2 * n] / best['flow', 2 * n]:.2f}")
    log("goal: >= 0.95 per worker (the marginal rate: the extra songs' audio / their extra time, without the run's "
        "fixed start: Ray Data's start, the worker's process and model load)")


def section_d(args, work: Path) -> None:
    log(f"\n== d. GPU: hdemucs_high bf16; {load()}")
    if not torch.cuda.is_available():
        log("no CUDA device here: nothing measured (no GPU figure is estimated)")
        return
    log("CUDA device found: run bench/separate_bench.py with --device cuda for the model-only rate, and section b's flow with --model hdemucs-musdb")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="a,b,c,d")
    p.add_argument("--tracks", type=int, default=8)
    p.add_argument("--seconds", type=float, default=210.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--clips", type=int, default=40)
    p.add_argument("--per-chunk-ms", type=float, default=200.0)
    p.add_argument("--c-model", default="unet")
    p.add_argument("--c-songs", type=int, default=4)
    p.add_argument("--keep", metavar="DIR", help="work in DIR (kept) instead of a temporary folder")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="demix-engine-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}; work in {work}")
    try:
        for name in args.sections.split(","):
            {"a": section_a, "b": section_b, "c": section_c, "d": section_d}[name.strip()](args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
