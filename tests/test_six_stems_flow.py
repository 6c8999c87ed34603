"""A six-stem model (htdemucs_6s: drums, bass, other, vocals, guitar, piano) through the catalog flow:
manifests, presence, the HTML report, a transcription export and a stem subset all carry six stems.

The network is the published architecture shrunk by its options (full size runs in
tests/test_published_models.py), loaded from a ``.th`` package written in the published format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from demix.models import registry
from demix.pipeline.batch import manifest
from demix.pipeline.batch.export import export_transcription
from test_published_models import SMALL_HT, write_demucs_package

pytest_plugins = ["conftest_services"]
pytestmark = pytest.mark.timeout(600)

SIX = ("drums", "bass", "other", "vocals", "guitar", "piano")


@pytest.fixture
def flow_env(ray_cluster, prefect_api):
    return ray_cluster, prefect_api


@pytest.fixture(scope="module")
def six_stem_weights(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("weights")
    return str(write_demucs_package(registry.load_model("htdemucs_6s", pretrained=False, **SMALL_HT), folder, "5c90dfd2"))


def _catalog(folder: Path, n: int = 2, seconds: float = 2.0) -> str:
    folder.mkdir(parents=True)
    t = np.arange(int(seconds * 44100)) / 44100
    for i in range(n):
        tone = 0.3 * np.sin(2 * np.pi * (220.0 + 110 * i) * t)
        sf.write(folder / f"song{i}.wav", np.stack([tone, 0.5 * tone], 1).astype(np.float32), 44100)
    return str(folder)


def _run(catalog: str, out: str, weights: str, **overrides) -> dict:
    from demix.flows.separate_catalog import separate_catalog

    kwargs = {"model": "htdemucs_6s", "weights": weights, "model_options": SMALL_HT, "workers_count": 1,
              "shard_size": 2, "progress": False, "presence": "combined", **overrides}
    return separate_catalog(catalog=catalog, out=out, **kwargs)


def test_six_stems_through_the_catalog_flow(tmp_path, flow_env, six_stem_weights):
    out = str(tmp_path / "out")
    summary = _run(_catalog(tmp_path / "in"), out, six_stem_weights)
    assert summary["ok_now"] == 2 and summary["failed_now"] == 0
    tables = manifest.read_manifests(out)
    stems = tables["stems"].to_pylist()
    assert sorted((r["track_id"][:5], r["stem"]) for r in stems) == sorted((f"song{i}", s) for i in range(2) for s in SIX)
    for r in stems:
        info = sf.info(r["uri"])
        assert info.samplerate == 44100 and info.frames == r["num_frames"] > 0
    assert set(summary["presence"]) == set(SIX), "presence is judged for every stem the model has"
    assert Path(summary["report"]).is_file() and all(s in Path(summary["report"]).read_text() for s in ("guitar", "piano"))

    uri, rows = export_transcription(out, str(tmp_path / "export"), stems=("bass", "guitar", "piano"))
    exported = pq.read_table(uri).to_pylist()
    assert len(exported) == rows and {r["stem"] for r in exported} <= {"bass", "guitar", "piano"}

    subset = _run(_catalog(tmp_path / "in2", 1), str(tmp_path / "subset"), six_stem_weights, stems=["guitar", "piano"])
    assert subset["ok_now"] == 1
    assert sorted(r["stem"] for r in manifest.read_manifests(str(tmp_path / "subset"))["stems"].to_pylist()) == ["guitar", "piano"]
