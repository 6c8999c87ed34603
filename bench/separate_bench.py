"""Side-by-side speed and memory bench of ``demix separate`` against the alternatives.

Run by hand from the repository root::

    .venv/bin/python bench/separate_bench.py [--seconds 60] [--long-minutes 60] [--overlap 0.25] [--segment 10]

Section 1: speed. Every method separates the same generated ``--seconds`` of stereo 44.1 kHz audio
(a few sines and noise bursts, fixed seed, stored as a 16-bit WAV) with the same ``hdemucs_high``
network and the same random weights (fixed seed, saved with ``torch.save`` to a temporary ``.pt`` and
read back through ``demix.models.registry.load_model("hdemucs-musdb", weights=PATH)``, so the real loader
runs offline). All use ``torch.set_num_threads(--threads)``; each is warmed up once on a
``--warmup-seconds`` clip before the timed run.

  (i)   bare forward: the network alone on the chunks demix would feed it (``segment`` seconds each,
        starting every ``(1 - overlap) * segment``, the last one zero-padded; one chunk per call),
        under ``torch.inference_mode()``. No overlap-add, no normalisation, no decoding or encoding:
        what demix's chunking costs in the network alone, the floor for (ii).
  (ii)  demix: ``demix.pipeline.cli.main(["separate", WAV, "-o", OUT, ...])`` in-process: decode the WAV
        from disk, track statistics, streaming overlap-add, encode four 16-bit WAV stems to disk.
        Includes building the model, loading and hashing the weights (that part is also shown apart).
  (iii) torchaudio tutorial: ``separate_sources`` from torchaudio's "Music Source Separation with
        Hybrid Demucs" tutorial, re-implemented as published (``Fade`` cross-fades, ``no_grad``),
        with its normalisation ``(mix - ref.mean()) / ref.std()``, ``ref = mix.mean(0)``, and its
        de-normalisation; audio already in memory. Note that the tutorial's ``overlap`` is *seconds*
        of cross-fade and also lengthens each chunk to ``segment * (1 + overlap)`` seconds, so at the
        same ``--overlap`` number it feeds the network less audio than a fractional overlap does;
        the ``model-in`` column shows how much.
  (iv)  demucs 4.0.1 ``apply_model(model, mix, shifts=0, split=True, overlap, segment)`` on a thin
        adapter around the same torchaudio network, with the normalisation of ``demucs.separate``;
        audio already in memory. The adapter has no ``valid_length``, as demucs' own ``HDemucs``
        has none, so the last chunk runs at its true (shorter) length.

Columns: wall seconds, real-time factor (audio seconds / wall seconds), wall / wall of (ii) (above 1:
(ii) is faster), CPU seconds of the process (all threads; less sensitive than wall to other load on
the machine), forward calls and the audio seconds fed to the network (padding included). With
``--repeats N`` the methods run N times round robin and each keeps its fastest run. Goal lines:
(ii) reaches >= 0.95 x the throughput of (i) (an info line repeats it without (ii)'s model load),
and (ii) is >= 1.3 x faster than (iii) and than (iv).

Section 2: memory. A ``--long-minutes`` stereo 44.1 kHz 16-bit WAV is generated block by block, and
``python -m demix.pipeline.cli separate`` runs on it in a subprocess, so that its peak RSS
(``ru_maxrss`` from ``os.wait4``) is its own. It is started by a small launcher process, not by the
bench itself: Linux carries the high-water RSS across ``exec``, so a child of the bench (which
holds torch and the models) would report the bench's peak when that is higher. ``--rss-model unet`` (default) keeps the run short on
a CPU; ``--rss-model hdemucs-musdb`` uses the bench weights. Goal line: peak RSS <= 2 GB.

Method (iv) needs demucs, which pins an old torchaudio; install it and the modules ``demucs.apply``
imports without letting pip touch torch/torchaudio (without them row (iv) is skipped)::

    .venv/bin/pip install --no-deps demucs==4.0.1 julius==0.2.8 einops==0.8.2 openunmix==1.3.0 \\
        omegaconf==2.4.0 dora-search==0.1.13 treetable==0.2.6 submitit==1.5.4 cloudpickle==3.1.3 \\
        retrying==1.4.2 pyyaml
    .venv/bin/python -c "import torch, demucs.apply; assert torch.__version__ == '2.9.1+cu128', torch.__version__"
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# the same libgomp wait policy as the ``demix`` command (demix/pipeline/cli/_process.py) for every method,
# set before torch is imported: with libgomp's default, a forward in the main thread (i, iii, iv) spins at
# barriers and one in demix's model thread (ii) sleeps, and which is faster depends on the machine's load
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAMPLE_RATE = 44100
CHANNELS = 2
SOURCES = ("drums", "bass", "other", "vocals")
RSS_GOAL_BYTES = 2_000_000_000
DEMUCS_PACKAGES = (
    "demucs", "julius", "einops", "openunmix", "omegaconf", "dora-search", "treetable", "submitit",
    "cloudpickle", "retrying", "PyYAML",
)
INSTALL_HINT = __doc__.split("imports without letting pip touch torch/torchaudio")[1].split("::", 1)[1]

_T0 = time.perf_counter()


def log(message: str) -> None:
    """One progress line, flushed at once, prefixed with the time since start."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------- audio and weights


def bench_signal(start: int, length: int, *, seed: int) -> np.ndarray:
    """``(length, channels)`` float32 samples ``start .. start + length`` of the bench signal.

    Three panned sines with slow tremolo plus decaying noise bursts every half second. The noise of
    burst ``k`` comes from ``default_rng((seed, k))``, so any block of the signal is reproducible
    whatever the block size. Peaks stay below 0.9, so the 16-bit file does not clip.
    """
    t = (start + np.arange(length)) / SAMPLE_RATE
    left = np.zeros(length)
    right = np.zeros(length)
    for freq, pan, rate in ((55.0, 0.5, 0.25), (220.0, 0.2, 0.5), (659.3, 0.8, 0.13)):
        tone = 0.1 * (0.6 + 0.4 * np.sin(2 * np.pi * rate * t)) * np.sin(2 * np.pi * freq * t)
        left += (1 - pan) * tone
        right += pan * tone
    period = SAMPLE_RATE // 2
    first, last = start // period, (start + length - 1) // period
    for k in range(first, last + 1):
        a, b = max(k * period, start), min((k + 1) * period, start + length)
        noise = np.random.default_rng((seed, k)).standard_normal((2, period))[:, a - k * period : b - k * period]
        env = 0.1 * np.exp(-(np.arange(a, b) - k * period) / (0.04 * SAMPLE_RATE))
        left[a - start : b - start] += env * noise[0]
        right[a - start : b - start] += env * noise[1]
    return np.clip(np.stack([left, right], axis=1), -0.9, 0.9).astype(np.float32)


def write_test_wav(path: Path, seconds: float, *, seed: int, block_seconds: float = 10.0) -> int:
    """Write ``seconds`` of the bench signal as a 16-bit stereo WAV, block by block; return frames."""
    total = round(seconds * SAMPLE_RATE)
    block = round(block_seconds * SAMPLE_RATE)
    with sf.SoundFile(path, "w", samplerate=SAMPLE_RATE, channels=CHANNELS, subtype="PCM_16") as f:
        for start in range(0, total, block):
            f.write(bench_signal(start, min(block, total - start), seed=seed))
    return total


def read_wav(path: Path) -> Tensor:
    """``(channels, time)`` float32 tensor of a WAV file (the bytes demix decodes in (ii))."""
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"Expected {SAMPLE_RATE} Hz audio in {path}. Found: {rate} Hz")
    return torch.from_numpy(data.T.copy())


def save_random_weights(path: Path, *, seed: int) -> None:
    """``torch.save`` the state dict of a randomly initialised ``hdemucs_high`` (fixed seed)."""
    from torchaudio.models import hdemucs_high

    torch.manual_seed(seed)
    torch.save(hdemucs_high(sources=list(SOURCES)).state_dict(), path)


def load_bench_model(weights: Path) -> nn.Module:
    """The demix ``hdemucs-musdb`` Separator with the bench weights, through the real loader."""
    from demix.models.registry import load_model

    return load_model("hdemucs-musdb", weights=str(weights), device="cpu", trust=True)


# --------------------------------------------------------------------------- measuring


@dataclass
class Result:
    """The best (lowest wall) timed run of one method."""

    key: str
    name: str
    wall: float
    cpu: float
    audio_seconds: float
    forwards: int | None = None
    model_in_seconds: float | None = None
    note: str = ""
    load_seconds: float = 0.0  # part of ``wall`` spent building and loading the model, (ii) only

    @property
    def rtf(self) -> float:
        return self.audio_seconds / self.wall


@dataclass
class Method:
    """A warmed-up method: ``run()`` does one timed separation; ``counter`` sees its forwards."""

    key: str
    name: str
    run: Callable[[], None]
    counter: ForwardCounter
    audio_seconds: float
    note: Callable[[], str] = lambda: ""
    load_seconds: Callable[[], float] = lambda: 0.0


class ForwardCounter:
    """Counts forward calls of modules and the audio seconds they are fed (batch x time)."""

    def __init__(self) -> None:
        self.calls = 0
        self.samples = 0
        self._handles: list = []

    def attach(self, module: nn.Module) -> None:
        self._handles.append(module.register_forward_pre_hook(self._hook))

    def _hook(self, _module: nn.Module, args: tuple) -> None:
        self.count(args[0])

    def count(self, x: Tensor) -> None:
        """Record one forward call on ``x``: ``(batch, channels, time)``."""
        self.calls += 1
        self.samples += x.shape[0] * x.shape[-1]

    def reset(self) -> None:
        self.calls = 0
        self.samples = 0

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


def counted(module: nn.Module) -> ForwardCounter:
    """A counter attached to ``module`` (a module only one method calls)."""
    counter = ForwardCounter()
    counter.attach(module)
    return counter


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process, all threads)`` of one call of ``fn``."""
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


# --------------------------------------------------------------------------- (i) bare forward


def demix_chunk_starts(total: int, segment: float, overlap: float) -> tuple[int, list[int]]:
    """Chunk length and chunk starts as ``demix.pipeline.engine.overlap_add`` lays them out (batch size 1)."""
    length = max(1, round(segment * SAMPLE_RATE))
    stride = max(1, int((1 - overlap) * length))
    return length, list(range(0, total, stride))


def bare_chunks(mix: Tensor, segment: float, overlap: float) -> list[Tensor]:
    """The ``(1, channels, segment)`` chunks demix feeds the network, last one zero-padded."""
    length, starts = demix_chunk_starts(mix.shape[-1], segment, overlap)
    chunks = []
    for s in starts:
        piece = mix[:, s : s + length]
        piece = torch.nn.functional.pad(piece, (0, length - piece.shape[-1]))
        chunks.append(piece[None].contiguous())
    return chunks


def bare_forward(model: nn.Module, chunks: list[Tensor]) -> None:
    with torch.inference_mode():
        for chunk in chunks:
            model(chunk)


def prepare_bare_forward(model: nn.Module, mix: Tensor, warm: Tensor, args: argparse.Namespace) -> Method:
    """(i): the network alone over demix's chunks; chunks are cut before the clock starts.

    ``mix`` and ``warm`` are already normalised as demix normalises them.
    """
    bare_forward(model, bare_chunks(warm, args.segment, args.overlap))
    chunks = bare_chunks(mix, args.segment, args.overlap)
    return Method("i", "(i) bare forward", lambda: bare_forward(model, chunks), counted(model), mix.shape[-1] / SAMPLE_RATE)


# --------------------------------------------------------------------------- (ii) demix separate


class CliModelProbe:
    """Observes the model ``demix separate`` loads: time spent in ``load_model``, forward calls.

    :meth:`watch` swaps ``demix.models.registry.load_model`` (which the CLI looks up at call time) for a
    wrapper that times the call and hooks a :class:`ForwardCounter` on the returned model; the
    original is restored on exit. Nothing the CLI computes is changed.
    """

    def __init__(self) -> None:
        self.counter = ForwardCounter()
        self.load_seconds = 0.0

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        import demix.pipeline.cli.separate as registry  # the CLI imported load_model by name

        original = registry.load_model
        self.load_seconds = 0.0

        def load_and_watch(*a, **kw):
            start = time.perf_counter()
            model = original(*a, **kw)
            self.load_seconds += time.perf_counter() - start
            self.counter.attach(model)
            return model

        registry.load_model = load_and_watch
        try:
            yield
        finally:
            registry.load_model = original
            self.counter.detach()


def demix_argv(wav: Path, out: Path, model: str, weights: Path | None, args: argparse.Namespace) -> list[str]:
    argv = [
        "separate", str(wav), "-o", str(out), "--model", model,
        "--overlap", str(args.overlap), "--segment", str(args.segment),
        "--shifts", "0", "--device", "cpu", "--format", "wav", "--no-progress",
    ]
    if weights is not None:
        argv += ["--weights", str(weights), "--trust-weights"]
    return argv


def demix_in_process(wav: Path, out: Path, weights: Path, args: argparse.Namespace) -> None:
    from demix.pipeline.cli import main as demix_main

    shutil.rmtree(out, ignore_errors=True)
    code = demix_main(demix_argv(wav, out, "hdemucs-musdb", weights, args))
    if code != 0:
        raise RuntimeError(f"demix separate {wav} exited with status {code}")


def check_stems(out: Path, frames: int) -> None:
    """Every stem exists as a stereo WAV of ``frames`` frames."""
    found = sorted(out.rglob("*.wav"))
    if len(found) != len(SOURCES):
        raise RuntimeError(f"expected {len(SOURCES)} stems under {out}. Found: {[str(p) for p in found]}")
    for path in found:
        info = sf.info(path)
        if info.frames != frames or info.channels != CHANNELS:
            raise RuntimeError(f"stem {path}: {info.frames} frames x {info.channels} ch, expected {frames} x {CHANNELS}")


def prepare_demix(wav: Path, warm_wav: Path, workdir: Path, weights: Path, args: argparse.Namespace) -> Method:
    """(ii): ``demix separate`` end to end, in-process, WAV on disk to WAV stems on disk.

    Each run checks that four stems of the input's length were written.
    """
    out = workdir / "demix_out"
    frames = sf.info(wav).frames
    demix_in_process(warm_wav, out, weights, args)
    probe = CliModelProbe()

    def run() -> None:
        with probe.watch():
            demix_in_process(wav, out, weights, args)
        check_stems(out, frames)

    note = lambda: f"of which model build + weights load + sha256: {probe.load_seconds:.2f} s"  # noqa: E731
    return Method("ii", "(ii) demix separate", run, probe.counter, frames / SAMPLE_RATE, note, lambda: probe.load_seconds)


# --------------------------------------------------------------------------- (iii) torchaudio tutorial


def separate_sources(model, mix, segment=10.0, overlap=0.1, device=None, *, sample_rate=SAMPLE_RATE):
    """torchaudio's Hybrid Demucs tutorial function, as published (``sample_rate`` was a global there).

    ``mix`` is ``(batch, channels, time)``; returns ``(batch, sources, channels, time)``.
    """
    from torchaudio.transforms import Fade

    if device is None:
        device = mix.device
    else:
        device = torch.device(device)

    batch, channels, length = mix.shape

    chunk_len = int(sample_rate * segment * (1 + overlap))
    start = 0
    end = chunk_len
    overlap_frames = overlap * sample_rate
    fade = Fade(fade_in_len=0, fade_out_len=int(overlap_frames), fade_shape="linear")

    final = torch.zeros(batch, len(model.sources), channels, length, device=device)

    while start < length - overlap_frames:
        chunk = mix[:, :, start:end]
        with torch.no_grad():
            out = model.forward(chunk)
        out = fade(out)
        final[:, :, :, start:end] += out
        if start == 0:
            fade.fade_in_len = int(overlap_frames)
            start += int(chunk_len - overlap_frames)
        else:
            start += chunk_len
        end += chunk_len
        if end >= length:
            fade.fade_out_len = 0
    return final


class TutorialModel(nn.Module):
    """The torchaudio network with a call counter. The tutorial calls ``model.forward(chunk)``,
    which bypasses hooks, so ``forward`` counts itself; ``sources`` as on the tutorial's model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.sources = list(net.sources)
        self.counter = ForwardCounter()

    def forward(self, mix: Tensor) -> Tensor:
        self.counter.count(mix)
        return self.net(mix)


def tutorial_flow(model: nn.Module, mix: Tensor, args: argparse.Namespace) -> Tensor:
    """The tutorial's steps around ``separate_sources``: normalise, separate, de-normalise."""
    ref = mix.mean(0)
    normed = (mix - ref.mean()) / ref.std()
    sources = separate_sources(model, normed[None], segment=args.segment, overlap=args.overlap, device="cpu")[0]
    return sources * ref.std() + ref.mean()


def prepare_tutorial(net: nn.Module, mix: Tensor, warm: Tensor, args: argparse.Namespace) -> Method:
    """(iii): torchaudio tutorial ``separate_sources`` at the same ``--overlap`` number."""
    model = TutorialModel(net)
    tutorial_flow(model, warm, args)
    note = f"chunks of {args.segment * (1 + args.overlap):g} s, {args.overlap:g} s linear cross-fades (overlap in seconds)"
    return Method(
        "iii", "(iii) torchaudio tutorial", lambda: tutorial_flow(model, mix, args), model.counter,
        mix.shape[-1] / SAMPLE_RATE, lambda: note,
    )


# --------------------------------------------------------------------------- (iv) demucs apply_model


def import_demucs_apply():
    """``demucs.apply.apply_model``; ``ImportError`` with the install hint when demucs is missing."""
    try:
        from demucs.apply import apply_model
    except ImportError as err:
        raise ImportError(f"{err}. Install the demucs bench dependencies:{INSTALL_HINT}") from err
    if not torch.__version__.startswith("2.9.1"):
        raise ImportError(f"torch {torch.__version__} is not the pinned 2.9.1: demucs' install changed it")
    return apply_model


class DemucsAdapter(nn.Module):
    """The torchaudio network with the attributes demucs' ``apply_model`` reads.

    ``samplerate``, ``audio_channels``, ``segment`` (seconds) and ``sources``; no ``valid_length``
    (demucs' ``HDemucs`` has none either: torchaudio's network pads internally). Forward:
    ``(batch, channels, time) -> (batch, sources, channels, time)``.
    """

    def __init__(self, net: nn.Module, sources: tuple[str, ...], segment: float) -> None:
        super().__init__()
        self.net = net
        self.sources = list(sources)
        self.samplerate = SAMPLE_RATE
        self.audio_channels = CHANNELS
        self.segment = float(segment)

    def forward(self, mix: Tensor) -> Tensor:
        return self.net(mix)


def demucs_flow(apply_model, adapter: DemucsAdapter, mix: Tensor, args: argparse.Namespace) -> Tensor:
    """``demucs.separate``'s steps: normalise by the mono mix, ``apply_model``, de-normalise."""
    ref = mix.mean(0)
    wav = (mix - ref.mean()) / ref.std()
    sources = apply_model(
        adapter, wav[None], shifts=0, split=True, overlap=args.overlap, progress=False,
        device="cpu", num_workers=0, segment=args.segment,
    )[0]
    return sources * ref.std() + ref.mean()


def prepare_demucs(net: nn.Module, mix: Tensor, warm: Tensor, args: argparse.Namespace) -> Method:
    """(iv): demucs ``apply_model`` with ``shifts=0, split=True`` at the same overlap and segment."""
    apply_model = import_demucs_apply()
    adapter = DemucsAdapter(net, SOURCES, args.segment)
    demucs_flow(apply_model, adapter, warm, args)
    return Method(
        "iv", "(iv) demucs apply_model", lambda: demucs_flow(apply_model, adapter, mix, args), counted(adapter),
        mix.shape[-1] / SAMPLE_RATE,
    )


# --------------------------------------------------------------------------- report


def package_versions(names: tuple[str, ...]) -> str:
    parts = []
    for name in names:
        try:
            parts.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} (missing)")
    return ", ".join(parts)


def print_table(results: list[Result], skipped: dict[str, str]) -> None:
    ref = next((r for r in results if r.key == "ii"), None)
    header = f"{'method':<28}{'wall s':>9}{'RTF':>8}{'wall/(ii)':>11}{'cpu s':>9}{'cpu/(ii)':>10}{'forwards':>10}{'model-in s':>12}"
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = f"{r.wall / ref.wall:.2f}" if ref else "n/a"
        cpu_ratio = f"{r.cpu / ref.cpu:.2f}" if ref else "n/a"
        forwards = str(r.forwards) if r.forwards is not None else "n/a"
        model_in = f"{r.model_in_seconds:.1f}" if r.model_in_seconds is not None else "n/a"
        print(f"{r.name:<28}{r.wall:>9.2f}{r.rtf:>8.2f}{ratio:>11}{r.cpu:>9.2f}{cpu_ratio:>10}{forwards:>10}{model_in:>12}")
    for name, why in skipped.items():
        print(f"{name:<28}  skipped: {why.splitlines()[0]}")
    print("RTF = audio seconds / wall seconds (higher is faster); wall/(ii) > 1 means (ii) is faster;")
    print("cpu s = CPU time of this process over all threads (less sensitive to other load than wall);")
    print("model-in s = audio seconds fed to the network, padding included.")
    for r in results:
        if r.note:
            print(f"  {r.name}: {r.note}")


def goal_line(ok: bool | None, text: str) -> None:
    mark = "n/a " if ok is None else ("PASS" if ok else "FAIL")
    print(f"[{mark}] {text}", flush=True)


def print_speed_goals(results: list[Result], overlap: float) -> None:
    by = {r.key: r for r in results}
    ii = by.get("ii")
    if ii and "i" in by:
        share = ii.rtf / by["i"].rtf
        goal_line(share >= 0.95, f"(ii) throughput >= 0.95 x (i): {ii.rtf:.2f} vs {by['i'].rtf:.2f} RTF = {share:.3f} x")
        rest = ii.wall - ii.load_seconds
        if ii.load_seconds and rest > 0:
            print(f"       (info) (ii) without its {ii.load_seconds:.2f} s model load: "
                  f"{by['i'].wall / rest:.3f} x the throughput of (i)")
    else:
        goal_line(None, "(ii) throughput >= 0.95 x (i): a method did not run")
    for key in ("iii", "iv"):
        other = by.get(key)
        if ii and other:
            speedup = other.wall / ii.wall
            goal_line(speedup >= 1.3, f"(ii) >= 1.3 x faster than ({key}) at overlap {overlap:g}: {speedup:.2f} x")
        else:
            goal_line(None, f"(ii) >= 1.3 x faster than ({key}): a method did not run")


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def expected_track_buffers(minutes: float, sources: int) -> list[tuple[str, int]]:
    """Sizes of whole-track buffers that an O(track) implementation would hold."""
    n = round(minutes * 60 * SAMPLE_RATE)
    return [
        ("16-bit WAV file (channels, time)", n * CHANNELS * 2),
        ("float32 mix (channels, time)", n * CHANNELS * 4),
        (f"float32 stems ({sources}, channels, time)", n * sources * CHANNELS * 4),
        ("float32 overlap-add weight sum (time,)", n * 4),
        ("mix + stems + weights (demucs apply_model style)", n * CHANNELS * 4 * (1 + sources) + n * 4),
    ]


# --------------------------------------------------------------------------- section 2: peak RSS


def vm_hwm(pid: int) -> int | None:
    """Peak resident set (``VmHWM``) of a live process in bytes, from ``/proc``."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


RSS_LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss,
               "cpu": usage.ru_utime + usage.ru_stime}, f)
"""
"""Runs a command and writes its own ``wait4`` usage to a JSON file.

Linux carries a process's high-water RSS across ``exec`` (``signal->maxrss``): a child forked by
this bench, which holds torch and several models, would report the bench's RSS as its own
``ru_maxrss``. Started from this small launcher, the demix process inherits only the launcher's."""


@dataclass
class RssRun:
    """What the RSS subprocess used: exit status, wall and CPU seconds, peak RSS (bytes), and the
    last ``VmHWM`` seen while it ran with the time it was reached (``VmHWM`` is read every 0.2 s)."""

    code: int
    wall: float
    cpu: float
    peak: int
    last_hwm: int
    last_hwm_at: float


def child_pid(pid: int) -> int | None:
    """The first child of ``pid``, from ``/proc``; ``None`` when there is none (yet)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids = f.read().split()
    except OSError:
        return None
    return int(pids[0]) if pids else None


def run_rss(wav: Path, out: Path, weights: Path | None, workdir: Path, args: argparse.Namespace) -> RssRun:
    """Run ``python -m demix.pipeline.cli separate`` under :data:`RSS_LAUNCHER`; its own usage from ``os.wait4``."""
    argv = [sys.executable, "-m", "demix.pipeline.cli", *demix_argv(wav, out, args.rss_model, weights, args)]
    report = workdir / "rss_usage.json"
    report.unlink(missing_ok=True)
    log("RSS run: " + " ".join(argv))
    start = time.perf_counter()
    launcher = subprocess.Popen([sys.executable, "-c", RSS_LAUNCHER, str(report), *argv], cwd=REPO)
    next_report = start + args.poll_seconds
    hwm, hwm_at = 0, 0.0
    while launcher.poll() is None:
        now = time.perf_counter()
        pid = child_pid(launcher.pid)
        seen = (vm_hwm(pid) if pid else None) or 0
        if seen > hwm:
            hwm, hwm_at = seen, now - start
        if now >= next_report:
            log(f"  demix subprocess running {now - start:.0f} s, peak RSS so far {fmt_bytes(hwm)}")
            next_report = now + args.poll_seconds
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if launcher.returncode != 0 or not report.is_file():
        raise RuntimeError(f"the RSS launcher failed with status {launcher.returncode}; no usage report at {report}")
    usage = json.loads(report.read_text())
    return RssRun(usage["code"], wall, usage["cpu"], usage["maxrss_kb"] * 1024, hwm, hwm_at)


def rss_section(workdir: Path, weights: Path, args: argparse.Namespace) -> bool:
    print(f"\n=== Peak RSS of `demix separate` on {args.long_minutes:g} minutes of stereo 44.1 kHz 16-bit WAV ===", flush=True)
    wav = workdir / "long.wav"
    log(f"writing {wav} ({args.long_minutes:g} min) block by block")
    frames = write_test_wav(wav, args.long_minutes * 60, seed=args.seed + 1)
    log(f"  {fmt_bytes(wav.stat().st_size)} written")
    out = workdir / "rss_out"
    shutil.rmtree(out, ignore_errors=True)
    weights_arg = weights if args.rss_model == "hdemucs-musdb" else None
    run = run_rss(wav, out, weights_arg, workdir, args)
    code, peak = run.code, run.peak
    print(f"model: {args.rss_model} ({'bench random weights' if weights_arg else 'registry weights; untrained unet prints a warning'})")
    print(f"exit status {code}, wall {run.wall:.1f} s, CPU {run.cpu:.1f} s, RTF {frames / SAMPLE_RATE / run.wall:.2f}")
    if code == 0:
        check_stems(out, frames)
    print(f"peak RSS (ru_maxrss of the subprocess): {fmt_bytes(peak)} ({peak / 2**30:.2f} GiB); "
          f"last VmHWM seen while running: {fmt_bytes(run.last_hwm)}, reached at {run.last_hwm_at:.1f} s of {run.wall:.1f} s")
    print("expected sizes of O(track) buffers for this track (what a non-streaming implementation holds):")
    for name, size in expected_track_buffers(args.long_minutes, len(SOURCES)):
        print(f"  {name:<52}{fmt_bytes(size):>10}")
    ok = code == 0 and peak <= RSS_GOAL_BYTES
    goal_line(ok, f"peak RSS <= 2 GB: {fmt_bytes(peak)}" + ("" if code == 0 else f" (but exit status {code})"))
    with contextlib.suppress(OSError):
        wav.unlink()
    shutil.rmtree(out, ignore_errors=True)
    return code == 0


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog="Install the demucs dependencies of method (iv):" + INSTALL_HINT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the speed-test audio (default: 60)")
    parser.add_argument("--long-minutes", type=float, default=60.0, help="length of the RSS-test audio; 0 skips it (default: 60)")
    parser.add_argument("--overlap", type=float, default=0.25, help="overlap given to every method (default: 0.25)")
    parser.add_argument("--segment", type=float, default=10.0, help="chunk length in seconds for every method (default: 10)")
    parser.add_argument("--warmup-seconds", type=float, default=4.0, help="clip each method is warmed up on (default: 4)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: os.cpu_count())")
    parser.add_argument("--rss-model", choices=("unet", "hdemucs-musdb"), default="unet", help="model of the RSS run (default: unet)")
    parser.add_argument("--methods", default="i,ii,iii,iv", help="comma list of speed methods; empty skips section 1 (default: i,ii,iii,iv)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method, round robin; the fastest is kept (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the audio and of the random weights (default: 0)")
    parser.add_argument("--poll-seconds", type=float, default=30.0, help="progress interval of the RSS run (default: 30)")
    parser.add_argument("--workdir", type=Path, help="folder for the generated files (default: a temp folder, removed)")
    args = parser.parse_args(argv)
    unknown = {k.strip() for k in args.methods.split(",") if k.strip()} - {"i", "ii", "iii", "iv"}
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from i, ii, iii, iv")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1. Found: {args.repeats}")
    if not 0 <= args.overlap < 1:
        parser.error(f"--overlap must be in [0, 1). Found: {args.overlap}")
    if args.segment <= 0 or args.seconds <= 0 or args.warmup_seconds <= 0:
        parser.error("--segment, --seconds and --warmup-seconds must be > 0")
    return args


def prepare_methods(keys: list[str], workdir: Path, weights: Path, args: argparse.Namespace) -> tuple[list[Method], dict[str, str]]:
    """Write the audio, load the model and warm every method up; failures become skipped rows."""
    from demix.pipeline.engine import track_stats

    model = load_bench_model(weights)
    net = model.weights_module()
    wav, warm_wav = workdir / "mix.wav", workdir / "warmup.wav"
    write_test_wav(wav, args.seconds, seed=args.seed)
    write_test_wav(warm_wav, args.warmup_seconds, seed=args.seed + 2)
    mix, warm = read_wav(wav), read_wav(warm_wav)
    log(f"audio written and read back: {tuple(mix.shape)}")
    mean, std = track_stats([mix])  # (i) computes on the numbers demix feeds the network
    prepare = {
        "i": lambda: prepare_bare_forward(model, (mix - mean) / std, (warm - mean) / std, args),
        "ii": lambda: prepare_demix(wav, warm_wav, workdir, weights, args),
        "iii": lambda: prepare_tutorial(net, mix, warm, args),
        "iv": lambda: prepare_demucs(net, mix, warm, args),
    }
    methods: list[Method] = []
    skipped: dict[str, str] = {}
    for key in keys:
        log(f"({key}) warm-up on {args.warmup_seconds:g} s")
        try:
            methods.append(prepare[key]())
        except Exception as err:  # noqa: BLE001 - a method that cannot run is a table row, not a crash
            skipped[f"({key})"] = f"{type(err).__name__}: {err}"
            log(f"({key}) cannot run: {type(err).__name__}: {err}")
    return methods, skipped


def speed_section(workdir: Path, weights: Path, args: argparse.Namespace) -> bool:
    """Time every method ``--repeats`` times, round robin, keep each one's fastest run; print the table."""
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    methods, skipped = prepare_methods(keys, workdir, weights, args)
    best: dict[str, Result] = {}
    for rep in range(args.repeats):
        for method in list(methods):
            log(f"({method.key}) timed run {rep + 1}/{args.repeats}")
            method.counter.reset()
            try:
                wall, cpu = timed(method.run)
            except Exception as err:  # noqa: BLE001
                skipped[f"({method.key})"] = f"{type(err).__name__}: {err}"
                methods.remove(method)
                best.pop(method.key, None)
                log(f"({method.key}) FAILED: {type(err).__name__}: {err}")
                continue
            counter = method.counter
            result = Result(
                method.key, method.name, wall, cpu, method.audio_seconds,
                counter.calls or None, counter.seconds or None, method.note(), method.load_seconds(),
            )
            log(f"({method.key}) {wall:.2f} s wall, {cpu:.2f} s CPU, RTF {result.rtf:.2f}")
            if method.key not in best or wall < best[method.key].wall:
                best[method.key] = result
    results = [best[m.key] for m in methods if m.key in best]

    print(f"\n=== Speed: {args.seconds:g} s of audio, hdemucs_high (random weights, seed {args.seed}), "
          f"segment {args.segment:g} s, overlap {args.overlap:g}, best of {args.repeats} ===")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; load average at end {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
          "(other processes on these cores skew wall times)")
    print_table(results, skipped)
    print_speed_goals(results, args.overlap)
    return not skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    owned = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="demix-bench-")) if owned else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    import torchaudio

    print("=== demix separate bench ===")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchaudio {torchaudio.__version__}, "
          f"threads {torch.get_num_threads()} (cpu_count {os.cpu_count()})")
    print(f"demucs side: {package_versions(DEMUCS_PACKAGES)}")
    print(f"audio {args.seconds:g} s stereo {SAMPLE_RATE} Hz 16-bit; segment {args.segment:g} s, overlap {args.overlap:g}, "
          f"shifts 0, batch 1; warm-up clip {args.warmup_seconds:g} s; load average at start {os.getloadavg()[0]:.2f}")
    print(f"workdir {workdir}", flush=True)
    ok = True
    try:
        weights = workdir / "hdemucs_high_random.pt"
        if args.methods.strip() or args.rss_model == "hdemucs-musdb":
            log(f"saving random hdemucs_high weights (seed {args.seed}) to {weights.name}")
            save_random_weights(weights, seed=args.seed)
        if args.methods.strip():
            ok &= speed_section(workdir, weights, args)
        if args.long_minutes > 0:
            ok &= rss_section(workdir, weights, args)
    finally:
        if owned:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
