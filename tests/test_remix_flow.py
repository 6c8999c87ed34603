"""Presence in the catalog flow, the remix flow and the exports, end to end through the real services
(Prefect's ephemeral API, a local Ray instance, moto's S3 for one run).

The catalog is made of tones that ``test-bands`` (tests/demix_test_models.py) routes to known stems:
110 Hz -> bass, 300 Hz -> vocals, 1000 Hz -> drums, 2500 Hz -> other. A track without a tone has that
stem absent; a gated tone has known active segments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

pytest_plugins = ["conftest_services"]
pytestmark = pytest.mark.timeout(300)

RATE = 8000
FREQ = {"bass": 110.0, "vocals": 300.0, "drums": 1000.0, "other": 2500.0}
SECONDS = 6.0
# track -> stem -> active spans (None: the whole track); a stem not listed is absent
TRACKS = {
    "full": {"bass": None, "vocals": [(0.5, 2.0), (3.0, 5.5)], "drums": None, "other": None},
    "novocals": {"bass": None, "drums": None, "other": None},
    "nobass": {"vocals": None, "drums": None, "other": [(1.0, 4.0)]},
    "full2": {"bass": None, "vocals": None, "drums": None, "other": None},
}


def _tone(freq: float, spans) -> np.ndarray:
    t = np.arange(int(SECONDS * RATE)) / RATE
    x = 0.15 * np.sin(2 * np.pi * freq * t)
    if spans is not None:
        gate = np.zeros_like(t)
        for a, b in spans:
            gate[(t >= a) & (t < b)] = 1.0
        x *= np.convolve(gate, np.ones(40) / 40, mode="same")
    return x


@pytest.fixture(scope="module")
def tone_catalog(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tones")
    for name, stems in TRACKS.items():
        mix = sum(_tone(FREQ[s], spans) for s, spans in stems.items())
        sf.write(folder / f"{name}.wav", np.stack([mix, mix], 1).astype(np.float32), RATE, subtype="FLOAT")
    return folder


@pytest.fixture(scope="module")
def separated(tone_catalog, tmp_path_factory, ray_cluster, prefect_api) -> tuple[str, dict]:
    """One committed catalog run with presence (energy detector: test-bands is not the classifier's separator)."""
    from demix.flows.separate_catalog import separate_catalog

    out = str(tmp_path_factory.mktemp("run"))
    summary = separate_catalog(
        catalog=str(tone_catalog), out=out, model="test-bands", registry_module="demix_test_models",
        settings={"segment": 1.0}, encoding={"bit_depth": "32f"}, workers_count=1, shard_size=2, progress=False,
        presence="energy",
    )
    return out, summary


def _stems_by_track(out: str) -> dict[str, dict[str, dict]]:
    from demix.pipeline.batch import manifest

    tables = manifest.read_manifests(out)
    ids = {r["track_id"]: Path(r["source_uri"]).stem for r in tables["tracks"].to_pylist()}
    got: dict[str, dict[str, dict]] = {}
    for r in tables["stems"].to_pylist():
        got.setdefault(ids[r["track_id"]], {})[r["stem"]] = r
    return got


def test_catalog_flow_fills_presence_columns(separated):
    out, summary = separated
    assert summary["ok_now"] == len(TRACKS)
    assert summary["presence"] == {
        s: {"present": sum(s in t for t in TRACKS.values()), "tracks": len(TRACKS)} for s in FREQ
    }
    got = _stems_by_track(out)
    for name, stems in TRACKS.items():
        for stem in FREQ:
            row = got[name][stem]
            assert row["present"] is (stem in stems), (name, stem, row["present"], row["presence_score"])
            assert (row["presence_score"] >= 0.5) is row["present"]
    for name, stem in [("full", "vocals"), ("nobass", "other")]:
        segs = [(s["start_s"], s["end_s"]) for s in got[name][stem]["active_segments"]]
        assert len(segs) == len(TRACKS[name][stem])
        for (a, b), (x, y) in zip(segs, TRACKS[name][stem]):
            assert abs(a - x) <= 0.1 and abs(b - y) <= 0.1, (name, stem, segs)
    # the consolidated Parquet carries the same columns for pandas / DuckDB
    table = pq.read_table(Path(out) / "manifests" / "stems.parquet")
    assert table.schema.field("active_segments").type.value_type.names == ["start_s", "end_s"]
    assert table.column("present").null_count == 0


def _remix(run: str, out: str, **kw) -> dict:
    from demix.flows.build_remix_dataset import build_remix_dataset

    return build_remix_dataset(run_uri=run, out=out, **{"examples": 4, "seed": 3, "workers_count": 1, "shard_size": 2, "progress": False, **kw})


def _read(path) -> np.ndarray:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == RATE
    return data


def test_remix_lineage_exact_mixture_and_musdb_layout(separated, tmp_path):
    from demix.pipeline.data import MusdbDataset

    run, _ = separated
    out = tmp_path / "remix"
    summary = _remix(run, str(out))
    assert (summary["built_now"], summary["failed_now"], summary["committed_total"]) == (4, 0, 4)
    rows = pq.read_table(out / "manifests" / "remixes.parquet").to_pylist()
    assert len(rows) == 4 and len({r["example_id"] for r in rows}) == 4
    got = _stems_by_track(run)
    by_id = {v["vocals"]["track_id"]: k for k, v in got.items()}
    for r in rows:
        recipient = by_id[r["recipient_track_id"]]
        target = r["target_stem"]
        assert (recipient, target) in {("novocals", "vocals"), ("nobass", "bass")}
        assert by_id[r["donor_track_id"]] != recipient and target in TRACKS[by_id[r["donor_track_id"]]]
        assert r["seed"] == 3 and r["sample_rate"] == RATE and r["duration_s"] == pytest.approx(SECONDS, abs=1e-3)
        stems = {s["stem"]: s for s in r["stems"]}
        assert stems[target]["role"] == "donor" and stems[target]["source_track_id"] == r["donor_track_id"]
        assert stems[target]["offset_s"] is not None and stems[target]["gain_db"] is not None
        for s, lineage in stems.items():
            if s == target:
                continue
            present = s in TRACKS[recipient]
            assert lineage["role"] == ("recipient" if present else "silent")
            if present:
                assert lineage["source_track_id"] == r["recipient_track_id"] and -3.0 - 6.1 <= lineage["gain_db"] <= 3.0
        # the mixture is exactly the sum of its stems
        mix = _read(r["mixture_uri"])
        total = np.zeros_like(mix)
        for s in ("vocals", "drums", "bass", "other"):
            total += _read(stems[s]["uri"])
        np.testing.assert_array_equal(mix, total)
        assert np.abs(mix).max() <= 0.95 + 1e-6
        # the donor's stem holds the donor's tone (and only it): its band model route is known
        donor = _read(stems[target]["uri"])[:, 0]
        spectrum = np.abs(np.fft.rfft(donor))
        assert abs(np.argmax(spectrum) * RATE / len(donor) - FREQ[target]) < 2.0
    data = MusdbDataset(out / "train")
    assert len(data) == 4
    truth = json.loads((out / "train" / "truth.json").read_text())
    assert truth == {r["example_id"]: {s["stem"]: s["role"] != "silent" for s in r["stems"]} for r in rows}
    for r in rows:  # whole-track examples: a recipient stem sounds as long as its committed segments say
        for lineage in r["stems"]:
            if lineage["role"] == "recipient":
                stem_row = got[by_id[r["recipient_track_id"]]][lineage["stem"]]
                assert lineage["active_s"] == pytest.approx(sum(x["end_s"] - x["start_s"] for x in stem_row["active_segments"]), abs=1e-3)
            elif lineage["role"] == "silent":
                assert lineage["active_s"] == 0.0


def test_remix_is_deterministic_exactly_once_and_extends(separated, tmp_path):
    run, _ = separated
    a, b = tmp_path / "a", tmp_path / "b"
    _remix(run, str(a), examples=2)
    again = _remix(run, str(a), examples=2)  # a rerun: nothing new, nothing duplicated
    assert (again["built_now"], again["skipped_already_committed"], again["committed_total"]) == (0, 2, 2)
    more = _remix(run, str(a))  # four now: the first two stay, two more are built
    assert (more["built_now"], more["skipped_already_committed"], more["committed_total"]) == (2, 2, 4)
    _remix(run, str(b))
    rows_a = pq.read_table(a / "manifests" / "remixes.parquet").drop(["attempt", "mixture_uri", "stems", "run_uri"]).to_pylist()
    rows_b = pq.read_table(b / "manifests" / "remixes.parquet").drop(["attempt", "mixture_uri", "stems", "run_uri"]).to_pylist()
    assert rows_a == rows_b
    files_a = sorted(p.relative_to(a) for p in (a / "train").rglob("*.wav"))
    assert files_a == sorted(p.relative_to(b) for p in (b / "train").rglob("*.wav")) and len(files_a) == 4 * 5
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    other = tmp_path / "c"
    _remix(run, str(other), seed=4)
    rows_c = pq.read_table(other / "manifests" / "remixes.parquet").to_pylist()
    assert [r["example_id"] for r in rows_c] != [r["example_id"] for r in pq.read_table(a / "manifests" / "remixes.parquet").to_pylist()]


def test_remix_refuses_a_run_without_presence(tmp_path, ray_cluster, prefect_api, tone_catalog):
    from demix.flows.separate_catalog import separate_catalog
    from demix.pipeline.batch.remix import RemixError

    out = str(tmp_path / "run")
    separate_catalog(catalog=str(tone_catalog), out=out, model="test-bands", registry_module="demix_test_models",
                     settings={"segment": 1.0}, workers_count=1, shard_size=4, progress=False, presence="none")
    with pytest.raises(RemixError, match="presence"):
        _remix(out, str(tmp_path / "remix"))


def test_exports_round_trip(separated, tmp_path):
    import pandas as pd

    from demix.pipeline.batch.export import export_lyrics, export_transcription

    run, _ = separated
    uri, n = export_lyrics(run, str(tmp_path / "lyrics"))
    clips = pd.read_parquet(uri)
    assert len(clips) == n
    got = _stems_by_track(run)
    by_id = {v["vocals"]["track_id"]: k for k, v in got.items()}
    # full: vocals 0.5-2.0 and 3.0-5.5 (gap 1 s: joined into one clip); nobass and full2: whole track; novocals: none
    spans = {by_id[t]: list(zip(g.start_s, g.end_s)) for t, g in clips.groupby("track_id")}
    assert sorted(spans) == ["full", "full2", "nobass"]
    assert len(spans["full"]) == 1 and spans["full"][0][0] == pytest.approx(0.4, abs=0.12) and spans["full"][0][1] == pytest.approx(5.6, abs=0.12)
    for row in clips.itertuples():
        data, rate = sf.read(row.clip_uri, always_2d=True)
        assert rate == row.sample_rate and len(data) == pytest.approx(row.duration_s * rate, abs=1)
        assert 3.0 - 1e-6 <= row.duration_s <= 30.0
        source = _read(row.stem_uri)[int(round(row.start_s * rate)) : int(round(row.end_s * rate))]
        np.testing.assert_allclose(data, source, atol=2 / 32768)
    uri, n = export_transcription(run, str(tmp_path / "tx"))
    tx = pd.read_parquet(uri)
    assert len(tx) == n
    expect = sorted((k, s) for k, stems in TRACKS.items() for s in stems if s in ("bass", "other", "vocals"))
    assert sorted((by_id[t], s) for t, s in zip(tx.track_id, tx.stem)) == expect
    row = tx[(tx.track_id == got["nobass"]["other"]["track_id"]) & (tx.stem == "other")].iloc[0]
    assert [(round(s["start_s"], 1), round(s["end_s"], 1)) for s in row.active_segments] == [(1.0, 4.0)]
    # DuckDB reads the same files, nested segments included
    import duckdb

    assert duckdb.sql(f"select count(*) from '{tmp_path / 'lyrics' / 'lyrics.parquet'}'").fetchall() == [(len(clips),)]
    segs = duckdb.sql(
        f"select track_id, stem, unnest(active_segments, recursive := true) from '{uri}' order by all"
    ).fetchall()
    assert len(segs) == sum(len(x) for x in tx.active_segments)


def test_export_uris_are_absolute_from_a_relative_out(separated, tmp_path, monkeypatch, capsys):
    """Issue 15, item 6: `demix export -o RELATIVE` writes absolute clip and stem URIs, so the
    manifests read from any working directory."""
    import pandas as pd

    from demix.pipeline.cli import main

    run, _ = separated
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    assert main(["export", "--task", "lyrics", run, "-o", "exports/lyrics", "--no-progress"]) == 0
    assert main(["export", "--task", "transcription", run, "-o", "exports/tx"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(elsewhere)
    clips = pd.read_parquet(work / "exports" / "lyrics" / "lyrics.parquet")
    tx = pd.read_parquet(work / "exports" / "tx" / "transcription.parquet")
    assert len(clips) and len(tx)
    for uri in [*clips.clip_uri, *clips.stem_uri, *tx.uri]:
        assert os.path.isabs(uri), uri
        assert sf.info(uri).frames > 0
    assert all(uri.startswith(str(work / "exports" / "lyrics" / "clips") + "/") for uri in clips.clip_uri)


def test_remixes_manifest_reads_in_duckdb(separated, tmp_path):
    import duckdb

    run, _ = separated
    _remix(run, str(tmp_path / "r"), examples=2)
    path = tmp_path / "r" / "manifests" / "remixes.parquet"
    rows = duckdb.sql(
        f"select example_id, s.stem, s.role, s.source_track_id, s.gain_db from '{path}', unnest(stems) as t(s) order by all"
    ).fetchall()
    assert len(rows) == 2 * 4 and {r[2] for r in rows} <= {"recipient", "donor", "silent"}


def test_remix_writes_to_s3(separated, s3):
    """The remix flow writes its dataset and manifests to S3 (moto) and a rerun there is exactly once."""
    from demix.pipeline.batch.remix import consolidated

    run, _ = separated
    summary = _remix(run, s3.uri("remix"), examples=2)
    assert summary["built_now"] == 2
    keys = s3.keys("remix")
    assert "remix/manifests/remixes.parquet" in keys and "remix/train/truth.json" in keys
    assert sum(k.endswith("/mixture.wav") for k in keys) == 2
    again = _remix(run, s3.uri("remix"), examples=2)
    assert again["built_now"] == 0 and consolidated(s3.uri("remix"))[0].num_rows == 2


def test_remix_bad_stem_is_a_failure_row_and_a_rerun_completes(tmp_path, ray_cluster, prefect_api, tone_catalog):
    """A recipient stem that cannot be read fails its examples (stage read, the example named), the
    others are committed; once the file is back, a rerun builds only the failed ones."""
    from demix.flows.separate_catalog import separate_catalog
    from demix.pipeline.batch.remix import consolidated

    run = str(tmp_path / "run")
    separate_catalog(catalog=str(tone_catalog), out=run, model="test-bands", registry_module="demix_test_models",
                     settings={"segment": 1.0}, workers_count=1, shard_size=4, progress=False, presence="energy")
    ids = {k: v["drums"]["track_id"] for k, v in _stems_by_track(run).items()}
    victim = Path(_stems_by_track(run)["nobass"]["drums"]["uri"])
    kept = victim.read_bytes()
    victim.write_bytes(b"not audio")
    out = str(tmp_path / "remix")
    first = _remix(run, out, examples=6)
    rows, failures = consolidated(out)
    recipients = {r["example_id"]: r["recipient_track_id"] for r in rows.to_pylist()}
    assert first["failed_now"] == failures.num_rows > 0 and first["built_now"] == rows.num_rows > 0
    for f in failures.to_pylist():
        assert f["stage"] in ("read", "decode") and f["track_id"] in f["message"] and "drums.wav" in f["message"]
    assert ids["nobass"] not in recipients.values()
    victim.write_bytes(kept)
    second = _remix(run, out, examples=6)
    assert (second["built_now"], second["failed_now"], second["skipped_already_committed"]) == (first["failed_now"], 0, first["built_now"])
    rows, failures = consolidated(out)
    assert rows.num_rows == 6 and failures.num_rows == 0 and len(set(rows.column("example_id").to_pylist())) == 6
