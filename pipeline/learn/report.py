"""Evaluation reports: ``scores.parquet`` (one row per track x stem), ``summary.md`` and ``summary.html`` (box
plots, a sortable per-track table, previews of the best and worst tracks under ``media/``)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from demix.pipeline import markdown
from demix.pipeline.io import join
from demix.pipeline.io.pages import Raw, esc, num, page, publish, table
from demix.pipeline.io.plots import boxplot_svg
from demix.pipeline.learn.previews import PreviewPicker, TrackClips, write_previews
from demix.pipeline.learn.scores import METRICS, TrackScores, aggregate
from demix.pipeline.stems import MIXTURE, SILENCE_DBFS


@dataclass
class EvalReport:
    """What :func:`demix.pipeline.learn.evaluate.evaluate_dataset` found: per-track scores, silent stems, per-stem medians, files."""

    scores: list[TrackScores]
    silent: list[tuple[str, str]]
    medians: dict[str, dict[str, float]]
    paths: dict[str, str] = field(default_factory=dict)


def _schema() -> pa.Schema:
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


def svg_boxplot(groups: Mapping[str, Sequence[float]], *, label: str = "SDR (dB)") -> str:
    """An inline SVG box plot, one box per group (matplotlib, see
    :func:`demix.pipeline.io.plots.boxplot_svg`): quartile box, median, whiskers to the furthest value
    within 1.5 IQR, outliers as dots. Non-finite values are left out; an empty group is labelled ``n=0``."""
    return boxplot_svg({"": groups}, label=label)


def write_report(
    scores: Sequence[TrackScores], silent: Sequence[tuple[str, str]], out: str | Path, *, title: str,
    model: str | None = None, previews: PreviewPicker | None = None,
) -> dict[str, str]:
    """Write ``OUT/scores.parquet``, ``OUT/summary.md`` and ``OUT/summary.html``; return their paths.

    The Parquet file has one row per track x stem, silent stems included (``silent=true``, null
    metrics), with the explicit schema of :func:`_schema`. The summaries hold one row per stem
    (median over tracks of the per-track medians) and a per-track SDR table; the HTML page (static, no
    network requests) adds a box plot of the per-track SDR per stem and ``model``, sorts the per-track
    table by any column, and plays the clips of the best and worst tracks ``previews`` kept (estimate
    and reference side by side; MP3 and spectrograms under ``OUT/media/``). ``out`` may be any URI.
    """
    out = str(out)
    scores = list(scores)
    silent = list(silent)
    paths = {"scores": join(out, "scores.parquet"), "markdown": join(out, "summary.md"), "html": join(out, "summary.html")}
    _write_scores(scores, silent, paths["scores"], title=title)

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
    publish(paths["markdown"], _markdown(title, note, summary, stems, per_track))
    plot = boxplot_svg({model or "": {st: [s.sdr for s in scores if s.stem == st] for st in stems}})
    best, worst = previews.picked() if previews is not None else ([], [])
    listen = {c.track: write_previews(out, c) for c in best + worst}
    rows = [[t, num(_mean([sdr[(t, st)] for st in stems if (t, st) in sdr]))] + [
        num(sdr[(t, st)]) if (t, st) in sdr else "silent" for st in stems] for t in tracks]
    parts = [
        f"<p>{esc(note)}</p>", "<h2>Median per stem</h2>", table(_HEADER, summary, ident="medians"),
        "<h2>SDR per track and stem</h2>", Raw(plot),
        "<h2>SDR per track</h2>", '<p class="note">click a column to sort</p>',
        table(["track", "mean SDR", *stems], rows, cls="sortable", ident="per-track"),
        _previews_html("Best tracks", best, listen), _previews_html("Worst tracks", worst, listen),
    ]
    publish(paths["html"], page(title, parts))
    return paths


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _media(links: dict[str, str] | None) -> str:
    if not links:
        return "<div></div>"
    return (
        f'<div><img src="{links["png"]}" alt="spectrogram" width="320" height="96">'
        f'<audio controls preload="metadata" src="{links["mp3"]}"></audio></div>'
    )


def _previews_html(heading: str, clips: list[TrackClips], listen: dict[str, dict]) -> str:
    """One block per track: the mixture, then per stem its reference and estimate side by side."""
    if not clips:
        return ""
    parts = [f"<h2>{esc(heading)}</h2>"]
    for c in clips:
        links = listen[c.track]
        parts.append(
            f'<div class="track" data-track="{esc(c.track)}"><b>{esc(c.track)}</b> <span class="note">mean SDR '
            f"{c.mean_sdr:.2f} dB; {c.mixture.shape[-1] / c.rate:.1f} s from {c.start_s:.0f} s</span>"
            f'<div class="pair"><span></span><b>reference</b><b>estimate</b>'
            f"<span>mixture</span>{_media(links.get(MIXTURE))}<div></div>"
        )
        for stem, value in c.sdr.items():
            parts.append(
                f"<span>{esc(stem)}<br>SDR {value:.2f} dB</span>"
                f"{_media(links.get(f'{stem}-reference'))}{_media(links.get(f'{stem}-estimate'))}"
            )
        parts.append("</div></div>")
    return "".join(parts)


def _write_scores(scores: list[TrackScores], silent: list[tuple[str, str]], path: str, *, title: str) -> None:
    """``scores.parquet``: one row per track x stem, silent stems last with null metrics."""
    rows = [
        {"track": s.track, "stem": s.stem, "silent": False, "frames": s.frames,
         **{m: getattr(s, m) for m in METRICS}}
        for s in scores
    ] + [
        {"track": t, "stem": st, "silent": True, "frames": 0, **{m: None for m in METRICS}} for t, st in silent
    ]
    schema = _schema().with_metadata({"title": title, "description": SCORES_SCHEMA_DOC})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    publish(path, buf.getvalue())


def _markdown(title: str, note: str, summary: list[list[str]], stems: list[str], per_track: list[list[str]]) -> str:
    md = [f"# {title}", "", note, "", "## Median per stem", "", markdown.table(_HEADER, summary), ""]
    if per_track:
        md += ["## SDR per track", "", markdown.table(["track"] + stems, per_track), ""]
    return "\n".join(md)
