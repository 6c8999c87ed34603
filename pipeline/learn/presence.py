"""Presence from true stems: reference activity, labelled examples, training and scoring of the detectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from demix.models.presence import PresenceNet
from demix.models.weights import save
from demix.pipeline import markdown
from demix.pipeline.data import MusdbDataset
from demix.pipeline.engine import (
    FRAME_S, Detector, Features, FrameFeatures, Presence, PresenceError, Segment, SeparationSettings,
    classifier_inputs, features_of, runs, separate, smooth, to_db,
)
from demix.pipeline.io import conform
from demix.pipeline.stems import MIXTURE, STEMS


# --------------------------------------------------------------------------------------------------
# Reference activity (for training and scoring on data with true stems)
# --------------------------------------------------------------------------------------------------

REFERENCE_FLOOR_DBFS = -50.0
"""A true stem is active in a frame when its power (smoothed over 0.15 s) is above this."""


def reference_activity(stem: np.ndarray, sample_rate: int, frame_s: float = FRAME_S) -> np.ndarray:
    """Boolean per frame: where a *true* stem ``(channels, time)`` sounds (for labels and scores)."""
    acc = FrameFeatures(("stem",), sample_rate, frame_s)
    acc.push(torch.as_tensor(np.asarray(stem, np.float32))[None])
    p = smooth(acc.finish().power("stem").astype(np.float64), max(1, round(0.15 / frame_s)))
    return to_db(p) > REFERENCE_FLOOR_DBFS


def reference_segments(stem: np.ndarray, sample_rate: int, frame_s: float = FRAME_S) -> tuple[Segment, ...]:
    """Segments of a true stem (no minimum durations)."""
    act = reference_activity(stem, sample_rate, frame_s)
    return tuple(Segment(a * frame_s, min(b * frame_s, stem.shape[-1] / sample_rate)) for a, b in runs(act))


# --------------------------------------------------------------------------------------------------
# Labelled data, training and scoring (synthetic multitrack songs with true stems)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledExample:
    """Features of one separated song (or of a variant with stems left out) and its truth.

    ``labels[stem]`` is the per-frame reference activity of the true stem (all False when absent).
    """

    name: str
    features: Features
    present: dict[str, bool]
    labels: dict[str, np.ndarray]


def separated_features(separator, mixture: np.ndarray, sample_rate: int, settings=None) -> Features:
    """Separate ``mixture`` ``(channels, time)`` with ``separator`` and return the frame features of
    its sources and of their sum (the ``mixture`` signal, as the catalog run computes it)."""
    x = conform(mixture, sample_rate, target_rate=separator.sample_rate, target_channels=separator.audio_channels)
    est = separate(separator, x, settings or SeparationSettings())
    signals = {s: est[i] for i, s in enumerate(separator.sources)}
    signals[MIXTURE] = est.sum(0)
    return features_of(signals, separator.sample_rate)


def labelled_examples(dataset, separator, *, dropped_variants: int = 0, seed: int = 0, settings=None,
                      progress=None) -> list[LabelledExample]:
    """Separate every song of a MUSDB-layout ``dataset`` and label its frames from the true stems.

    ``dropped_variants`` more examples per song leave one or two of its present stems out of the
    mixture (the mixture is rebuilt as the sum of the stems kept), so absent stems are common.
    """
    data = MusdbDataset(dataset)
    rng = np.random.default_rng(seed)
    out: list[LabelledExample] = []
    for i, track in enumerate(data.tracks):
        audio = data.load(i)
        truth = {s: bool(track.present.get(s, True)) if track.present else True for s in STEMS}
        labels = {s: reference_activity(audio[s], track.sample_rate) & truth[s] for s in STEMS}
        truth = {s: truth[s] and bool(labels[s].any()) for s in STEMS}
        variants = [(track.name, truth)]
        for k in range(dropped_variants):
            present = [s for s in STEMS if truth[s]]
            if len(present) < 2:
                break
            drop = set(rng.choice(present, size=int(rng.integers(1, min(2, len(present) - 1) + 1)), replace=False).tolist())
            variants.append((f"{track.name}~drop{k}", {s: truth[s] and s not in drop for s in STEMS}))
        for name, keep in variants:
            if keep == truth:
                mix = audio["mixture"]
            else:  # the stems kept, summed
                mix = sum((audio[s] for s in STEMS if keep[s]), np.zeros_like(audio["mixture"]))
            feats = separated_features(separator, mix, track.sample_rate, settings)
            lab = {s: _fit(labels[s] & keep[s], len(feats.bands)) for s in STEMS}
            out.append(LabelledExample(name, feats, dict(keep), lab))
        if progress is not None:
            progress(i + 1, len(data.tracks))
    return out


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    return np.pad(x, (0, max(0, n - len(x))))[:n]


def train_classifier(examples: Sequence[LabelledExample], *, steps: int = 1500, batch_size: int = 16, crop_frames: int = 200,
                     lr: float = 3e-3, seed: int = 0, hidden: int = 64, layers: int = 4, log=None):
    """Train a :class:`demix.models.presence.PresenceNet` on frame labels (BCE), deterministic per seed."""
    if not examples:
        raise PresenceError("no labelled examples to train on")
    sources = STEMS
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PresenceNet(sources, hidden=hidden, layers=layers)
    inputs = [classifier_inputs(e.features, sources)[0] for e in examples]
    targets = [torch.from_numpy(np.stack([e.labels[s] for s in sources]).astype(np.float32)) for e in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for step in range(steps):
        xs, ys = [], []
        for _ in range(batch_size):
            j = int(torch.randint(len(inputs), (1,), generator=gen))
            n = inputs[j].shape[-1]
            a = int(torch.randint(max(1, n - crop_frames + 1), (1,), generator=gen))
            x, y = inputs[j][:, a : a + crop_frames], targets[j][:, a : a + crop_frames]
            pad = crop_frames - x.shape[-1]
            xs.append(torch.nn.functional.pad(x, (0, pad)))
            ys.append(torch.nn.functional.pad(y, (0, pad)))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(torch.stack(xs)), torch.stack(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log({"step": step, "loss": float(loss.detach())})
    return model.eval()


@dataclass(frozen=True)
class PresenceScores:
    """Per stem: track-level precision/recall/F1 of *present* and of *absent*, and frame-level F1 of
    the active segments (over tracks where the stem is present)."""

    per_stem: dict[str, dict[str, float]]


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def segments_to_frames(segments: Sequence[Segment], frames: int, frame_s: float) -> np.ndarray:
    out = np.zeros(frames, bool)
    for s in segments:
        out[int(round(s.start_s / frame_s)) : int(round(s.end_s / frame_s))] = True
    return out


def score_presence(predicted: Sequence[tuple[str, str, Presence]], truth: Mapping[tuple[str, str], bool],
                   reference_frames: Mapping[tuple[str, str], np.ndarray], frame_s: float = FRAME_S) -> PresenceScores:
    """Score ``(track, stem, Presence)`` predictions against ``truth[(track, stem)]`` and frame references."""
    per: dict[str, dict[str, float]] = {}
    stems = sorted({s for _, s, _ in predicted})
    for stem in stems:
        rows = [(t, p) for t, s, p in predicted if s == stem]
        tp = sum(p.present and truth[(t, stem)] for t, p in rows)
        fp = sum(p.present and not truth[(t, stem)] for t, p in rows)
        fn = sum((not p.present) and truth[(t, stem)] for t, p in rows)
        tn = len(rows) - tp - fp - fn
        precision, recall, f1 = _prf(tp, fp, fn)
        a_p, a_r, a_f1 = _prf(tn, fn, fp)
        ftp = ffp = ffn = 0
        for t, p in rows:
            ref = reference_frames.get((t, stem))
            if ref is None or not truth[(t, stem)]:
                continue
            est = segments_to_frames(p.segments, len(ref), frame_s)
            ftp += int((est & ref).sum())
            ffp += int((est & ~ref).sum())
            ffn += int((~est & ref).sum())
        per[stem] = {
            "tracks": len(rows), "present": tp + fn, "absent": tn + fp, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": precision, "recall": recall, "f1": f1,
            "absent_precision": a_p, "absent_recall": a_r, "absent_f1": a_f1,
            "frame_f1": _prf(ftp, ffp, ffn)[2],
        }
    return PresenceScores(per)


@dataclass
class PresenceReport:
    """What :func:`evaluate_presence` found: scores per detector and stem, and the files written."""

    scores: dict[str, PresenceScores]
    paths: dict[str, str]


def evaluate_presence(dataset, separator, detectors: Mapping[str, Detector], *, out, settings=None, progress=None) -> PresenceReport:
    """Score presence detectors on a MUSDB-layout ``dataset`` whose ``truth.json`` says which stems
    each song has (without one, a stem counts as present when its file is not silent).

    Every song is separated once with ``separator``; each detector then judges the same features.
    Writes ``OUT/presence_scores.parquet`` (detector x stem), ``OUT/presence_predictions.parquet``
    (detector x track x stem, with segments) and ``OUT/presence.md``.
    """
    examples = labelled_examples(dataset, separator, settings=settings, progress=progress)
    truth = {(e.name, s): e.present[s] for e in examples for s in e.present}
    refs = {(e.name, s): e.labels[s] for e in examples for s in e.labels}
    scores, rows = {}, []
    for name, detector in detectors.items():
        predicted = []
        for e in examples:
            for stem, p in detector(e.features, tuple(e.present)).items():
                predicted.append((e.name, stem, p))
                rows.append({"detector": name, "track": e.name, "stem": stem, "truth": truth[(e.name, stem)],
                             "present": p.present, "presence_score": p.score, "active_segments": p.segment_dicts()})
        scores[name] = score_presence(predicted, truth, refs)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"scores": str(folder / "presence_scores.parquet"), "predictions": str(folder / "presence_predictions.parquet"),
             "markdown": str(folder / "presence.md")}
    flat = [{"detector": d, "stem": s, **m} for d, sc in scores.items() for s, m in sc.per_stem.items()]
    pq.write_table(pa.Table.from_pylist(flat), paths["scores"])
    pq.write_table(pa.Table.from_pylist(rows), paths["predictions"])
    lines = [f"# demix evaluate --presence: {getattr(separator, 'registry_name', type(separator).__name__)} on {dataset}", "",
             f"{len(examples)} songs. Track level: precision / recall / F1 of *present* (and F1 of *absent*); "
             "frame F1: active segments against the true stem's activity (50 ms frames, present stems only).", "",
             _scores_table(flat)]
    Path(paths["markdown"]).write_text("\n".join(lines) + "\n")
    return PresenceReport(scores, paths)


def _scores_table(flat: Sequence[Mapping]) -> str:
    """The Markdown table of ``presence.md``: one row per detector and stem."""
    header = ["detector", "stem", "present / absent", "precision", "recall", "F1", "absent F1", "frame F1"]
    rows = [[r["detector"], r["stem"], f"{r['present']} / {r['absent']}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
             f"{r['f1']:.3f}", f"{r['absent_f1']:.3f}", f"{r['frame_f1']:.3f}"] for r in flat]
    return markdown.table(header, rows, align="lllrrrrr")


def save_classifier(model, folder) -> tuple[str, str]:
    """Write ``folder/presence-<sha8>.safetensors`` (float32; 0.2 MB); returns ``(path, sha256)``."""
    path, digest = save({k: v.float() for k, v in model.state_dict().items()}, folder, "presence")
    return str(path), digest
