"""Evaluation reports: ``scores.parquet`` (one row per track x stem), ``summary.md`` and ``summary.html``."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from demix.pipeline.learn.scores import METRICS, TrackScores, aggregate
from demix.pipeline import markdown
from demix.pipeline.stems import SILENCE_DBFS


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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = list(scores)
    silent = list(silent)
    paths = {"scores": str(out / "scores.parquet"), "markdown": str(out / "summary.md"), "html": str(out / "summary.html")}
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
    Path(paths["markdown"]).write_text(_markdown(title, note, summary, stems, per_track), encoding="utf-8")
    plot = svg_boxplot({st: [s.sdr for s in scores if s.stem == st] for st in stems})
    Path(paths["html"]).write_text(_html(title, note, summary, stems, per_track, plot), encoding="utf-8")
    return paths


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
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _markdown(title: str, note: str, summary: list[list[str]], stems: list[str], per_track: list[list[str]]) -> str:
    md = [f"# {title}", "", note, "", "## Median per stem", "", markdown.table(_HEADER, summary), ""]
    if per_track:
        md += ["## SDR per track", "", markdown.table(["track"] + stems, per_track), ""]
    return "\n".join(md)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows_html = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>"


def _html(
    title: str, note: str, summary: list[list[str]], stems: list[str], per_track: list[list[str]], plot: str
) -> str:
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
        _html_table(_HEADER, summary),
        "<h2>SDR per track and stem</h2>",
        plot,
    ]
    if per_track:
        page += ["<h2>SDR per track</h2>", _html_table(["track"] + stems, per_track)]
    page.append("</body></html>")
    return "\n".join(page)
