"""The reports opened in a real browser: Debian's headless Chromium driven by Playwright (its Python API
with ``executable_path`` on the system browser; Playwright's own browser downloads are never used).

For the run report and the evaluation report: no console errors, every image and audio source loads
(``naturalWidth > 0``, ``readyState >= 1``), no request leaves the report folder, the failures table has
one row per failed track, the per-track table sorts, and a screenshot is not blank.

``make test`` installs ``chromium`` (Makefile ``APT_PACKAGES``) and Playwright (the ``test`` extra) and
sets ``DEMIX_BROWSER_TESTS=required``, so there a missing browser fails instead of skipping.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from demix.pipeline.batch.html import rebuild_run_report
from demix.pipeline.learn.evaluate import evaluate_dataset
from report_fixtures import committed_run, musdb_dataset

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


def _browser_or_skip():
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why, sync_playwright = "playwright is not installed (the test extra)", None
    if CHROMIUM is None:
        why = why or "Debian's chromium is not installed (make system-deps)"
    if why:
        if os.environ.get("DEMIX_BROWSER_TESTS") == "required":
            pytest.fail(why)
        pytest.skip(why)
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        try:
            yield b
        finally:
            b.close()


def open_page(browser, path: Path):
    """Load ``path``; returns ``(page, console errors, URLs requested outside the report folder)``."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, outside = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    folder = path.parent.resolve().as_uri()
    page.on("request", lambda r: None if r.url.startswith(folder) else outside.append(r.url))
    page.goto(path.resolve().as_uri(), wait_until="load")
    page.wait_for_function(
        "[...document.images].every(i => i.complete)"
        " && [...document.querySelectorAll('audio')].every(a => a.readyState >= 1 || a.error)",
        timeout=60_000,
    )
    return page, errors, outside


def assert_media_loaded(page, images: int, clips: int) -> None:
    widths = page.evaluate("[...document.images].map(i => i.naturalWidth)")
    states = page.evaluate("[...document.querySelectorAll('audio')].map(a => [a.readyState, a.duration, a.error && a.error.code])")
    assert len(widths) == images and all(w > 0 for w in widths), widths
    assert len(states) == clips and all(s[0] >= 1 and s[1] > 0 and s[2] is None for s in states), states


def assert_not_blank(page) -> None:
    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L"), np.float32)
    assert shot.shape[0] >= 900 and shot.std() > 10, "the screenshot is blank"
    assert (shot < 128).mean() > 0.02, "hardly anything dark on the page"


def test_run_report_in_chromium(browser, tmp_path):
    out = tmp_path / "run"
    made = committed_run(str(out), ok=3, failed=2, seconds=12.0)
    uri, _ = rebuild_run_report(str(out), samples=2, preview_s=4.0)
    page, errors, outside = open_page(browser, Path(uri))
    assert not errors and not outside, (errors, outside)
    assert_media_loaded(page, images=10, clips=10)
    rows = page.eval_on_selector_all("#failures tbody tr", "rows => rows.map(r => r.cells[0].textContent)")
    assert sorted(rows) == sorted(made["failed"]), "one row per failed track"
    assert page.locator(".timeline span").count() > 0, "presence timelines drawn"
    assert_not_blank(page)
    page.close()


def test_evaluation_report_in_chromium(browser, tmp_path):
    musdb_dataset(tmp_path / "musdb", tracks=3, seconds=3.0)
    report = evaluate_dataset(tmp_path / "musdb", "irm", out=tmp_path / "eval", previews=1, model="irm")
    page, errors, outside = open_page(browser, Path(report.paths["html"]))
    assert not errors and not outside, (errors, outside)
    assert_media_loaded(page, images=2 * 9, clips=2 * 9)
    assert page.locator("svg g.box").count() == 4, "one box per stem"
    column = "rows => rows.map(r => parseFloat(r.cells[1].dataset.v))"
    page.click("#per-track th:nth-child(2)")
    up = page.eval_on_selector_all("#per-track tbody tr", column)
    page.click("#per-track th:nth-child(2)")
    down = page.eval_on_selector_all("#per-track tbody tr", column)
    assert up == sorted(up) and down == sorted(up, reverse=True) and len(up) == 3
    assert_not_blank(page)
    page.close()
