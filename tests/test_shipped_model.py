"""The shipped default model: it loads, its hash matches, it fits the size budget, and it beats the
mixture floor on small fresh synthetic sets (seeds no training used; the classic generator and the
held-out profile), and so does every other shipped separator (nmf)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from demix.models.registry import DEFAULT_MODEL, WEIGHTS_DIR, get_entry, list_models, load_model
from demix.models.weights import sha256_file

MAX_BYTES = 25 * 1024 * 1024


def test_default_ships_verified_weights():
    entry = get_entry(DEFAULT_MODEL)
    assert entry.weights_uri is not None, "the default model has no shipped weights"
    path = Path(entry.weights_uri)
    assert path.is_file() and path.stat().st_size <= MAX_BYTES
    assert sha256_file(path) == entry.sha256
    assert path.name.split("-")[-1].split(".")[0] == entry.sha256[:8]
    model = load_model(DEFAULT_MODEL)
    assert model.weights_sha256 == entry.sha256 and not model.training


SHIPPED = [e.name for e in list_models() if e.weights_uri and e.weights_uri.startswith(str(WEIGHTS_DIR))]
SEPARATORS = [name for name in SHIPPED if get_entry(name).kind != "presence"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_file_matches_its_hash_and_name(name):
    entry = get_entry(name)
    path = Path(entry.weights_uri)
    assert path.is_file() and path.stat().st_size <= MAX_BYTES
    assert sha256_file(path) == entry.sha256
    assert path.name == f"{name}-{entry.sha256[:8]}.safetensors"
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["sha256"] == entry.sha256, "the card beside the file names the same bytes"


@pytest.fixture(scope="module", params=["classic", "heldout"])
def fresh_set(request, tmp_path_factory):
    """A small set from seeds no training used: the classic generator, and the held-out profile (a
    soundfont and a voice engine no shipped model was trained on)."""
    from demix.pipeline.data.synth import SynthConfig, synth_dataset

    root = tmp_path_factory.mktemp(f"fresh-{request.param}")
    synth_dataset(root, SynthConfig(tracks=3, seconds=8.0, seed=90210, absent_share=0.0, profile=request.param))
    return request.param, root


@pytest.fixture(scope="module")
def floors(fresh_set, tmp_path_factory):
    from demix.pipeline.learn.evaluate import evaluate_dataset

    return evaluate_dataset(fresh_set[1], "mixture", out=tmp_path_factory.mktemp("floor")).medians


@pytest.mark.parametrize("name", SEPARATORS)
def test_each_shipped_separator_beats_the_mixture_floor(name, fresh_set, floors, tmp_path):
    from demix.pipeline.learn.evaluate import evaluate_dataset, model_estimator

    profile, root = fresh_set
    model = evaluate_dataset(root, model_estimator(load_model(name)), out=tmp_path / name).medians
    for stem in ("vocals", "drums", "bass", "other"):
        assert not math.isnan(model[stem]["sdr"]), stem
        assert model[stem]["sdr"] > floors[stem]["sdr"] + 1.0, (profile, name, stem, model[stem]["sdr"], floors[stem]["sdr"])
