"""The shipped default model: it loads, its hash matches, it fits the size budget, and it beats the
mixture floor on a small held-out synthetic set (a seed the training data never used)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from demix.models.registry import DEFAULT_MODEL, get_entry, load_model
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


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from demix.pipeline.data.synth import SynthConfig, synth_dataset

    root = tmp_path_factory.mktemp("held-out")
    synth_dataset(root, SynthConfig(tracks=3, seconds=8.0, seed=90210, absent_share=0.0))
    return root


def test_default_beats_the_mixture_floor(held_out, tmp_path):
    from demix.pipeline.learn.evaluate import evaluate_dataset, model_estimator

    floor = evaluate_dataset(held_out, "mixture", out=tmp_path / "floor").medians
    model = evaluate_dataset(held_out, model_estimator(load_model(DEFAULT_MODEL)), out=tmp_path / "model").medians
    for stem in ("vocals", "drums", "bass", "other"):
        assert not math.isnan(model[stem]["sdr"]), stem
        assert model[stem]["sdr"] > floor[stem]["sdr"] + 1.0, (stem, model[stem]["sdr"], floor[stem]["sdr"])
