"""Separation quality: museval-compatible BSS Eval v4, SI-SDR, oracles, aggregation and reports.

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
is silent over the whole signal makes every window NaN (:func:`score_track` leaves such stems out
before and reports them), and an estimate that is silent over the whole signal does not void the
windows of the other sources; its own windows score ``SDR = ISR = 0 dB``, ``SIR = SAR = +inf``
(the filters onto a zero estimate are zero, so the whole error is "spatial distortion").

Aggregation follows the MUSDB / SiSEC convention: per track and stem the median over its scored
(non-NaN) windows, then per stem the median over tracks.

Shapes: :func:`bss_eval_v4` takes museval's ``(sources, time, channels)``; everything else in demix
uses ``(channels, time)`` per stem, as :func:`score_track` does.
"""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.fft import next_fast_len

METRICS = ("sdr", "sir", "sar", "isr", "si_sdr")
STEMS = ("vocals", "drums", "bass", "other")
FILTERS_LEN = 512

SILENCE_DBFS = -90.0
"""A reference stem whose mean square over the whole track (all channels) is below this level, in dB
relative to full scale (1.0), is *silent*: left out of scoring and reported. -90 dBFS sits above the
noise floor of dithered 16-bit audio (about -96 dBFS), so a stem holding only dither or rounding noise
is silent, and far below any musical content (one second at -20 dBFS RMS in a four-minute track is
about -44 dBFS). A stem museval would refuse (channel sum exactly zero everywhere) is silent too."""

_EPS = np.finfo(np.float64).eps  # museval adds eps * I to the Gram matrix
_COPY_RESIDUAL = 1e-12  # a channel within -120 dB of a scaled copy of another channel is a copy
_PROBE = 1e-15  # a rounding-level perturbation of the Gram diagonal (a few ulps)
_STABLE_DB = 0.01  # window scores that move more than this under the probe are rounding noise
_FALLBACK_REG = 1e-12  # Tikhonov term, relative to each channel's energy, for unstable systems
_PRECISION_DB = 100.0  # scores above this are at float precision (near-perfect estimates): not compared
_WINDOW_BATCH_SAMPLES = 8 * 44100  # windows are filtered in batches of about this many samples


# --------------------------------------------------------------------------------------------------
# BSS Eval v4
# --------------------------------------------------------------------------------------------------


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
    from scipy.linalg import lu_factor, lu_solve

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


def _frames(length: int, window: float, hop: float) -> list[slice]:
    """museval's ``Framing``: window starts ``floor(t * hop)``, full windows only (one if too short)."""
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


def _bss_eval_v4(
    refs: np.ndarray, ests: np.ndarray, window: float, hop: float, taps: int = FILTERS_LEN
) -> dict[str, np.ndarray]:
    """:func:`bss_eval_v4` on ``(sources, channels, time)`` arrays (views are fine)."""
    system = _system(refs, ests, taps)
    slices = _frames(refs.shape[-1], window, hop)
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
    return _bss_eval_v4(
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


# --------------------------------------------------------------------------------------------------
# Tracks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackScores:
    """One stem of one track: medians over its scored windows (``frames`` of them), in dB.

    ``si_sdr`` is computed over the whole track. With ``frames == 0`` (every window NaN) the BSS Eval
    values are NaN.
    """

    track: str
    stem: str
    sdr: float
    sir: float
    sar: float
    isr: float
    si_sdr: float
    frames: int


def is_silent(reference: np.ndarray) -> bool:
    """True when a ``(channels, time)`` stem counts as silent (see :data:`SILENCE_DBFS`)."""
    x = np.asarray(reference)
    if x.size == 0:
        return True
    mean_square = float(np.mean(np.square(x, dtype=np.float64)))
    return mean_square < 10 ** (SILENCE_DBFS / 10) or not np.any(x.sum(axis=0) != 0)


def _fit_length(x: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad or cut ``(channels, time)`` to ``length`` (museval's ``pad_or_truncate``)."""
    if x.shape[-1] >= length:
        return x[..., :length]
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])])


def score_track(
    track: str,
    references: Mapping[str, np.ndarray],
    estimates: Mapping[str, np.ndarray],
    *,
    sample_rate: int,
    window: float = 1.0,
    hop: float = 1.0,
) -> tuple[list[TrackScores], list[str]]:
    """Score every stem of one track with BSS Eval v4 (all non-silent stems jointly) and SI-SDR.

    Args:
        references: ``{stem: (channels, time)}``, all of one shape.
        estimates: ``{stem: (channels, time')}`` for at least the stems of ``references``; each is
            zero-padded or cut to the reference length, as museval does.
        sample_rate: Hz, for the 1 s windows.

    Returns:
        ``(scores, silent)``: one :class:`TrackScores` per non-silent stem, in ``references`` order,
        and the stems left out because their reference is silent (:func:`is_silent`).

    Raises:
        ValueError: a missing estimate, mismatched shapes, NaN or Inf, naming the track and stem.
    """
    stems = list(references)
    if not stems:
        return [], []
    missing = [s for s in stems if s not in estimates]
    if missing:
        raise ValueError(f"{track}: no estimate for stems {missing}; got {sorted(estimates)}")
    refs, ests = {}, {}
    shape = np.shape(references[stems[0]])
    for stem in stems:
        r = np.asarray(references[stem])
        e = np.asarray(estimates[stem])
        if r.ndim != 2 or r.shape != shape:
            raise ValueError(f"{track}/{stem}: Expected references (channels, time) of one shape {shape}. Found: {r.shape}")
        if e.ndim != 2 or e.shape[0] != r.shape[0]:
            raise ValueError(f"{track}/{stem}: Expected an estimate ({r.shape[0]}, time). Found: {e.shape}")
        for what, x in (("reference", r), ("estimate", e)):
            if not np.isfinite(x).all():
                raise ValueError(f"{track}/{stem}: {what} holds NaN or Inf")
        refs[stem], ests[stem] = r, _fit_length(e, r.shape[1])
    silent = [s for s in stems if is_silent(refs[s])]
    kept = [s for s in stems if s not in silent]
    if not kept:
        return [], silent
    r = np.stack([refs[s] for s in kept])  # (sources, channels, time)
    e = np.stack([ests[s] for s in kept])
    frames = _bss_eval_v4(r, e, window * sample_rate, hop * sample_rate)
    scores = []
    for j, stem in enumerate(kept):
        ok = ~np.isnan(frames["sdr"][j])
        med = {m: float(np.median(frames[m][j][ok])) if ok.any() else math.nan for m in frames}
        scores.append(
            TrackScores(
                track=track, stem=stem, sdr=med["sdr"], sir=med["sir"], sar=med["sar"], isr=med["isr"],
                si_sdr=si_sdr(r[j], e[j]), frames=int(ok.sum()),
            )
        )
    return scores, silent


# --------------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------------


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
    import torch

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


# --------------------------------------------------------------------------------------------------
# Aggregation and reports
# --------------------------------------------------------------------------------------------------


def aggregate(scores: Iterable[TrackScores]) -> dict[str, dict[str, float]]:
    """Per stem, the median over tracks of each per-track median (the MUSDB convention).

    Returns:
        ``{stem: {"sdr", "sir", "sar", "isr", "si_sdr", "tracks", "scored", "frames"}}`` in the order
        stems first appear; ``tracks`` counts rows, ``scored`` the rows with at least one scored
        window (only they enter the BSS Eval medians), ``frames`` the scored windows. NaN when no track
        has a value.
    """
    by_stem: dict[str, list[TrackScores]] = {}
    for s in scores:
        by_stem.setdefault(s.stem, []).append(s)
    out: dict[str, dict[str, float]] = {}
    for stem, rows in by_stem.items():
        entry: dict[str, float] = {}
        for m in METRICS:
            values = np.array([getattr(r, m) for r in rows], np.float64)
            values = values[~np.isnan(values)]
            entry[m] = float(np.median(values)) if values.size else math.nan
        entry["tracks"] = len(rows)
        entry["scored"] = sum(1 for r in rows if r.frames > 0)
        entry["frames"] = sum(r.frames for r in rows)
        out[stem] = entry
    return out


@dataclass
class EvalReport:
    """What :func:`evaluate_dataset` found: per-track scores, silent stems, per-stem medians, files."""

    scores: list[TrackScores]
    silent: list[tuple[str, str]]
    medians: dict[str, dict[str, float]]
    paths: dict[str, str] = field(default_factory=dict)


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("track", pa.string(), nullable=False),
            pa.field("stem", pa.string(), nullable=False),
            pa.field("silent", pa.bool_(), nullable=False),
            pa.field("frames", pa.int32(), nullable=False),
            *[pa.field(m, pa.float64()) for m in ("sdr", "sir", "sar", "isr", "si_sdr")],
        ]
    )


SCORES_SCHEMA_DOC = (
    "one row per track x stem; silent=true rows (reference below SILENCE_DBFS) have null metrics and "
    "frames=0; sdr/sir/sar/isr are medians over the scored 1 s windows (BSS Eval v4, museval-compatible), "
    "si_sdr is over the whole track, all in dB"
)


def _fmt(x: float) -> str:
    if isinstance(x, (int, np.integer)):
        return str(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.2f}"


def _summary_rows(medians: dict[str, dict[str, float]], silent_count: dict[str, int]) -> list[list[str]]:
    stems = list(medians) + [s for s in silent_count if s not in medians]
    rows = []
    for stem in stems:
        m = medians.get(stem, {})
        rows.append(
            [stem, str(m.get("scored", 0)), str(silent_count.get(stem, 0))]
            + [_fmt(m.get(k, math.nan)) for k in ("sdr", "sir", "sar", "isr", "si_sdr")]
        )
    return rows


_HEADER = ["stem", "tracks scored", "silent", "SDR", "SIR", "SAR", "ISR", "SI-SDR"]


def _box_stats(values: np.ndarray) -> dict[str, float | np.ndarray]:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    iqr = q3 - q1
    inside = values[(values >= q1 - 1.5 * iqr) & (values <= q3 + 1.5 * iqr)]
    return {
        "q1": q1, "median": med, "q3": q3, "lo": inside.min(), "hi": inside.max(),
        "outliers": values[(values < q1 - 1.5 * iqr) | (values > q3 + 1.5 * iqr)],
    }


def svg_boxplot(groups: Mapping[str, Sequence[float]], *, label: str = "SDR (dB)") -> str:
    """An inline SVG box plot, one box per group: quartile box, median line, whiskers to the furthest
    value within 1.5 IQR, outliers as dots. Non-finite values are left out; an empty group is labelled
    ``n=0``."""
    data = {k: np.array([v for v in vals if np.isfinite(v)], np.float64) for k, vals in groups.items()}
    finite = np.concatenate([v for v in data.values() if v.size] or [np.zeros(0)])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 1.0, hi + 1.0
    raw = (hi - lo) / 6
    step = min((m * 10**e for e in range(-3, 5) for m in (1, 2, 5) if m * 10**e >= raw), default=raw)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
    left, top, plot_h, box_w, col_w = 60, 20, 260, 40, 100
    width, height = left + col_w * max(1, len(data)) + 20, top + plot_h + 50

    def y(v: float) -> float:
        return top + plot_h * (hi - v) / (hi - lo)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<text x="14" y="{top + plot_h / 2:.1f}" transform="rotate(-90 14 {top + plot_h / 2:.1f})" '
        f'text-anchor="middle">{html.escape(label)}</text>',
    ]
    ticks = np.arange(lo, hi + step / 2, step)
    for t in ticks:
        parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#333"/>')
    for i, (name, v) in enumerate(data.items()):
        cx = left + col_w * i + col_w / 2
        parts.append(
            f'<text x="{cx:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{html.escape(name)}</text>'
            f'<text x="{cx:.1f}" y="{top + plot_h + 34}" text-anchor="middle" fill="#666">n={v.size}</text>'
        )
        if not v.size:
            continue
        b = _box_stats(v)
        x0 = cx - box_w / 2
        parts.append(
            f'<g class="box" data-stem="{html.escape(name)}">'
            f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(b["hi"]):.1f}" y2="{y(b["q3"]):.1f}" stroke="#333"/>'
            f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(b["q1"]):.1f}" y2="{y(b["lo"]):.1f}" stroke="#333"/>'
            f'<line x1="{cx - box_w / 4:.1f}" x2="{cx + box_w / 4:.1f}" y1="{y(b["hi"]):.1f}" y2="{y(b["hi"]):.1f}" stroke="#333"/>'
            f'<line x1="{cx - box_w / 4:.1f}" x2="{cx + box_w / 4:.1f}" y1="{y(b["lo"]):.1f}" y2="{y(b["lo"]):.1f}" stroke="#333"/>'
            f'<rect x="{x0:.1f}" y="{y(b["q3"]):.1f}" width="{box_w}" height="{max(0.5, y(b["q1"]) - y(b["q3"])):.1f}" '
            f'fill="#9ecae1" stroke="#333"/>'
            f'<line x1="{x0:.1f}" x2="{x0 + box_w:.1f}" y1="{y(b["median"]):.1f}" y2="{y(b["median"]):.1f}" '
            f'stroke="#d62728" stroke-width="2"/>'
            + "".join(f'<circle cx="{cx:.1f}" cy="{y(o):.1f}" r="2.5" fill="none" stroke="#333"/>' for o in b["outliers"])
            + f"<title>{html.escape(name)}: median {b['median']:.2f} dB, n={v.size}</title></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def write_report(
    scores: Sequence[TrackScores], silent: Sequence[tuple[str, str]], out: str | Path, *, title: str
) -> dict[str, str]:
    """Write ``OUT/scores.parquet``, ``OUT/summary.md`` and ``OUT/summary.html``; return their paths.

    The Parquet file has one row per track x stem, silent stems included (``silent=true``, null
    metrics), with the explicit schema of :func:`_schema`. The summaries hold one row per stem
    (median over tracks of the per-track medians), a per-track SDR table and, in HTML, an inline SVG
    box plot of the per-track SDR per stem.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = list(scores)
    silent = list(silent)
    rows = [
        {"track": s.track, "stem": s.stem, "silent": False, "frames": s.frames,
         **{m: getattr(s, m) for m in METRICS}}
        for s in scores
    ] + [
        {"track": t, "stem": st, "silent": True, "frames": 0, **{m: None for m in METRICS}} for t, st in silent
    ]
    schema = _schema().with_metadata({"title": title, "description": SCORES_SCHEMA_DOC})
    table = pa.Table.from_pylist(rows, schema=schema)
    paths = {"scores": str(out / "scores.parquet"), "markdown": str(out / "summary.md"), "html": str(out / "summary.html")}
    pq.write_table(table, paths["scores"])

    medians = aggregate(scores)
    silent_count: dict[str, int] = {}
    for _, stem in silent:
        silent_count[stem] = silent_count.get(stem, 0) + 1
    summary = _summary_rows(medians, silent_count)
    tracks = list(dict.fromkeys([s.track for s in scores] + [t for t, _ in silent]))
    stems = [row[0] for row in summary]
    sdr = {(s.track, s.stem): s.sdr for s in scores}
    per_track = [[t] + [_fmt(sdr[(t, st)]) if (t, st) in sdr else "silent" for st in stems] for t in tracks]
    note = (
        f"{len(tracks)} tracks. BSS Eval v4 (museval-compatible, 1 s windows): per track the median over "
        f"scored windows, then the median over tracks. SI-SDR over whole tracks. A stem is silent when its "
        f"reference is below {SILENCE_DBFS:g} dBFS; silent stems are left out of the medians. All values in dB."
    )

    def md_table(header: list[str], body: list[list[str]]) -> str:
        esc = [[c.replace("|", "\\|") for c in r] for r in [header] + body]
        lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc[1:]])

    md = [f"# {title}", "", note, "", "## Median per stem", "", md_table(_HEADER, summary), ""]
    if per_track:
        md += ["## SDR per track", "", md_table(["track"] + stems, per_track), ""]
    Path(paths["markdown"]).write_text("\n".join(md), encoding="utf-8")

    def html_table(header: list[str], body: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        rows_html = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>"

    plot = svg_boxplot({st: [s.sdr for s in scores if s.stem == st] for st in stems})
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(note)}</p>",
        "<h2>Median per stem</h2>",
        html_table(_HEADER, summary),
        "<h2>SDR per track and stem</h2>",
        plot,
    ]
    if per_track:
        page += ["<h2>SDR per track</h2>", html_table(["track"] + stems, per_track)]
    page.append("</body></html>")
    Path(paths["html"]).write_text("\n".join(page), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------

Estimator = Callable[[str, np.ndarray], Mapping[str, np.ndarray]]


def find_tracks(dataset: str | Path) -> list[Path]:
    """Track folders (those holding ``mixture.wav``) directly inside ``dataset``, sorted by name.

    Raises:
        FileNotFoundError: ``dataset`` is not a folder.
        ValueError: no track folder; names MUSDB18-HQ's ``train``/``test`` when that is the cause.
    """
    root = Path(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    tracks = sorted(p for p in root.iterdir() if p.is_dir() and (p / "mixture.wav").is_file())
    if not tracks:
        splits = [p.name for p in sorted(root.iterdir()) if p.is_dir() and any(p.glob("*/mixture.wav"))]
        hint = f"; it holds the splits {splits}: pass one of them, e.g. {str(root / splits[0])!r}" if splits else ""
        raise ValueError(f"no track folders (<track>/mixture.wav) in {str(root)!r}{hint}")
    return tracks


def _read(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    if not path.is_file():
        raise FileNotFoundError(f"missing {str(path)!r}")
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), int(rate)


def load_track(folder: str | Path, stems: Sequence[str] = STEMS) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """``(mixture, {stem: reference}, sample_rate)`` of a MUSDB-layout track folder, ``(channels, time)``.

    Raises:
        FileNotFoundError: a missing file; ValueError: files of different rates or shapes.
    """
    folder = Path(folder)
    mixture, rate = _read(folder / "mixture.wav")
    refs = {}
    for stem in stems:
        x, r = _read(folder / f"{stem}.wav")
        if r != rate or x.shape != mixture.shape:
            raise ValueError(
                f"{folder.name}/{stem}.wav: Expected {mixture.shape} at {rate} Hz like mixture.wav. Found: {x.shape} at {r} Hz"
            )
        refs[stem] = x
    return mixture, refs, rate


def model_estimator(model, settings=None, *, sample_rate: int = 44100) -> Estimator:
    """An estimator that runs a registered :class:`demix.models.base.Separator` through
    :func:`demix.pipeline.engine.separate.separate`, resampling to and from ``model.sample_rate`` when the dataset
    rate ``sample_rate`` differs. Returns every model source by name."""
    import torch

    from demix.pipeline.io.audio import conform
    from demix.pipeline.engine.separate import SeparationSettings, separate

    settings = settings or SeparationSettings()

    def estimate(track: str, mixture: np.ndarray) -> dict[str, np.ndarray]:
        channels, length = mixture.shape
        x = conform(mixture, sample_rate, target_rate=model.sample_rate, target_channels=model.audio_channels, source=track)
        est = separate(model, x, settings)  # (sources, channels, time)
        if model.sample_rate != sample_rate:
            import torchaudio

            est = torchaudio.functional.resample(est, model.sample_rate, sample_rate)
        if est.shape[1] != channels:
            if channels != 1:
                raise ValueError(f"{track}: model gives {est.shape[1]} channels, the dataset has {channels}")
            est = est.mean(1, keepdim=True)
        est = torch.nn.functional.pad(est, (0, max(0, length - est.shape[-1])))[..., :length]
        return {name: est[i].numpy() for i, name in enumerate(model.sources)}

    return estimate


def evaluate_dataset(
    dataset: str | Path,
    estimator: Estimator | str,
    *,
    out: str | Path,
    stems: Sequence[str] = STEMS,
    progress: Callable[[str, int, int], None] | None = None,
    title: str | None = None,
) -> EvalReport:
    """Score an estimator on every track of a MUSDB-layout folder and write the report.

    Args:
        dataset: a folder that directly holds ``<track>/{mixture,vocals,drums,bass,other}.wav``
            (for MUSDB18-HQ pass its ``test/`` or ``train/`` folder).
        estimator: ``'mixture'`` or ``'irm'`` (see :func:`oracle_estimates`; the IRM uses the
            ``stems`` given, the residual counting as one more source), or a callable
            ``(track_name, mixture (channels, time)) -> {stem: (channels, time)}`` at the dataset rate
            (see :func:`model_estimator`).
        out: folder for ``scores.parquet``, ``summary.md`` and ``summary.html``.
        progress: called as ``progress(track, done, total)`` after each track.

    Returns:
        An :class:`EvalReport` with the written paths.
    """
    tracks = find_tracks(dataset)
    if isinstance(estimator, str):
        if estimator not in ("mixture", "irm"):
            raise ValueError(f"estimator must be 'mixture', 'irm' or a callable. Found: {estimator!r}")
        mode = estimator

        def run(name: str, mix: np.ndarray, refs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            return oracle_estimates(mode, refs, mix)

        label = f"oracle {mode}"
    else:

        def run(name: str, mix: np.ndarray, refs: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            return estimator(name, mix)

        label = getattr(estimator, "__name__", type(estimator).__name__)
    scores: list[TrackScores] = []
    silent: list[tuple[str, str]] = []
    for i, folder in enumerate(tracks):
        mixture, refs, rate = load_track(folder, stems)
        estimates = {k: np.asarray(v, np.float32) for k, v in run(folder.name, mixture, refs).items()}
        got, quiet = score_track(folder.name, refs, estimates, sample_rate=rate)
        scores += got
        silent += [(folder.name, s) for s in quiet]
        if progress is not None:
            progress(folder.name, i + 1, len(tracks))
    title = title or f"demix evaluate: {label} on {Path(dataset).name}"
    paths = write_report(scores, silent, out, title=title)
    return EvalReport(scores=scores, silent=silent, medians=aggregate(scores), paths=paths)
