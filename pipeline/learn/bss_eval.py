"""Separation quality metrics: museval-compatible BSS Eval v4 and SI-SDR.

BSS Eval v4 (Liutkus, Stöter & Ito, SiSEC 2018) is reimplemented here in numpy; it reproduces
``museval.metrics.bss_eval(refs, ests, window, hop, compute_permutation=False, filters_len=512,
framewise_filters=False, bsseval_sources_version=False)`` (the call ``museval.evaluate`` makes with
``mode='v4'``), and a test compares the two frame by frame. museval is not a runtime dependency;
numpy and ``scipy.linalg`` (LU factors that can be reused) are.

What v4 computes, for ``J`` sources with ``C`` channels and ``L = 512`` filter taps:

1. On the *whole* signal, the Gram matrix ``G`` of all reference channels delayed by ``0..L-1``
   samples (size ``J*C*L`` square) and its correlations ``D`` with every estimate channel.
   ``G + eps*I`` is factorised once (LU, as museval's ``np.linalg.solve``) and solved for every
   estimate together (museval factorises it again per source; the solution is the same): the
   least-squares filters ``C_j`` (every reference -> estimate ``j``) and ``Cj_j`` (reference ``j``
   only -> estimate ``j``, from ``G``'s diagonal block).
2. Per window (1 s, hop 1 s for MUSDB), the window's references are filtered with those fixed filters
   (full convolution, ``n + L - 1`` samples): ``P = sum_k ref_k * C_j`` and ``Pj = ref_j * Cj_j``, and

   ``SDR = 10 log10 |s|^2 / |e - s|^2``, ``ISR = |s|^2 / |Pj - s|^2``, ``SIR = |Pj|^2 / |P - Pj|^2``,
   ``SAR = |P|^2 / |e - P|^2`` with ``s`` the reference and ``e`` the estimate of that window
   (a zero denominator gives ``+inf``, as museval's ``_safe_db``).
3. A window in which *any* reference or *any* estimate is silent (its channel sum all zeros, museval's
   test) is NaN for every source. Windows: ``floor((T - window + hop) / hop)`` of them starting at
   ``t * hop``; a trailing partial window is dropped; a signal shorter than a window is one window.

Numerical robustness, where this module and museval part ways on purpose. When ``G`` is singular
the filters are not unique and museval's ISR/SIR/SAR become rounding noise: scaling the input by
``1 + 1e-13`` moves them by several dB. That happens with synthetic stems: a panned mono source
(right channel = gain x left channel) or a stereo delay (right = left delayed by a few samples).
So (a) a reference channel that is silent or a scaled copy of another channel of the same source
(within -120 dB) is left out of the basis, which changes no projection; (b) from the same LU
factors, the filters are also solved to first order for a rounding-level perturbation (1e-15) of
``G``'s diagonal, and the window scores are computed with both; if any finite score below 100 dB
moves by more than 0.01 dB, the scores come instead from filters with a small Tikhonov term (``1e-12`` x each channel's energy on the diagonal), which are stable
and well defined. On recorded material (any noise floor down to about -100 dB relative to the
stem) the first computation is stable and equals museval within 0.01 dB, typically 1e-5 dB.

Where museval refuses input (``ValueError``) this module scores instead of crashing: a reference that
is silent over the whole signal makes every window NaN (:func:`demix.pipeline.learn.evaluate.score_track`
leaves such stems out before and reports them), and an estimate that is silent over the whole signal does not void the
windows of the other sources; its own windows score ``SDR = ISR = 0 dB``, ``SIR = SAR = +inf``
(the filters onto a zero estimate are zero, so the whole error is "spatial distortion").

Shapes: :func:`bss_eval_v4` takes museval's ``(sources, time, channels)``; everything else in demix
uses ``(channels, time)`` per stem, as :func:`demix.pipeline.learn.evaluate.score_track` does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.fft import next_fast_len
from scipy.linalg import lu_factor, lu_solve

FILTERS_LEN = 512

_EPS = np.finfo(np.float64).eps  # museval adds eps * I to the Gram matrix
_COPY_RESIDUAL = 1e-12  # a channel within -120 dB of a scaled copy of another channel is a copy
_PROBE = 1e-15  # a rounding-level perturbation of the Gram diagonal (a few ulps)
_STABLE_DB = 0.01  # window scores that move more than this under the probe are rounding noise
_FALLBACK_REG = 1e-12  # Tikhonov term, relative to each channel's energy, for unstable systems
_PRECISION_DB = 100.0  # scores above this are at float precision (near-perfect estimates): not compared
_WINDOW_BATCH_SAMPLES = 8 * 44100  # windows are filtered in batches of about this many samples


def _fast_len(n: int) -> int:
    """Smallest ``2^a 3^b 5^c >= n`` (an FFT size pocketfft handles quickly)."""
    return next_fast_len(n, real=True)


def _channel_sum_silent(x: np.ndarray) -> np.ndarray:
    """museval's silence test: for ``(..., sources, channels, time)``, True where the channel sum of a
    source is zero at every sample. Returns ``(..., sources)``."""
    return ~np.any(x.sum(axis=-2) != 0, axis=-1)


def _xcorr(x: np.ndarray, y: np.ndarray, maxlag: int) -> np.ndarray:
    """Cross-correlations at lags ``-maxlag..maxlag``, blockwise (memory bounded by the block size).

    Args:
        x: ``(P, time)``; y: ``(Q, time)``; any float dtype (summed in float64).

    Returns:
        ``(P, Q, 2 * maxlag + 1)`` with ``R[p, q, maxlag + k] = sum_n x[p, n + k] * y[q, n]``.
    """
    n = x.shape[-1]
    size = 1 << 15 if n + 2 * maxlag > (1 << 15) else _fast_len(n + 2 * maxlag)
    block = size - 2 * maxlag
    acc = np.zeros((x.shape[0], y.shape[0], size // 2 + 1), np.complex128)
    for start in range(0, n, block):
        stop = min(start + block, n)
        seg = np.zeros((x.shape[0], size))  # seg[i] = x[start - maxlag + i]
        lo, hi = max(0, start - maxlag), min(n, stop + maxlag)
        seg[:, lo - (start - maxlag) : hi - (start - maxlag)] = x[:, lo:hi]
        fx = np.fft.rfft(seg, size)
        fy = np.fft.rfft(np.asarray(y[:, start:stop], np.float64), size)
        acc += fx[:, None, :] * np.conj(fy[None, :, :])
    return np.fft.irfft(acc, size)[..., : 2 * maxlag + 1]


def _basis(refs: np.ndarray) -> list[tuple[int, int]]:
    """The reference channels ``(source, channel)`` that span the references' delayed copies.

    A channel that is silent, or a scaled copy of an earlier channel of the same source (a panned
    mono source; residual below :data:`_COPY_RESIDUAL` of its energy), adds nothing to the span the
    least-squares filters project onto. Keeping it makes the Gram matrix singular and the filters
    rounding noise: museval's ISR/SIR of such stems move by several dB when the input is scaled by
    ``1 + 1e-13``. The projections, hence the metrics, are the same without it.
    """
    basis = []
    for j in range(refs.shape[0]):
        kept: list[np.ndarray] = []
        for c in range(refs.shape[1]):
            x = np.asarray(refs[j, c], np.float64)
            e = float(x @ x)
            if e == 0:
                continue
            if any(float(((x - (float(x @ y) / float(y @ y)) * y) ** 2).sum()) <= _COPY_RESIDUAL * e for y in kept):
                continue
            kept.append(x)
            basis.append((j, c))
    return basis


@dataclass(frozen=True)
class _System:
    """The whole-signal normal equations of v4: Gram matrix of the delayed basis channels and their
    correlations with every estimate channel."""

    basis: list[tuple[int, int]]
    gram: np.ndarray  # (basis * taps, basis * taps)
    d: np.ndarray  # (basis * taps, sources * channels)
    nsrc: int
    nchan: int
    taps: int


def _system(refs: np.ndarray, ests: np.ndarray, taps: int) -> _System:
    """Build :class:`_System` for ``(sources, channels, time)`` references and estimates."""
    nsrc, nchan, _ = refs.shape
    basis = _basis(refs)
    k = len(basis)
    if k == 0:
        return _System(basis, np.zeros((0, 0)), np.zeros((0, nsrc * nchan)), nsrc, nchan, taps)
    rows = np.stack([refs[j, ch] for j, ch in basis])
    r = _xcorr(rows, np.concatenate([rows, ests.reshape(nsrc * nchan, -1)]), taps - 1)
    # G[(p, a), (q, b)] = <ref_p delayed a, ref_q delayed b> = R[p, q, lag b - a]
    lag = np.arange(taps)[None, :] - np.arange(taps)[:, None] + taps - 1
    gram = r[:, :k][:, :, lag].transpose(0, 2, 1, 3).reshape(k * taps, k * taps)
    # D[(p, a), (j, c)] = <ref_p delayed a, est_(j, c)> = R[p, k + (j, c), lag -a]
    d = r[:, k:, taps - 1 :: -1].transpose(0, 2, 1).reshape(k * taps, nsrc * nchan)
    return _System(basis, gram, d, nsrc, nchan, taps)


def _lu_solve_with_probe(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Solve ``(a + eps I) x = b`` by LU as museval does (``np.linalg.solve``: LAPACK getrf/getrs),
    and return ``(x, x_probe)`` where ``x_probe`` solves the system with the diagonal perturbed by
    :data:`_PROBE` (first order: ``x - p A^-1 diag(a) x``, from the same factors). ``None`` when the
    matrix is exactly singular or the solution is not finite."""
    a = a.copy()
    diag = a[np.diag_indices_from(a)].copy()
    a[np.diag_indices_from(a)] += _EPS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LinAlgWarning on an exactly singular matrix: handled below
        lu, piv = lu_factor(a, overwrite_a=True, check_finite=False)
        if not np.all(np.diag(lu)):
            return None
        x = lu_solve((lu, piv), b, check_finite=False)
        probe = x - _PROBE * lu_solve((lu, piv), diag[:, None] * x, check_finite=False)
    if not (np.isfinite(x).all() and np.isfinite(probe).all()):
        return None
    return x, probe


def _filters(system: _System, reg: float | None) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The v4 distortion filters ``(C, Cj)``, each ``(basis, taps, est, est_channel)``: from all basis
    channels onto each estimate, and from source ``j``'s own channels onto estimate ``j`` (zero
    elsewhere).

    With ``reg=None``: museval's system (``G + eps I``), returned twice: exact, then probed (see
    :func:`_lu_solve_with_probe`); ``None`` if it is singular. With a number: one pair from
    ``G + eps I + reg diag(G)`` (Tikhonov, relative to each channel's energy).
    """
    s = system
    k, taps = len(s.basis), s.taps
    shape = (k, taps, s.nsrc, s.nchan)
    count = 2 if reg is None else 1
    out = [(np.zeros(shape), np.zeros(shape)) for _ in range(count)]
    if k == 0:
        return out

    def solve(a: np.ndarray, b: np.ndarray) -> list[np.ndarray] | None:
        if reg is None:
            got = _lu_solve_with_probe(a, b)
            return None if got is None else list(got)
        a = a.copy()
        a[np.diag_indices_from(a)] *= 1 + reg
        a[np.diag_indices_from(a)] += _EPS
        try:
            return [np.linalg.solve(a, b)]
        except np.linalg.LinAlgError:
            return [np.linalg.lstsq(a, b, rcond=None)[0]]

    full = solve(s.gram, s.d)
    if full is None:
        return None
    for (c, _), x in zip(out, full):
        c[:] = x.reshape(shape)
    for j in range(s.nsrc):
        mine = [i for i, (src, _) in enumerate(s.basis) if src == j]
        if not mine:
            continue
        idx = (np.array(mine)[:, None] * taps + np.arange(taps)).ravel()
        own = solve(s.gram[np.ix_(idx, idx)], s.d[idx, j * s.nchan : (j + 1) * s.nchan])
        if own is None:
            return None
        for (_, cj), x in zip(out, own):
            cj[mine, :, j, :] = x.reshape(len(mine), taps, s.nchan)
    return out


def frame_slices(length: int, window: float, hop: float) -> list[slice]:
    """museval's ``Framing`` for ``length`` samples, ``window`` and ``hop`` in samples: window starts
    ``floor(t * hop)``, full windows only (one if the signal is shorter than a window)."""
    if window < length:
        nwin = int(np.floor((length - window + hop) / hop))
        return [
            slice(int(np.floor(t * hop)), int(np.floor(min(t * hop + window, length)))) for t in range(nwin)
        ]
    return [slice(0, length)]


def _window_scores(
    refs: np.ndarray,
    ests: np.ndarray,
    basis: list[tuple[int, int]],
    filters: Sequence[tuple[np.ndarray, np.ndarray]],
    slices: list[slice],
) -> list[dict[str, np.ndarray]]:
    """Per-window SDR/ISR/SIR/SAR for each ``(C, Cj)`` in ``filters`` (module docstring, step 2-3)."""
    nsrc, nchan, _ = refs.shape
    taps = filters[0][0].shape[1]
    est_all_silent = _channel_sum_silent(ests)  # museval refuses these; here they do not void windows
    outs = [{m: np.full((nsrc, len(slices)), np.nan) for m in ("sdr", "isr", "sir", "sar")} for _ in filters]
    spectra: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # FFT size -> filter spectra
    per_batch = max(1, _WINDOW_BATCH_SAMPLES // max(1, slices[0].stop - slices[0].start))
    for b0 in range(0, len(slices), per_batch):
        batch = slices[b0 : b0 + per_batch]
        n = max(s.stop - s.start for s in batch)
        rw = np.zeros((len(batch), nsrc, nchan, n))
        ew = np.zeros((len(batch), nsrc, nchan, n))
        for i, s in enumerate(batch):
            rw[i, ..., : s.stop - s.start] = refs[..., s]
            ew[i, ..., : s.stop - s.start] = ests[..., s]
        valid = ~(_channel_sum_silent(rw).any(-1) | (_channel_sum_silent(ew) & ~est_all_silent).any(-1))
        if not valid.any():
            continue
        rw, ew = rw[valid], ew[valid]
        cols = np.arange(b0, b0 + len(batch))[valid]
        m = n + taps - 1  # full convolution of a window with the filters
        size = _fast_len(m)
        if size not in spectra:
            spectra[size] = [
                tuple(np.moveaxis(np.fft.rfft(f, size, axis=1), 1, -1) for f in pair) for pair in filters
            ]
        fr = np.fft.rfft(rw[:, [j for j, _ in basis], [ch for _, ch in basis]], size)  # (w, basis, freq)
        rp = np.zeros(rw.shape[:-1] + (m,))
        ep = np.zeros_like(rp)
        rp[..., :n], ep[..., :n] = rw, ew

        def energy(x: np.ndarray) -> np.ndarray:
            return np.einsum("wjct,wjct->wj", x, x)

        s_energy, d_energy = energy(rw), energy(ew - rw)
        for out, (fc, fcj) in zip(outs, spectra[size]):
            proj = np.fft.irfft(np.einsum("wkf,kjof->wjof", fr, fc), size)[..., :m]  # all refs -> est j
            projj = np.fft.irfft(np.einsum("wkf,kjof->wjof", fr, fcj), size)[..., :m]  # ref j -> est j
            scores = {
                "sdr": (s_energy, d_energy),
                "isr": (s_energy, energy(projj - rp)),
                "sir": (energy(projj), energy(proj - projj)),
                "sar": (energy(proj), energy(ep - proj)),
            }
            for name, (num, den) in scores.items():
                with np.errstate(divide="ignore", invalid="ignore"):
                    db = np.where(den == 0, np.inf, 10 * np.log10(num / np.where(den == 0, 1.0, den)))
                out[name][:, cols] = db.T
    return outs


def _moved(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest difference between two score sets, over windows that are finite and below
    :data:`_PRECISION_DB` in both."""
    worst = 0.0
    for k in a:
        x, y = a[k], b[k]
        ok = np.isfinite(x) & np.isfinite(y) & (np.maximum(x, y) < _PRECISION_DB)
        if ok.any():
            worst = max(worst, float(np.abs(x[ok] - y[ok]).max()))
    return worst


def bss_eval_frames(
    refs: np.ndarray, ests: np.ndarray, window: float, hop: float, taps: int = FILTERS_LEN
) -> dict[str, np.ndarray]:
    """:func:`bss_eval_v4` on ``(sources, channels, time)`` arrays (views are fine), ``window`` and ``hop``
    in samples; no input checks (callers check)."""
    system = _system(refs, ests, taps)
    slices = frame_slices(refs.shape[-1], window, hop)
    filters = _filters(system, None)
    if filters is not None:
        exact, probe = _window_scores(refs, ests, system.basis, filters, slices)
        if _moved(exact, probe) <= _STABLE_DB:
            return exact
    return _window_scores(refs, ests, system.basis, _filters(system, _FALLBACK_REG), slices)[0]


def bss_eval_v4(
    references: np.ndarray,
    estimates: np.ndarray,
    *,
    sample_rate: int = 44100,
    window: float = 1.0,
    hop: float = 1.0,
) -> dict[str, np.ndarray]:
    """BSS Eval v4 metrics per source and window, as ``museval.metrics.bss_eval`` (module docstring).

    Args:
        references, estimates: ``(sources, time, channels)`` (museval's layout), estimate ``j``
            paired with reference ``j`` (no permutation search).
        sample_rate: Hz; ``window`` and ``hop`` are in seconds (``math.inf`` = the whole signal).

    Returns:
        ``{"sdr", "isr", "sir", "sar"}``, each ``(sources, windows)`` in dB; NaN for windows in which
        any reference or (not wholly silent) estimate is silent.
    """
    references, estimates = np.asarray(references), np.asarray(estimates)
    if references.ndim != 3 or references.shape != estimates.shape:
        raise ValueError(
            "Expected references and estimates of one shape (sources, time, channels). "
            f"Found: {references.shape} and {estimates.shape}"
        )
    if references.shape[0] == 0 or references.shape[1] == 0 or references.shape[2] == 0:
        raise ValueError(f"Expected at least one source, sample and channel. Found: {references.shape}")
    for name, x in (("references", references), ("estimates", estimates)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name} hold NaN or Inf")
    if not (window > 0 and hop > 0):
        raise ValueError(f"window and hop must be > 0 seconds. Found: window={window}, hop={hop}")
    return bss_eval_frames(
        np.moveaxis(references, 1, 2), np.moveaxis(estimates, 1, 2), window * sample_rate, hop * sample_rate
    )


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant SDR (Le Roux et al. 2019) in dB over the whole signal, all channels together.

    ``alpha = <e, s> / |s|^2``, ``SI-SDR = 10 log10 |alpha s|^2 / |e - alpha s|^2``; one gain for
    every channel (the stereo image is one signal). ``+inf`` for an exact scaled copy, ``-inf`` for an
    estimate orthogonal to the reference or all zeros.

    Args:
        reference, estimate: same shape, e.g. ``(channels, time)``.

    Raises:
        ValueError: on different shapes, NaN/Inf, or a reference with no energy.
    """
    s = np.asarray(reference, np.float64).ravel()
    e = np.asarray(estimate, np.float64).ravel()
    if np.shape(reference) != np.shape(estimate):
        raise ValueError(f"Expected reference and estimate of one shape. Found: {np.shape(reference)} and {np.shape(estimate)}")
    if not (np.isfinite(s).all() and np.isfinite(e).all()):
        raise ValueError("reference or estimate holds NaN or Inf")
    ss = float(s @ s)
    if ss == 0:
        raise ValueError("SI-SDR is undefined for a silent reference")
    target = (float(e @ s) / ss) * s
    num, den = float(target @ target), float(((e - target) ** 2).sum())
    if num == 0:  # orthogonal or all-zero estimate
        return -math.inf
    if den == 0:
        return math.inf
    return 10 * math.log10(num / den)
