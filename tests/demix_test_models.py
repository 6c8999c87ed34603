"""Test-only registry entries, importable by Ray workers (``RunSpec.registry_module="demix_test_models"``
with this folder on their ``PYTHONPATH``).

``test-gain`` is a model with a known answer (source k is ``gain[k] * input``) at 8 kHz, cheap on any
CPU, with switches that make a catalog run misbehave on purpose:

* ``delay_s``: sleep this long in every forward call (a slow model, to kill a run halfway);
* ``die_marker``: the first forward call in any process that manages to create this file exits the
  process with ``os._exit(1)`` (a separator actor dying mid-track, once per marker);
* ``nan_after``: forward calls after this many in one process return NaN (an encoder failure
  mid-track: the writers refuse non-finite audio);
* ``die_above``: a chunk whose peak exceeds this exits the process, every time (a track that
  always crashes its worker, like a decoder segfault).

Stage faults for the staged engine's tests: when the JSON file named by ``DEMIX_TEST_FAULTS`` says
``{"stage": "read" | "write", "marker": PATH}``, the first process that creates ``PATH`` while reading
a source (``read``) or committing a track's stems (``write``) exits with ``os._exit(1)`` (a host worker
killed in that stage; see :func:`install_stage_faults`, run on import).

``test-slow`` is ``test-gain`` with ``delay_s`` from ``DEMIX_TEST_DELAY_S`` (default 0.3): a slow model
the command line can name (``demix run --model test-slow``; tests/test_interrupt.py).
"""

from __future__ import annotations

import json
import os
import time

import torch

from demix.models.base import Separator
from demix.models.registry import ModelEntry, list_models, register

SOURCES = ("vocals", "drums", "bass", "other")
GAINS = (0.1, 0.2, 0.3, 0.4)


class GainModel(Separator):
    """``(batch, channels, time) -> (batch, sources, channels, time)``: source k is ``GAINS[k] * mix``."""

    masks_sum_to_one = True

    def __init__(self, *, delay_s: float = 0.0, die_marker: str = "", nan_after: int = -1, die_above: float = 0.0) -> None:
        super().__init__()
        self.sources = SOURCES
        self.sample_rate = 8000
        self.segment = 1.0
        self.delay_s = float(delay_s)
        self.die_marker = die_marker
        self.nan_after = int(nan_after)
        self.die_above = float(die_above)
        self.calls = 0
        self.register_buffer("gains", torch.tensor(GAINS, dtype=torch.float32))

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.die_marker:
            try:
                fd = os.open(self.die_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)
        if self.die_above and float(mix.abs().max()) > self.die_above:
            os._exit(1)
        if self.delay_s:
            time.sleep(self.delay_s)
        out = mix[:, None] * self.gains[None, :, None, None]
        if 0 <= self.nan_after < self.calls:
            out = torch.full_like(out, float("nan"))
        return out


def _gain(*, delay_s: float = 0.0, die_marker: str = "", nan_after: int = -1, die_above: float = 0.0) -> Separator:
    return GainModel(delay_s=delay_s, die_marker=die_marker, nan_after=nan_after, die_above=die_above)


if "test-gain" not in {e.name for e in list_models()}:  # imported once per process, but pytest may import it under two names
    register(ModelEntry(name="test-gain", factory=_gain, sample_rate=8000, sources=SOURCES, description="test only"))


BAND_EDGES_HZ = {"bass": (0.0, 150.0), "vocals": (150.0, 600.0), "drums": (600.0, 1500.0), "other": (1500.0, 1e9)}
"""``test-bands`` routes each frequency range to one source (pure tones give known stems)."""


class BandModel(Separator):
    """``(batch, channels, time) -> (batch, sources, channels, time)``: source k keeps the FFT bins of
    its frequency range; the masks partition the spectrum, so the sources sum to the input."""

    masks_sum_to_one = True

    def __init__(self) -> None:
        super().__init__()
        self.sources = SOURCES
        self.sample_rate = 8000
        self.segment = 1.0
        self.register_buffer("unused", torch.zeros(1))

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        n = mix.shape[-1]
        spec = torch.fft.rfft(mix, dim=-1)
        freqs = torch.fft.rfftfreq(n, 1.0 / self.sample_rate)
        outs = []
        for s in self.sources:
            lo, hi = BAND_EDGES_HZ[s]
            mask = ((freqs >= lo) & (freqs < hi)).to(spec.dtype)
            outs.append(torch.fft.irfft(spec * mask, n=n, dim=-1))
        return torch.stack(outs, 1)


if "test-bands" not in {e.name for e in list_models()}:
    register(ModelEntry(name="test-bands", factory=BandModel, sample_rate=8000, sources=SOURCES, description="test only"))


def _slow() -> Separator:
    return GainModel(delay_s=float(os.environ.get("DEMIX_TEST_DELAY_S", "0.3")))


if "test-slow" not in {e.name for e in list_models()}:  # `test-gain` with a delay the command line can choose
    register(ModelEntry(name="test-slow", factory=_slow, sample_rate=8000, sources=SOURCES, description="test only"))


def _die_once_in(stage: str) -> None:
    """Exit this process if the fault file asks for a death in ``stage`` and this is the first one."""
    path = os.environ.get("DEMIX_TEST_FAULTS")
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        fault = json.load(f)
    if fault.get("stage") != stage:
        return
    try:
        fd = os.open(fault["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)


def install_stage_faults() -> None:
    """Wrap the read stage's local copy and the write stage's commit of :mod:`demix.pipeline.engine.track`
    (only there: a driver committing manifests is never touched) with :func:`_die_once_in`."""
    from demix.pipeline.engine import track

    if getattr(track.local_copy, "_faulty", False):
        return
    copy = track.local_copy

    def local_copy(*args, **kwargs):
        _die_once_in("read")
        return copy(*args, **kwargs)

    class FaultyOutput(track.AtomicOutput):
        def commit(self, *args, **kwargs):
            _die_once_in("write")
            return super().commit(*args, **kwargs)

    local_copy._faulty = True
    track.local_copy = local_copy
    track.AtomicOutput = FaultyOutput


install_stage_faults()
