"""Shared fixtures: tiny models and generated audio. Nothing here touches the network."""

from __future__ import annotations

import threading

import torch
import pytest

from demix.models.base import Separator


class ScaleModel(Separator):
    """A model with a known answer: source k is ``gain[k] * input``; the gains sum to one."""

    masks_sum_to_one = True

    def __init__(self, sample_rate: int = 1000, segment: float = 1.0, gains=(0.1, 0.2, 0.3, 0.4), normalize: bool = False):
        super().__init__()
        self.sources = ("vocals", "drums", "bass", "other")[: len(gains)]
        self.sample_rate = sample_rate
        self.segment = segment
        self.normalize_input = normalize
        self.register_buffer("gains", torch.tensor(gains, dtype=torch.float32))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(mix.shape))
        return mix[:, None] * self.gains[None, :, None, None]


@pytest.fixture
def scale_model() -> ScaleModel:
    return ScaleModel()


def commit_concurrently(out: str, result, n: int) -> list:
    """``n`` threads call ``manifest.commit_shard(out, result)`` at once; returns their commits.

    Any exception in a thread is re-raised after all of them finished.
    """
    from demix.pipeline.batch import manifest

    barrier = threading.Barrier(n)
    commits, errors = [], []

    def commit() -> None:
        barrier.wait()
        try:
            commits.append(manifest.commit_shard(out, result))
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=commit) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return commits
