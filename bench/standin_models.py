"""A stand-in accelerator for benches: ``standin-sleep`` takes a fixed wall time per chunk and no CPU.

Its forward sleeps ``per_chunk_s`` x batch size (``time.sleep`` releases the GIL, as a GPU kernel
launch and wait would) and returns the mixture as every source, so the host stages around it do all
their real work (decode, overlap-add, encode, upload). Ray workers import it as a registry module
(``RunSpec.registry_module="standin_models"`` with bench/ on their ``PYTHONPATH``).
"""

from __future__ import annotations

import time

from torch import Tensor

from demix.models.base import Separator
from demix.models.registry import ModelEntry, list_models, register
from demix.pipeline.stems import STEMS


class SleepModel(Separator):
    """``(batch, channels, time) -> (batch, sources, channels, time)`` after ``per_chunk_s * batch`` seconds."""

    def __init__(self, *, per_chunk_s: float = 0.05, segment: float = 7.8) -> None:
        super().__init__()
        self.sources = STEMS
        self.sample_rate = 44100
        self.segment = float(segment)
        self.per_chunk_s = float(per_chunk_s)

    def forward(self, mix: Tensor) -> Tensor:
        time.sleep(self.per_chunk_s * mix.shape[0])
        return mix[:, None].expand(-1, len(self.sources), -1, -1)


def _sleep(*, per_chunk_s: float = 0.05, segment: float = 7.8) -> Separator:
    return SleepModel(per_chunk_s=per_chunk_s, segment=segment)


if "standin-sleep" not in {e.name for e in list_models()}:
    register(ModelEntry(
        name="standin-sleep", factory=_sleep, sample_rate=44100, sources=STEMS,
        description="bench only: sleeps a fixed time per chunk (a stand-in accelerator)",
    ))
