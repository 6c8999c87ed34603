"""The masked training loss of mixed labelled and weak batches (:mod:`demix.pipeline.data.weak`).

Per example, the loss averages the terms that are known: one per known stem, ``loss(est_s, s)``, and
when the example has a ``rest``, ``loss(sum of the estimates of the rest's stems, rest)``. Unknown stems
enter only through that sum, so the model is free to split ``rest`` among them as it likes. The batch
loss is the mean over examples. A fully labelled example's loss is the mean over its stems of their
mean errors, which is :func:`demix.pipeline.learn.validation.loss_fn` of that example.
"""

from __future__ import annotations

from torch import Tensor

from demix.pipeline.learn.validation import LOSSES


def _error(name: str, diff: Tensor) -> Tensor:
    if name == "l1":
        return diff.abs()
    if name == "mse":
        return diff.square()
    raise ValueError(f"Expected loss in {LOSSES}. Found: {name!r}")


def masked_loss(name: str, estimate: Tensor, stems: Tensor, known: Tensor, rest_mask: Tensor, rest: Tensor) -> Tensor:
    """Mean over the batch of each example's mean known term (see the module docstring).

    Args:
        name: ``"l1"`` or ``"mse"``.
        estimate, stems: ``(B, S, C, T)``; ``stems`` is read only where ``known``.
        known, rest_mask: ``(B, S)`` bool: stems whose target is known; stems ``rest`` is the sum of.
        rest: ``(B, C, T)``, read only for examples with a ``rest_mask``.
    """
    known_f = known.to(estimate.dtype)
    rest_f = rest_mask.to(estimate.dtype)
    per_stem = _error(name, estimate - stems).mean(dim=(2, 3))  # (B, S)
    known_sum = (per_stem * known_f).sum(1)
    rest_est = (estimate * rest_f[:, :, None, None]).sum(1)  # (B, C, T)
    has_rest = rest_mask.any(1).to(estimate.dtype)
    rest_term = _error(name, rest_est - rest).mean(dim=(1, 2)) * has_rest
    terms = (known_f.sum(1) + has_rest).clamp(min=1.0)
    return ((known_sum + rest_term) / terms).mean()
