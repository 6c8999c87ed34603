"""Oracle estimates that bound any model on a dataset: the mixture (floor) and the ideal ratio mask (ceiling)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

ORACLES = {
    "mixture": "every stem's estimate is the mixture: the floor any model should beat",
    "irm": "ideal ratio mask computed from the reference stems (IRM2, STFT 4096/1024): the ceiling of masking",
}
"""The oracles ``demix evaluate --model NAME`` computes from a dataset's references, with a description."""


def oracle_estimates(
    mode: str,
    references: Mapping[str, np.ndarray],
    mixture: np.ndarray,
    *,
    power: float = 2.0,
    n_fft: int = 4096,
    hop_length: int = 1024,
) -> dict[str, np.ndarray]:
    """Oracle estimates that bound any model on a dataset.

    ``'mixture'``: the mixture as every stem's estimate (the floor). ``'irm'``: the ideal ratio mask
    on STFT magnitudes (the ceiling of real-valued masking): ``M_j = |S_j|^p / sum_k |S_k|^p``
    applied to the mixture STFT (Hann window ``n_fft`` 4096, hop 1024, inverted with the mixture
    phase). ``power=2`` is sigsep's IRM2 (power-ratio, Wiener-like mask), ``power=1`` its IRM1.
    Whatever part of the mixture the given references do not sum to (the residual
    ``mixture - sum(references)``) counts as one more source in the denominator, so a subset of stems
    is masked correctly; for MUSDB it is zero.

    Args:
        references: ``{stem: (channels, time)}``; mixture: ``(channels, time)``, same shape.

    Returns:
        ``{stem: (channels, time)}`` float32, one per reference stem.
    """
    mixture = np.asarray(mixture)
    if mixture.ndim != 2:
        raise ValueError(f"Expected a mixture (channels, time). Found: {mixture.shape}")
    for stem, r in references.items():
        if np.shape(r) != mixture.shape:
            raise ValueError(f"Expected reference {stem!r} of the mixture's shape {mixture.shape}. Found: {np.shape(r)}")
    if mode == "mixture":
        return {stem: mixture.astype(np.float32, copy=True) for stem in references}
    if mode != "irm":
        raise ValueError(f"oracle mode must be 'mixture' or 'irm'. Found: {mode!r}")
    if not power > 0:
        raise ValueError(f"power must be > 0. Found: {power}")
    length = mixture.shape[-1]
    window = torch.hann_window(n_fft, dtype=torch.float64)

    def stft(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(x, np.float64))
        if length < n_fft // 2 + 1:  # reflect padding needs a few samples; zeros change nothing
            t = torch.nn.functional.pad(t, (0, n_fft // 2 + 1 - length))
        return torch.stft(t, n_fft, hop_length, window=window, return_complex=True)

    x = stft(mixture)
    mags = {stem: stft(r).abs() ** power for stem, r in references.items()}
    residual = mixture.astype(np.float64) - sum(np.asarray(r, np.float64) for r in references.values())
    total = stft(residual).abs() ** power + sum(mags.values()) + np.finfo(np.float64).eps
    out = {}
    for stem, m in mags.items():
        y = torch.istft(x * (m / total), n_fft, hop_length, window=window, length=max(length, n_fft // 2 + 1))
        out[stem] = y[..., :length].numpy().astype(np.float32)
    return out
