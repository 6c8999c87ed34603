"""The HTML reports without a browser: the run report (``OUT/report/``, local and on S3, rebuilt by
``demix report``), the evaluation report's box plot, sortable table and best / worst previews, and the
pieces they are made of. tests/test_report_browser.py opens the pages in Chromium."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import soundfile as sf

from demix.pipeline.batch.html import preview_start, rebuild_run_report, report_uri, write_run_report
from demix.pipeline.batch import manifest
from demix.pipeline.cli.main import main
from demix.pipeline.io.plots import boxplot_svg, preview_mp3
from demix.pipeline.learn.evaluate import evaluate_dataset
from demix.pipeline.learn.previews import PreviewPicker
from demix.pipeline.learn.report import write_report
from demix.pipeline.learn.scores import TrackScores
from report_fixtures import committed_run, musdb_dataset

pytest_plugins = ["conftest_services"]


def table_rows(page: str, ident: str) -> list[str]:
    """The body rows of the table ``id=ident`` of ``page``."""
    body = re.search(rf'<table id="{ident}"[^>]*>.*?<tbody>(.*?)</tbody>', page, re.S)
    assert body, f"no table {ident}"
    return re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)


def sources(page: str) -> list[str]:
    return re.findall(r'<(?:img|audio)[^>]* src="([^"]+)"', page)


def test_run_report_local(tmp_path, capsys):
    out = str(tmp_path / "run")
    made = committed_run(out, ok=3, failed=2)
    assert main(["report", out, "--samples", "2", "--preview-seconds", "5"]) == 0
    assert f"report: {report_uri(out)}" in capsys.readouterr().out
    page = Path(report_uri(out)).read_text()

    failures = table_rows(page, "failures")
    assert len(failures) == 2 and all("decode" in r for r in failures)
    assert "cannot decode &lt;em&gt;0&lt;/em&gt;" in page and "<em>" not in page, "messages are escaped"
    assert [re.findall(r"<td>(\w+)</td>", r)[0] for r in table_rows(page, "presence")] == ["vocals", "drums", "bass", "other"]
    assert "2 of 3" not in page and re.search(r"<td>other</td><td[^>]*>2</td><td[^>]*>3</td>", page)

    links = sources(page)
    assert len(links) == 2 * 2 * 5, "two sampled tracks: png + mp3 for the mixture and four stems"
    assert all("://" not in s and not s.startswith("/") for s in links), "relative links only"
    for link in links:
        f = tmp_path / "run" / "report" / unquote(link)
        assert f.is_file() and f.stat().st_size > 0, link
    mp3s = [tmp_path / "run" / "report" / unquote(s) for s in links if s.endswith(".mp3")]
    for path in mp3s:
        with sf.SoundFile(path) as clip:  # a short preview, never the whole 20 s stem
            assert 4.5 <= clip.frames / clip.samplerate <= 5.5, path
    assert {p.parent.name for p in mp3s} <= set(made["ok"])
    assert not re.search(r"https?://|<script[^>]+src=|<link[^>]+href=", page), "no network requests"


def test_rebuild_keeps_the_last_runs_counters(tmp_path):
    out = str(tmp_path / "run")
    committed_run(out, ok=2, failed=1)
    tables = manifest.read_manifests(out)
    summary = {
        "catalog_tracks": 7, "skipped_already_committed": 4, "interrupted": False, "processed_now": 3, "ok_now": 2,
        "failed_now": 1, "committed_ok_total": 2, "committed_failed_total": 1, "hours_of_audio_total": 0.01,
        "audio_seconds_now": 40.0, "wall_seconds_now": 8.0, "realtime_factor_now": 5.0, "model_stage": {},
        "manifests": {}, "presence": {}, "failures": [], "stage_seconds": {"plan": 1.25, "separate and commit": 8.0},
    }
    write_run_report(out, summary, tables, samples=0)
    uri, rebuilt = rebuild_run_report(out, samples=1, preview_s=3.0)
    assert (rebuilt["catalog_tracks"], rebuilt["skipped_already_committed"], rebuilt["ok_now"]) == (7, 4, 2)
    assert rebuilt["realtime_factor_now"] == 5.0 and len(rebuilt["failures"]) == 1, "committed rows read again"
    page = Path(uri).read_text()
    assert "5.00x" in page and "1350" in page, "real-time factor and tracks per hour of the last run"
    assert [re.sub("<[^>]+>", "", r).strip() for r in table_rows(page, "stages")][:2] == ["plan1.2", "separate and commit8.0"]
    assert json.loads(Path(out, "report", "summary.json").read_text())["catalog_tracks"] == 7


def test_a_sampled_track_whose_stem_is_gone(tmp_path):
    out = str(tmp_path / "run")
    committed_run(out, ok=1, failed=0)
    (stem,) = [r["uri"] for r in manifest.read_manifests(out)["stems"].to_pylist() if r["stem"] == "drums"]
    Path(stem).unlink()
    uri, _ = rebuild_run_report(out, samples=1, preview_s=3.0)
    page = Path(uri).read_text()
    assert page.count('class="error"') == 1 and "no preview" in page and "drums" in page
    assert len(sources(page)) == 2 * 4, "the other stems and the mixture still have their media"


def test_run_report_on_s3(s3):
    out = s3.uri("run")
    committed_run(out, ok=2, failed=1, seconds=8.0)
    uri, summary = rebuild_run_report(out, samples=2, preview_s=4.0)
    assert uri == f"{out}/report/index.html" and summary["committed_failed_total"] == 1
    keys = s3.keys("run/report")
    assert "run/report/index.html" in keys and "run/report/summary.json" in keys
    assert len([k for k in keys if k.endswith(".mp3")]) == 10 and not [k for k in keys if ".part" in k or "/.demix-" in k]
    fs = s3.fs
    page = fs.cat_file(f"{s3.name}/run/report/index.html").decode()
    assert len(table_rows(page, "failures")) == 1
    for link in sources(page):
        assert f"run/report/{unquote(link)}" in keys, link
    fs.invalidate_cache()  # info from a listing holds no content type: ask the object itself
    assert fs.info(f"{s3.name}/run/report/index.html")["ContentType"].startswith("text/html")
    mp3 = next(k for k in keys if k.endswith(".mp3"))
    assert fs.info(f"{s3.name}/{mp3}")["ContentType"] == "audio/mpeg", "static hosting serves clips as audio"


def test_report_of_an_empty_output(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 0
    assert "nothing is committed" in capsys.readouterr().out
    page = (tmp_path / "nothing" / "report" / "index.html").read_text()
    assert "Failures (0)" in page and "no committed track to sample" in page
    assert main(["report", str(tmp_path), "--samples", "-1"]) == 2


def test_preview_start_takes_the_most_active_window():
    segs = [[{"start_s": 30.0, "end_s": 50.0}], [{"start_s": 40.0, "end_s": 45.0}], None]
    assert preview_start(segs, 120.0, 10.0) == 35.0, "the first of the windows holding both segments"
    assert preview_start(segs, 8.0, 10.0) == 0.0, "a track shorter than the window"
    assert preview_start([[], None], 60.0, 10.0) == 0.0


def test_boxplot_is_matplotlib_svg_per_stem_and_model():
    svg = boxplot_svg({"unet": {"vocals": [1.0, 2.0, 3.0], "bass": []}, "irm": {"vocals": [5.0, 6.0], "bass": [math.inf, 1.0]}})
    assert svg.startswith("<svg") and svg.endswith("</svg>") and "matplotlib" in svg
    boxes = re.findall(r'<g class="box" data-stem="(\w+)" data-model="(\w+)"', svg)
    assert sorted(boxes) == [("bass", "irm"), ("vocals", "irm"), ("vocals", "unet")], "no box for an empty group"
    assert "n=5" in svg and "n=1" in svg and "median 5.50" in svg


def test_preview_mp3_at_any_rate():
    tone = (0.5 * np.sin(np.linspace(0, 2000, 2 * 11000))).astype(np.float32).reshape(1, -1).repeat(3, 0)
    data, rate = sf.read(io.BytesIO(preview_mp3(tone, 11000)))
    assert rate == 44100 and data.shape[1] == 2, "resampled to an MP3 rate, at most two channels"
    assert 1.9 < len(data) / rate < 2.2


def _scores(track: str, sdr: float) -> list[TrackScores]:
    return [TrackScores(track=track, stem="vocals", sdr=sdr, sir=0.0, sar=0.0, isr=0.0, si_sdr=0.0, frames=3)]


def test_preview_picker_keeps_only_the_best_and_worst():
    picker = PreviewPicker(k=1, seconds=1.0)
    rate, audio = 100, np.zeros((2, 500), np.float32)
    audio[:, 300:400] = 1.0  # the loudest second
    for name, sdr in [("a", 5.0), ("b", 1.0), ("c", 9.0), ("d", 3.0), ("e", math.nan)]:
        picker.offer(name, _scores(name, sdr), audio, {"vocals": audio}, {"vocals": audio}, rate)
        assert len(picker.kept) <= 2
    best, worst = picker.picked()
    assert [c.track for c in best] == ["c"] and [c.track for c in worst] == ["b"]
    assert best[0].start_s == 3.0 and best[0].mixture.shape == (2, 100), "a clip, never the whole track"
    with pytest.raises(ValueError, match="k must be >= 0"):
        PreviewPicker(k=-1)


def test_evaluation_report_previews_best_and_worst(tmp_path):
    musdb_dataset(tmp_path / "musdb", tracks=3, seconds=3.0)
    report = evaluate_dataset(tmp_path / "musdb", "mixture", out=tmp_path / "eval", previews=1, model="mixture")
    page = Path(report.paths["html"]).read_text()
    assert 'class="box"' in page and "data-model=\"mixture\"" in page
    rows = table_rows(page, "per-track")
    assert len(rows) == 3 and all(re.search(r'data-v="-?[0-9.]+', r) for r in rows), "sortable numeric cells"
    assert "<h2>Best tracks</h2>" in page and "<h2>Worst tracks</h2>" in page
    blocks = re.findall(r'<div class="track" data-track="([^"]+)"', page)
    means = {t: np.mean([s.sdr for s in report.scores if s.track == t]) for t in blocks}
    assert len(blocks) == 2 and means[blocks[0]] >= means[blocks[1]]
    links = sources(page)
    assert len(links) == 2 * 2 * (1 + 2 * 4), "per track: mixture, and reference + estimate of four stems"
    for link in links:
        assert (tmp_path / "eval" / unquote(link)).is_file(), link
    assert main(["evaluate", str(tmp_path / "musdb"), "-o", str(tmp_path / "x"), "--model", "irm", "--previews", "-1", "--no-progress"]) == 2


def test_evaluation_report_on_s3(s3):
    scores = _scores("a", 2.0) + _scores("b", math.inf)
    paths = write_report(scores, [("c", "vocals")], s3.uri("eval"), title="on S3", model="m")
    assert paths["html"] == s3.uri("eval/summary.html")
    assert s3.keys("eval") == ["eval/scores.parquet", "eval/summary.html", "eval/summary.md"]
    page = s3.fs.cat_file(f"{s3.name}/eval/summary.html").decode()
    assert 'data-v="Infinity"' in page and len(table_rows(page, "per-track")) == 3
