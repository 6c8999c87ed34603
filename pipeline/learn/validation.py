"""The training loss and the validation pass of :func:`demix.pipeline.learn.train.train`: mean loss and
median per-stem SDR on fixed excerpts."""

from __future__ import annotations

import statistics

import torch
from torch import Tensor

from demix.pipeline.stems import QUIET_DBFS, is_silent

LOSSES = ("l1", "mse")

_SDR_EPS = 1e-10


def loss_fn(name: str, estimate: Tensor, reference: Tensor) -> Tensor:
    """Mean L1 or squared error over every stem, channel and sample."""
    if name == "l1":
        return (estimate - reference).abs().mean()
    if name == "mse":
        return (estimate - reference).square().mean()
    raise ValueError(f"Expected loss in {LOSSES}. Found: {name!r}")


def sdr_db(reference: Tensor, estimate: Tensor) -> float:
    """``10 log10(|s|^2 / |s - ŝ|^2)`` in dB over all channels and samples of one stem."""
    ref = reference.double()
    err = (ref - estimate.double()).square().sum()
    return float(10.0 * torch.log10((ref.square().sum() + _SDR_EPS) / (err + _SDR_EPS)))



@torch.no_grad()
def validate(model: torch.nn.Module, excerpts: list[tuple[str, Tensor, Tensor]], *, loss: str, batch_size: int,
             device: torch.device) -> tuple[float, dict[str, float | None]]:
    """Mean loss and median per-stem SDR (silent references skipped; ``None`` when all are silent)."""
    was_training = model.training
    model.eval()
    try:
        losses, sdrs = [], {s: [] for s in model.sources}
        for i in range(0, len(excerpts), batch_size):
            part = excerpts[i : i + batch_size]
            mix = torch.stack([m for _, m, _ in part]).to(device)
            ref = torch.stack([s for _, _, s in part]).to(device)
            est = model(mix)
            losses.extend(float(loss_fn(loss, e, r)) for e, r in zip(est, ref))
            for e, r in zip(est.cpu(), ref.cpu()):
                for k, stem in enumerate(model.sources):
                    if not is_silent(r[k], QUIET_DBFS):
                        sdrs[stem].append(sdr_db(r[k], e[k]))
    finally:
        model.train(was_training)
    return statistics.fmean(losses), {s: (statistics.median(v) if v else None) for s, v in sdrs.items()}



def mean_sdr(sdrs: dict[str, float | None]) -> float | None:
    """The mean over stems of the SDRs that are not ``None``; ``None`` when none is."""
    values = [v for v in sdrs.values() if v is not None]
    return statistics.fmean(values) if values else None

