"""Weak remix examples (``demix remix --labelled``) through the real flow (Prefect's ephemeral API, a local
Ray instance): an unlabelled track's ORIGINAL excerpt where a stem is silent plus a labelled song's true stem.

The unlabelled run is test_remix_flow's tone catalog separated by ``test-bands`` with the energy detector;
the labelled donors are toy songs in MUSDB layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from demix.pipeline.stems import STEMS
from test_datasets import make_musdb
from test_remix_flow import RATE, SECONDS, _stems_by_track, separated, tone_catalog  # noqa: F401 - fixtures reused

pytest_plugins = ["conftest_services"]
pytestmark = pytest.mark.timeout(300)

EXAMPLE_S = 1.5
MARGIN_S = 0.25


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Three labelled songs; song "b" has no vocals (truth.json), so it never donates vocals."""
    return make_musdb(tmp_path_factory.mktemp("labelled"), ("a", "b", "c"), seconds=4.0, rate=RATE, truth=True,
                      silent={"b": ("vocals",)})


def _read(path) -> np.ndarray:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == RATE
    return data.T


@pytest.fixture(scope="module")
def weak_out(separated, labelled, tmp_path_factory) -> tuple[Path, dict]:  # noqa: F811 - the fixture imported above
    from demix.flows.build_remix_dataset import build_remix_dataset

    run, _ = separated
    out = tmp_path_factory.mktemp("weak")
    summary = build_remix_dataset(run_uri=run, out=str(out), examples=5, seed=2, seconds=EXAMPLE_S, labelled=str(labelled),
                                  workers_count=1, shard_size=2, progress=False)
    return out, summary


def test_weak_examples_are_exact_sums_of_the_original_excerpt_and_a_true_stem(separated, labelled, tone_catalog, weak_out):  # noqa: F811
    run, _ = separated
    out, summary = weak_out
    assert (summary["built_now"], summary["failed_now"], summary["committed_total"]) == (5, 0, 5)
    rows = pq.read_table(out / "manifests" / "remixes.parquet").to_pylist()
    got = _stems_by_track(run)
    names = {v["drums"]["track_id"]: k for k, v in got.items()}
    seen = set()
    for r in rows:
        assert r["example_id"].startswith("wk-") and r["duration_s"] == pytest.approx(EXAMPLE_S, abs=1e-3)
        target, recipient = r["target_stem"], names[r["recipient_track_id"]]
        seen.add((recipient, target))
        parts = {s["stem"]: s for s in r["stems"]}
        assert set(parts) == {target, "rest"}
        folder = out / "train" / r["example_id"]
        assert sorted(p.name for p in folder.iterdir()) == sorted(["mixture.wav", f"{target}.wav", "rest.wav", "weak.json"])
        marker = json.loads((folder / "weak.json").read_text())
        assert marker["known"] == [target] and marker["rest_of"] == [s for s in STEMS if s != target]
        mix, added, rest = _read(folder / "mixture.wav"), _read(folder / f"{target}.wav"), _read(folder / "rest.wav")
        np.testing.assert_allclose(mix, rest + added, rtol=0, atol=1e-7)  # the mixture is exactly what is known
        assert np.abs(added).max() > 0.01 and np.abs(rest).max() > 0.01
        # rest is the recipient's ORIGINAL audio (the catalog file, not a separated stem) with its gain
        offset, gain = parts["rest"]["offset_s"], 10 ** (parts["rest"]["gain_db"] / 20)
        assert parts["rest"]["role"] == "recipient" and parts["rest"]["source_stem_uri"].endswith(f"{recipient}.wav")
        source = _read(tone_catalog / f"{recipient}.wav")[:, int(round(offset * RATE)) : int(round(offset * RATE)) + rest.shape[1]]
        np.testing.assert_allclose(rest, source * gain, rtol=0, atol=1e-5)
        # ... and its window lies where the target stem is inactive per the committed presence segments
        for seg in got[recipient][target]["active_segments"] or []:
            assert offset + EXAMPLE_S <= seg["start_s"] - MARGIN_S + 1e-6 or offset >= seg["end_s"] + MARGIN_S - 1e-6, (recipient, target, offset, seg)
        # the added stem is a labelled song's true stem, named in the lineage
        donor = parts[target]
        assert donor["role"] == "donor" and donor["source_track_id"] == r["donor_track_id"] in ("a", "b", "c")
        assert donor["source_stem_uri"] == str((labelled / r["donor_track_id"] / f"{target}.wav").resolve())
        assert not (target == "vocals" and r["donor_track_id"] == "b")  # truth.json: b has no vocals
        true = _read(donor["source_stem_uri"])
        start, n = int(round(donor["offset_s"] * RATE)), int(0.2 * RATE)
        np.testing.assert_allclose(added[:, :n], true[:, start : start + n] * 10 ** (donor["gain_db"] / 20), rtol=0, atol=1e-5)
    # vocals of "novocals", bass of "nobass" (absent: whole track) and other of "nobass" after 4 s;
    # "full"'s vocal gaps are shorter than an example, and no track lacks drums
    assert seen == {("novocals", "vocals"), ("nobass", "bass"), ("nobass", "other")}
    assert json.loads((out / "train" / "truth.json").read_text()) == {}  # weak.json, not truth.json, says what is known


def test_weak_rerun_is_exactly_once_and_the_reader_takes_every_example(separated, labelled, weak_out):  # noqa: F811
    from demix.flows.build_remix_dataset import build_remix_dataset
    from demix.pipeline.data.weak import WeakDataset

    run, _ = separated
    out, _ = weak_out
    again = build_remix_dataset(run_uri=run, out=str(out), examples=5, seed=2, seconds=EXAMPLE_S, labelled=str(labelled),
                                workers_count=1, shard_size=2, progress=False)
    assert (again["built_now"], again["skipped_already_committed"], again["committed_total"]) == (0, 5, 5)
    data = WeakDataset(out / "train")
    assert len(data) == 5 and all(ex.frames == int(EXAMPLE_S * RATE) for ex in data.examples)


def test_weak_plan_refuses_when_no_window_is_long_enough(separated, labelled, tmp_path):  # noqa: F811
    from demix.pipeline.batch import manifest
    from demix.pipeline.batch.remix import RemixConfig, RemixError, plan_weak, stem_sources

    run, _ = separated
    tables = manifest.read_manifests(run)
    sources = stem_sources(tables["stems"], tables["tracks"])
    with pytest.raises(RemixError, match="silent for 7 s"):
        plan_weak(sources, tables["tracks"], str(labelled), RemixConfig(examples=1, seconds=SECONDS + 1), run_uri=run, out=str(tmp_path))
