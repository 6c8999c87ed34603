"""Building one remix example (:func:`build_example`, run on the Ray layer by the flow): the recipient's
stems over the example's window, the tempo-closest donor candidate, the donor's stem looped in whole
bars, gains and peak limiting, and the files in MUSDB layout. See :mod:`demix.pipeline.batch.remix`.
A weak recipe (:mod:`demix.pipeline.batch.remix.weak`) is built by :func:`_build_weak`: the recipient's
original excerpt, a labelled donor's true stem, ``mixture``/``<S>``/``rest`` and ``weak.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import torch

from demix.pipeline.batch.remix.plan import WEAK_REST, Recipe, StemSource
from demix.pipeline.engine import TrackError
from demix.pipeline.errors import stage_of
from demix.pipeline.io import AtomicOutput, join, read_slice, write_float_wav
from demix.pipeline.stems import QUIET_DBFS


def _read(uri: str, start: int, frames: int | None, rate: int) -> tuple[np.ndarray, int]:
    """``(channels, time)`` float32 and the file's rate of ``uri`` from frame ``start`` (``frames`` of them,
    or the rest when ``None``), frames counted at ``rate`` (the rate the manifest gives)."""
    return read_slice(uri, start / rate, None if frames is None else frames / rate)


def estimate_tempo(audio: np.ndarray, sample_rate: int, *, low_bpm: float = 70.0, high_bpm: float = 180.0) -> float | None:
    """Tempo in BPM of ``(channels, time)`` audio from the autocorrelation of its spectral-flux onset
    envelope (hop 512), weighted towards 120 BPM; ``None`` when the audio is silent or too short."""
    mono = torch.from_numpy(np.asarray(audio, np.float32).mean(0))
    hop = 512
    if mono.numel() < 8 * 2048 or float(mono.abs().max()) == 0.0:
        return None
    spec = torch.stft(mono, 2048, hop, window=torch.hann_window(2048), return_complex=True).abs()
    logspec = torch.log1p(100.0 * spec)
    flux = torch.relu(logspec[:, 1:] - logspec[:, :-1]).sum(0).numpy().astype(np.float64)
    flux -= flux.mean()
    if not np.any(flux):
        return None
    n = len(flux)
    ac = np.fft.irfft(np.abs(np.fft.rfft(flux, 2 * n)) ** 2)[:n]
    frame_rate = sample_rate / hop
    lags = np.arange(max(1, int(frame_rate * 60 / high_bpm)), min(n - 1, int(frame_rate * 60 / low_bpm)) + 1)
    if len(lags) < 2:
        return None
    bpm = 60.0 * frame_rate / lags
    weight = np.exp(-0.5 * (np.log2(bpm / 120.0) / 1.0) ** 2)
    best = lags[int(np.argmax(ac[lags] * weight))]
    # parabolic refinement of the peak
    a, b, c = ac[best - 1], ac[best], ac[min(best + 1, n - 1)]
    shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) != 0 else 0.0
    return float(60.0 * frame_rate / (best + float(np.clip(shift, -0.5, 0.5))))


def tempo_distance(a: float | None, b: float | None) -> float:
    """Distance in octaves between two tempi, octave errors folded (``inf`` when one is unknown)."""
    if not a or not b:
        return math.inf
    d = abs(math.log2(a / b)) % 1.0
    return min(d, 1.0 - d)


def loop_to_length(x: np.ndarray, length: int, sample_rate: int, fade_s: float = 0.01) -> np.ndarray:
    """Repeat ``x`` ``(channels, n)`` to ``length`` samples with ``fade_s`` crossfades at the seams."""
    n = x.shape[-1]
    if n >= length:
        return x[:, :length].copy()
    fade = min(int(fade_s * sample_rate), n // 4)
    out = np.zeros((x.shape[0], length), np.float32)
    out[:, :n] = x
    pos = n
    ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32) if fade else np.zeros(0, np.float32)
    while pos < length:
        start = pos - fade  # overlap the seam by `fade` samples
        take = min(n, length - start)
        piece = x[:, :take].copy()
        if fade:
            k = min(fade, take)
            out[:, start : start + k] *= 1.0 - ramp[:k]
            piece[:, :k] *= ramp[:k]
        out[:, start : start + take] += piece
        pos = start + take
    return out


def example_uri(recipe: Recipe, name: str) -> str:
    return join(recipe.out, recipe.split, recipe.example_id, f"{name}.wav")


def build_example(recipe: Recipe) -> dict:
    """Read, mix and write one example; return its ``remixes`` row (see :data:`demix.pipeline.batch.remix.plan.REMIXES_SCHEMA`).

    Raises:
        demix.pipeline.engine.TrackError: naming the example and the stage (read, decode, remix, write).
    """
    try:
        return _build_weak(recipe) if recipe.kind == "weak" else _build(recipe)
    except TrackError:
        raise
    except Exception as err:  # noqa: BLE001 - one typed, staged error per example
        raise TrackError(recipe.example_id, stage_of(err, "remix"), err) from err


def _build(recipe: Recipe) -> dict:
    rec = {s: StemSource.from_dict(v) for s, v in recipe.recipient.items()}
    rate = next(iter(rec.values())).sample_rate
    length = int(round(recipe.seconds * rate))
    stems, lineage, channels = _read_recipient(recipe, rec, rate, length)
    rec_tempo = _recipient_tempo(stems, rate)
    donor, donor_tempo = _choose_donor(recipe, rec_tempo, rate)
    stems[recipe.target_stem], lineage[recipe.target_stem] = _donor_loop(donor, donor_tempo, rate, length, channels)
    scale = _apply_gains(recipe, stems)
    for s in recipe.stems:
        if s not in stems:
            stems[s] = np.zeros((channels, length), np.float32)
            lineage[s] = {"role": "silent", "source_track_id": None, "source_stem_uri": None, "offset_s": None, "loop_s": None,
                          "active_s": 0.0}
    mix = np.zeros((channels, length), np.float32)
    for s in recipe.stems:
        mix += stems[s]
    with AtomicOutput() as staged:
        for name, audio in [("mixture", mix), *((s, stems[s]) for s in recipe.stems)]:
            write_float_wav(staged.path_for(example_uri(recipe, name)), audio, rate)  # fixed bytes: no PEAK time stamp
        staged.commit()
    return _row(recipe, next(iter(rec.values())).track_id, donor.track_id, (rec_tempo, donor_tempo), lineage,
                length, rate, 20 * math.log10(scale))


def _read_recipient(
    recipe: Recipe, rec: dict[str, StemSource], rate: int, length: int
) -> tuple[dict[str, np.ndarray], dict[str, dict], int]:
    """The recipient's sounding stems over the example's window (target stem excluded), padded to
    ``length``: ``(stems, lineage, channels)``."""
    start = int(round(recipe.offset_s * rate))
    stems: dict[str, np.ndarray] = {}
    lineage: dict[str, dict] = {}
    channels = 2
    for s in recipe.stems:
        src = rec.get(s)
        if s == recipe.target_stem or src is None or not src.present:
            continue
        audio, r = _read(src.uri, start, length, rate)
        channels = audio.shape[0]
        stems[s] = np.pad(audio, ((0, 0), (0, length - audio.shape[-1])))
        window = (recipe.offset_s, recipe.offset_s + recipe.seconds)
        active = sum(max(0.0, min(b, window[1]) - max(a, window[0])) for a, b in src.segments)
        lineage[s] = {"role": "recipient", "source_track_id": src.track_id, "source_stem_uri": src.uri,
                      "offset_s": recipe.offset_s, "loop_s": None, "active_s": round(active, 4)}
    return stems, lineage, channels


def _recipient_tempo(stems: dict[str, np.ndarray], rate: int) -> float | None:
    """Tempo of the recipient: its drums when present, else the sum of what it has."""
    beat_ref = stems.get("drums")
    if beat_ref is None and stems:
        beat_ref = sum(stems.values())
    return estimate_tempo(beat_ref, rate) if beat_ref is not None else None


def _choose_donor(recipe: Recipe, rec_tempo: float | None, rate: int) -> tuple[StemSource, float | None]:
    """The donor candidate whose tempo is closest to ``rec_tempo`` (the first on a tie), and its tempo."""
    best, best_d, donor_tempo = 0, math.inf, None
    for i, (d, beat_uri) in enumerate(zip(recipe.donors, recipe.donor_beats)):
        try:
            audio, r = _read(beat_uri or d["uri"], 0, min(int(60 * rate), int(d["duration_s"] * rate)), rate)
            tempo = estimate_tempo(audio, r)
        except Exception:  # noqa: BLE001 - an unreadable candidate is just not preferred; the chosen donor is read below
            tempo = None
        dist = tempo_distance(rec_tempo, tempo)
        if i == 0 or dist < best_d:
            best, best_d, donor_tempo = i, dist, tempo
    return StemSource.from_dict(recipe.donors[best]), donor_tempo


def _donor_loop(
    donor: StemSource, donor_tempo: float | None, rate: int, length: int, channels: int
) -> tuple[np.ndarray, dict]:
    """The donor's stem from its longest active segment, cut to whole bars and looped to ``length``
    samples with ``channels`` channels; and its lineage."""
    seg = max(donor.segments, key=lambda ab: ab[1] - ab[0])
    seg_len = seg[1] - seg[0]
    bar = 4 * 60.0 / donor_tempo if donor_tempo else None
    loop_s = seg_len if not bar or seg_len < bar else math.floor(seg_len / bar) * bar
    audio, r = _read(donor.uri, int(round(seg[0] * rate)), max(1, int(round(loop_s * rate))), rate)
    if audio.shape[0] != channels:
        audio = np.repeat(audio.mean(0, keepdims=True), channels, 0)
    lineage = {"role": "donor", "source_track_id": donor.track_id, "source_stem_uri": donor.uri,
               "offset_s": seg[0], "loop_s": loop_s if loop_s * rate < length else None,
               "active_s": round(length / rate, 4)}  # cut from one active segment
    return loop_to_length(audio, length, rate), lineage


def _apply_gains(recipe: Recipe, stems: dict[str, np.ndarray]) -> float:
    """Scale each stem by its planned gain, then all alike so the mixture peaks at most at
    ``recipe.peak`` (in place); returns that common scale."""
    gains = {s: 10 ** (recipe.gains_db[s] / 20) for s in stems}
    for s in stems:
        stems[s] = (stems[s] * np.float32(gains[s])).astype(np.float32)
    peak = float(max((np.abs(sum(stems.values())).max() if stems else 0.0), 1e-12))
    scale = min(1.0, recipe.peak / peak)
    for s in list(stems):
        stems[s] = (stems[s] * np.float32(scale)).astype(np.float32)
    return scale


def _row(
    recipe: Recipe, recipient_id: str, donor_id: str, tempi: tuple[float | None, float | None], lineage: dict[str, dict],
    length: int, rate: int, scale_db: float,
) -> dict:
    """The example's ``remixes`` row (:data:`demix.pipeline.batch.remix.plan.REMIXES_SCHEMA`)."""
    return {
        "example_id": recipe.example_id, "index": recipe.index, "split": recipe.split,
        "mixture_uri": example_uri(recipe, "mixture"), "target_stem": recipe.target_stem,
        "recipient_track_id": recipient_id, "donor_track_id": donor_id,
        "recipient_tempo_bpm": tempi[0], "donor_tempo_bpm": tempi[1], "duration_s": length / rate,
        "sample_rate": rate, "seed": recipe.seed, "plan_digest": recipe.plan_digest, "run_uri": recipe.run_uri,
        "stems": [
            {"stem": s, "uri": example_uri(recipe, s), **lineage[s],
             "gain_db": (recipe.gains_db[s] + scale_db) if lineage[s]["role"] != "silent" else None}
            for s in recipe.stems
        ],
    }


# ---------------------------------------------------------------------------------------- weak kind


def _active_span(audio: np.ndarray, rate: int, frame_s: float = 0.05) -> tuple[float, float]:
    """``(start_s, end_s)`` of the longest run of frames louder than ``QUIET_DBFS`` and within 40 dB of
    the loudest frame (the whole audio when none is)."""
    hop = max(1, int(frame_s * rate))
    n = audio.shape[-1] // hop
    if n == 0:
        return 0.0, audio.shape[-1] / rate
    rms = np.sqrt(np.square(audio[:, : n * hop].reshape(audio.shape[0], n, hop)).mean((0, 2)) + 1e-20)
    db = 20 * np.log10(rms)
    active = (db > QUIET_DBFS) & (db > db.max() - 40.0)
    best, run, best_end = 0, 0, 0
    for i, on in enumerate(active):
        run = run + 1 if on else 0
        if run > best:
            best, best_end = run, i + 1
    if best == 0:
        return 0.0, audio.shape[-1] / rate
    return (best_end - best) * hop / rate, best_end * hop / rate


def _weak_donor(donor: StemSource, donor_tempo: float | None, rate: int, length: int, channels: int) -> tuple[np.ndarray, dict]:
    """The labelled donor's stem: its longest active stretch cut to whole bars, at ``rate`` with
    ``channels`` channels, looped to ``length``; and its lineage."""
    audio, r = read_slice(donor.uri)
    a, b = _active_span(audio, r)
    bar = 4 * 60.0 / donor_tempo if donor_tempo else None
    loop_s = b - a if not bar or b - a < bar else math.floor((b - a) / bar) * bar
    audio = audio[:, int(round(a * r)) : int(round(a * r)) + max(1, int(round(loop_s * r)))]
    if r != rate:
        import torchaudio.functional as AF  # lazy: heavy, needed only when the labelled songs have another rate

        audio = AF.resample(torch.from_numpy(np.ascontiguousarray(audio)), r, rate).numpy()
    if audio.shape[0] != channels:
        audio = np.repeat(audio.mean(0, keepdims=True), channels, 0)
    lineage = {"role": "donor", "source_track_id": donor.track_id, "source_stem_uri": donor.uri, "offset_s": round(a, 6),
               "loop_s": loop_s if loop_s * rate < length else None, "active_s": round(length / rate, 4)}
    return loop_to_length(np.asarray(audio, np.float32), length, rate), lineage


def _build_weak(recipe: Recipe) -> dict:
    """One weak example (see :mod:`demix.pipeline.batch.remix.weak`): read, mix, write, return its row."""
    try:
        excerpt, rate = read_slice(recipe.mixture_uri, recipe.offset_s, recipe.seconds)
    except Exception as err:  # noqa: BLE001 - named: the recipient's source audio could not be read
        raise TrackError(recipe.example_id, stage_of(err, "read"), RuntimeError(f"recipient audio {recipe.mixture_uri}: {err}")) from err
    length = int(round(recipe.seconds * rate))
    channels = excerpt.shape[0]
    rest = np.pad(excerpt, ((0, 0), (0, length - excerpt.shape[-1]))).astype(np.float32)
    rec_tempo = estimate_tempo(rest, rate)
    donor, donor_tempo = _choose_donor(recipe, rec_tempo, rate)
    stem = recipe.target_stem
    parts = {WEAK_REST: rest}
    parts[stem], donor_lineage = _weak_donor(donor, donor_tempo, rate, length, channels)
    scale_db = 20 * math.log10(_apply_gains(recipe, parts))
    mix = parts[WEAK_REST] + parts[stem]
    recipient = next(iter(recipe.recipient.values()))["track_id"]
    marker = {"known": [stem], "rest_of": [s for s in recipe.stems if s != stem], "rest": WEAK_REST,
              "recipient_track_id": recipient, "donor_track_id": donor.track_id, "labelled": recipe.labelled}
    with AtomicOutput() as staged:
        for name, audio in (("mixture", mix), (stem, parts[stem]), (WEAK_REST, parts[WEAK_REST])):
            write_float_wav(staged.path_for(example_uri(recipe, name)), audio, rate)
        with open(staged.path_for(join(recipe.out, recipe.split, recipe.example_id, "weak.json")), "w", encoding="utf-8") as f:
            f.write(json.dumps(marker, sort_keys=True))
        staged.commit()
    rest_lineage = {"role": "recipient", "source_track_id": recipient, "source_stem_uri": recipe.mixture_uri,
                    "offset_s": recipe.offset_s, "loop_s": None, "active_s": round(length / rate, 4)}
    row = _row(dataclasses.replace(recipe, stems=()), recipient, donor.track_id, (rec_tempo, donor_tempo), {}, length, rate, scale_db)
    row["stems"] = [
        {"stem": name, "uri": example_uri(recipe, name), **lineage, "gain_db": recipe.gains_db[name] + scale_db}
        for name, lineage in ((stem, donor_lineage), (WEAK_REST, rest_lineage))
    ]
    return row
