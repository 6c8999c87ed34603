"""The catalog run's HTML report, ``OUT/report/``: ``index.html`` (the run's numbers, time per stage,
the failures, presence counts per stem, a gallery of a few sampled tracks), ``summary.json`` (the
summary it was made from, so ``demix report`` can rebuild it) and ``media/<track_id>/`` (per stem of a
sampled track a spectrogram thumbnail and a short MP3 preview, never the whole stem).

Cheap for catalogs of thousands of tracks: the numbers come from the consolidated manifests; audio is
read only for the ``samples`` sampled tracks, ``preview_s`` seconds of each stem and of the mixture.
Every file goes through :func:`demix.pipeline.io.pages.publish` (local or object store), the page
last, so a page never names media that is not there yet; links are relative.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from demix.pipeline.batch import manifest, report as reports
from demix.pipeline.io import AudioError, StorageError, filesystem, join, read_slice
from demix.pipeline.io.pages import Raw, cards, esc, href, num, page, publish, table, timeline
from demix.pipeline.io.plots import preview_mp3, spectrogram_png
from demix.pipeline.stems import MIXTURE, STEMS

REPORT_DIR = "report"
SAMPLES = 4
"""Tracks in the gallery by default."""
PREVIEW_S = 12.0
"""Seconds of each preview clip by default."""
FAILURES_SHOWN = 10000
"""Failure rows on the page (all are in ``failures.parquet``)."""


def report_uri(out: str) -> str:
    """Where the run report of the output root ``out`` is: ``OUT/report/index.html``."""
    return join(out, REPORT_DIR, "index.html")


@dataclass
class Sample:
    """One gallery track: its manifest row, preview window, and per stem (mixture first) the media
    written (``{"png", "mp3"}`` relative to the report), its stems row, or the error that stopped it."""

    track: dict
    start_s: float
    length_s: float
    media: dict[str, dict] = field(default_factory=dict)
    rows: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def sample_tracks(tracks: pa.Table, n: int) -> list[dict]:
    """``n`` committed-ok tracks, the same ones for the same ids whatever the catalog order: those whose
    id hashes lowest (a new track joins the sample only when its hash is lower)."""
    ok = [r for r in tracks.to_pylist() if r["status"] == "ok"]
    ok.sort(key=lambda r: hashlib.sha1(r["track_id"].encode()).hexdigest())
    return ok[: max(0, n)]


def preview_start(segments: Sequence[Sequence[dict] | None], duration_s: float, length_s: float) -> float:
    """The start (whole seconds) of the ``length_s`` window with the most active stem-seconds."""
    if duration_s <= length_s:
        return 0.0
    starts = np.arange(0.0, duration_s - length_s + 1e-9, 1.0)
    active = np.zeros_like(starts)
    for segs in segments:
        for s in segs or ():
            active += np.clip(np.minimum(s["end_s"], starts + length_s) - np.maximum(s["start_s"], starts), 0, None)
    return float(starts[int(np.argmax(active))])


def _clip(uri: str, start_s: float, length_s: float) -> tuple[bytes, np.ndarray, int]:
    audio, rate = read_slice(uri, start_s, length_s)
    if not audio.size:
        raise AudioError(uri, f"{uri}: nothing to preview from {start_s:.1f} s", stage="read")
    return preview_mp3(audio, rate), audio, rate


def _gallery(root: str, samples: list[Sample], jobs: int) -> None:
    """Read and encode each preview (threads: decoding and LAME release the GIL), then draw its
    spectrogram (here: matplotlib is not thread-safe) and publish both under ``root/media``."""
    todo = [(s, name, uri) for s in samples for name, uri in [(MIXTURE, s.track["source_uri"])]
            + [(k, r["uri"]) for k, r in s.rows.items()]]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(_clip, uri, s.start_s, s.length_s) for s, _, uri in todo]
        for (s, name, uri), fut in zip(todo, futures):
            try:
                mp3, audio, rate = fut.result()
                folder = ("media", s.track["track_id"])
                publish(join(root, *folder, f"{name}.mp3"), mp3)
                publish(join(root, *folder, f"{name}.png"), spectrogram_png(audio, rate))
                s.media[name] = {"mp3": href(*folder, f"{name}.mp3"), "png": href(*folder, f"{name}.png")}
            except (AudioError, StorageError) as err:  # the page says why, the rest of the report stands
                s.errors[name] = str(err)


def write_run_report(
    out: str, summary: Mapping, tables: Mapping[str, pa.Table], *, samples: int = SAMPLES,
    preview_s: float = PREVIEW_S, jobs: int = 4,
) -> str:
    """Write ``OUT/report/`` for ``summary`` (:func:`~demix.pipeline.batch.report.catalog_summary`'s) and
    the consolidated ``tables``; returns the page's URI. A sampled track whose audio cannot be read any
    more (moved, removed by ``demix gc``) is shown with the error instead of its media.

    Raises:
        StorageError: a report file cannot be written.
    """
    root = join(out, REPORT_DIR)
    stems_of: dict[str, dict[str, dict]] = {}
    for r in tables["stems"].to_pylist():
        stems_of.setdefault(r["track_id"], {})[r["stem"]] = r
    chosen = []
    for track in sample_tracks(tables["tracks"], samples):
        rows = stems_of.get(track["track_id"], {})
        duration = track["duration_s"] or 0.0
        start = preview_start([r["active_segments"] for r in rows.values()], duration, preview_s)
        chosen.append(Sample(track, start, min(preview_s, duration) or preview_s, rows=rows))
    _gallery(root, chosen, jobs)
    publish(join(root, "summary.json"), json.dumps(dict(summary), indent=1, default=str))
    uri = join(root, "index.html")
    publish(uri, run_page(summary, tables["tracks"], chosen, out=out))
    return uri


def rebuild_run_report(out: str, **options) -> tuple[str, dict]:
    """``demix report``: the report of what is committed under ``out`` now, with the last run's counters
    (``OUT/report/summary.json``, when a run wrote one); returns ``(page URI, summary)``."""
    tables = manifest.read_manifests(out)
    paths = {k: join(manifest.manifests_root(out), manifest.FILES.get(k, f"{k}.parquet")) for k in tables}
    last = _last_summary(out) or {}
    stats = {
        "ok": last.get("ok_now", 0), "failed": last.get("failed_now", 0), "audio_s": last.get("audio_seconds_now", 0.0),
        "wall_s": last.get("wall_seconds_now", 0.0), "interrupted": last.get("interrupted", False),
        "model_stage": last.get("model_stage") or {},
    }
    total = last.get("catalog_tracks", tables["tracks"].num_rows)
    summary = reports.catalog_summary(tables, paths, total, last.get("skipped_already_committed", 0), stats)
    summary["stage_seconds"] = last.get("stage_seconds") or {}
    return write_run_report(out, summary, tables, **options), summary


def _last_summary(out: str) -> dict | None:
    uri = join(out, REPORT_DIR, "summary.json")
    fs, path = filesystem(uri)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - one typed error out
        raise StorageError(uri, f"{type(err).__name__}: {err}", stage="read") from err


def _headline(summary: Mapping, tracks: pa.Table) -> str:
    rtf = summary.get("realtime_factor_now") or 0.0
    wall = summary.get("wall_seconds_now") or 0.0
    items = [
        ("tracks in catalog", summary["catalog_tracks"]),
        ("separated (last run)", summary["ok_now"]),
        ("failed (last run)", summary["failed_now"]),
        ("skipped (already committed)", summary["skipped_already_committed"]),
        ("committed ok / failed (all runs)", f"{summary['committed_ok_total']} / {summary['committed_failed_total']}"),
        ("hours of audio (committed)", f"{summary['hours_of_audio_total']:.3f}"),
        ("real-time factor (last run)", f"{rtf:.2f}x" if wall else "n/a"),
        ("tracks per hour (last run)", f"{3600 * summary['processed_now'] / wall:.0f}" if wall else "n/a"),
    ]
    note = (
        f'<p class="note">Output: {esc(summary.get("out", ""))} · models: '
        f'{esc(", ".join(sorted({m for m in tracks.column("model").to_pylist() if m})) or "n/a")} · written '
        f'{time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}'
        f'{" · interrupted: rerun to resume" if summary.get("interrupted") else ""}</p>'
    )
    return note + cards(items)


def _stages(summary: Mapping, tracks: pa.Table) -> str:
    rows = [(name, num(seconds, "{:.1f}")) for name, seconds in (summary.get("stage_seconds") or {}).items()]
    if summary.get("model_stage"):
        rows.append(("model stage (last run)", reports.model_stage_line(summary["model_stage"])))
    ok = [r for r in tracks.to_pylist() if r["status"] == "ok" and r["elapsed_s"] is not None]
    if ok:
        elapsed = np.array([r["elapsed_s"] for r in ok])
        audio = sum(r["duration_s"] or 0.0 for r in ok)
        rows += [
            ("per track: median / 95th percentile (s)", f"{np.median(elapsed):.2f} / {np.percentile(elapsed, 95):.2f}"),
            ("per track: seconds of work per second of audio", f"{elapsed.sum() / audio:.3f}" if audio else "n/a"),
        ]
    head = "<h2>Time per stage</h2>"
    if not rows:
        return head + '<p class="note">no timings recorded</p>'
    return head + table(("stage", "seconds"), rows, ident="stages")


def _failures(summary: Mapping) -> str:
    failures = summary["failures"]
    head = f"<h2>Failures ({len(failures)})</h2>"
    if not failures:
        return head + '<p class="note">none</p>'
    rows = [
        (f["source_uri"], f["stage"], f"{f['error_type']}: {f['message']}") for f in failures[:FAILURES_SHOWN]
    ]
    more = f'<p class="note">first {FAILURES_SHOWN} of {len(failures)}; all are in failures.parquet</p>' if len(failures) > FAILURES_SHOWN else ""
    return head + table(("file", "stage", "error"), rows, cls="sortable", ident="failures") + more


def _presence(summary: Mapping) -> str:
    rows = []
    for stem, c in sorted(summary["presence"].items(), key=lambda kv: _stem_order(kv[0])):
        share = c["present"] / c["tracks"] if c["tracks"] else 0.0
        bar = Raw(f'<td><span class="bar" style="width:{120 * share:.0f}px"></span> {100 * share:.0f}%</td>')
        rows.append((stem, num(c["present"], "{:d}"), num(c["tracks"], "{:d}"), bar))
    head = "<h2>Presence per stem (committed)</h2>"
    if not rows:
        return head + '<p class="note">no presence verdicts recorded</p>'
    return head + table(("stem", "present", "judged", "share"), rows, ident="presence")


def _stem_order(stem: str) -> tuple[int, str]:
    return (STEMS.index(stem) if stem in STEMS else len(STEMS), stem)


def _stem_card(s: Sample, name: str) -> str:
    row = s.rows.get(name)
    if row is None:
        label = f"{name} (source)"
    else:
        verdict = {True: "present", False: "absent", None: "not judged"}[row["present"]]
        label = f"{name}: {verdict}" + (f", score {row['presence_score']:.2f}" if row["presence_score"] is not None else "")
    parts = [f'<div class="stem" data-stem="{esc(name)}"><b>{esc(label)}</b>']
    if row is not None:
        parts.append(timeline(row["active_segments"], s.track["duration_s"] or row["duration_s"] or 0.0))
    else:
        parts.append('<div class="timeline" title="the source: no presence timeline"></div>')
    media = s.media.get(name)
    if media:
        parts.append(f'<img src="{media["png"]}" alt="spectrogram of {esc(name)}" width="320" height="96">')
        parts.append(f'<audio controls preload="metadata" src="{media["mp3"]}"></audio>')
    else:
        parts.append(f'<p class="error">no preview: {esc(s.errors.get(name, "not read"))}</p>')
    return "".join(parts) + "</div>"


def _gallery_html(samples: list[Sample]) -> str:
    head = f"<h2>Sampled tracks ({len(samples)})</h2>"
    if not samples:
        return head + '<p class="note">no committed track to sample</p>'
    parts = [head]
    for s in samples:
        t = s.track
        parts.append(
            f'<div class="track" data-track="{esc(t["track_id"])}"><b>{esc(t["source_uri"])}</b> '
            f'<span class="note">{(t["duration_s"] or 0):.1f} s, preview {s.start_s:.0f}–{s.start_s + s.length_s:.0f} s; '
            f'timelines: active segments over the whole track</span><div class="stems">'
            + "".join(_stem_card(s, name) for name in [MIXTURE, *sorted(s.rows, key=_stem_order)]) + "</div></div>"
        )
    return "".join(parts)


def run_page(summary: Mapping, tracks: pa.Table, samples: list[Sample], *, out: str = "") -> str:
    """The report page of one catalog run (see the module docstring)."""
    summary = {"out": out, **summary}
    return page(
        "demix run report",
        [_headline(summary, tracks), _stages(summary, tracks), _failures(summary), _presence(summary), _gallery_html(samples)],
    )
