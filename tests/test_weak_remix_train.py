"""Training on weak examples: the masked loss uses only what is known, mixed batches of labelled and weak
examples train, and the CLI says how."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from demix.pipeline.data import AugmentConfig, MusdbDataset, TrainingSampler
from demix.pipeline.data.weak import MixedSampler, WeakDataset
from demix.pipeline.learn.masked import masked_loss
from demix.pipeline.learn.train import read_log, train
from demix.pipeline.learn.validation import loss_fn
from demix.pipeline.stems import STEMS
from test_datasets import make_musdb
from test_train import tiny_config

RATE = 44100


def write_weak(folder: Path, known: str, seconds: float, seed: int) -> None:
    """One weak example folder as ``demix remix --labelled`` writes it."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    added = (0.1 * rng.standard_normal((2, n))).astype(np.float32)
    rest = (0.1 * rng.standard_normal((2, n))).astype(np.float32)
    folder.mkdir(parents=True)
    for name, audio in (("mixture", added + rest), (known, added), ("rest", rest)):
        sf.write(folder / f"{name}.wav", audio.T, RATE, subtype="FLOAT")
    (folder / "weak.json").write_text(json.dumps({"known": [known], "rest_of": [s for s in STEMS if s != known], "rest": "rest"}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    labelled = make_musdb(tmp_path_factory.mktemp("labelled"), ("a", "b", "c", "d"), seconds=1.5, rate=RATE)
    weak = tmp_path_factory.mktemp("weak")
    for k, stem in enumerate(("vocals", "bass", "vocals")):
        write_weak(weak / f"wk-{k}", stem, 1.0, k)
    return labelled, weak


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    est = torch.randn(2, 4, 2, 64, generator=g)
    ref = torch.randn(2, 4, 2, 64, generator=g)
    known = torch.tensor([[True] * 4, [True, False, False, False]])
    rest_mask = torch.tensor([[False] * 4, [False, True, True, True]])
    rest = torch.stack([torch.zeros(2, 64), torch.randn(2, 64, generator=g)])
    return est, ref, known, rest_mask, rest


@pytest.mark.parametrize("name", ["l1", "mse"])
def test_masked_loss_uses_only_what_is_known(name):
    est, ref, known, rest_mask, rest = _batch()
    base = masked_loss(name, est, ref, known, rest_mask, rest)
    # a fully labelled example: the plain loss of that example
    alone = masked_loss(name, est[:1], ref[:1], known[:1], rest_mask[:1], rest[:1])
    assert float(alone) == pytest.approx(float(loss_fn(name, est[:1], ref[:1])), rel=1e-6)
    # the weak example: moving energy between its rest stems (same sum) changes nothing ...
    moved = est.clone()
    delta = torch.randn(2, 64)
    moved[1, 1] += delta
    moved[1, 2] -= delta
    assert float(masked_loss(name, moved, ref, known, rest_mask, rest)) == pytest.approx(float(base), rel=1e-6)
    # ... nor do the (unknown) targets of those stems ...
    other = ref.clone()
    other[1, 1:] = torch.randn(3, 2, 64)
    assert float(masked_loss(name, est, other, known, rest_mask, rest)) == pytest.approx(float(base), rel=1e-6)
    # ... but its known stem's estimate, and the rest stems' sum, do
    changed = est.clone()
    changed[1, 0] += 0.5
    assert abs(float(masked_loss(name, changed, ref, known, rest_mask, rest)) - float(base)) > 1e-3
    shifted = est.clone()
    shifted[1, 3] += 0.5
    assert abs(float(masked_loss(name, shifted, ref, known, rest_mask, rest)) - float(base)) > 1e-3
    # gradients reach the rest stems only through their sum: equal for the three
    est.requires_grad_(True)
    masked_loss(name, est, ref, known, rest_mask, rest).backward()
    torch.testing.assert_close(est.grad[1, 1], est.grad[1, 2])
    torch.testing.assert_close(est.grad[1, 2], est.grad[1, 3])


def test_mixed_sampler_draws_both_kinds_with_exact_parts(data):
    labelled, weak = data
    aug = AugmentConfig(excerpt_seconds=0.5)
    base = TrainingSampler(MusdbDataset(labelled), target_rate=RATE, augment=aug, seed=0)
    mixed = MixedSampler(base, WeakDataset(weak), share=0.5, seed=0)
    kinds = [mixed.is_weak(k) for k in range(40)]
    assert 5 < sum(kinds) < 35
    for k in range(12):
        mixture, stems, known, rest_mask, rest = mixed.example(k)
        assert mixture.shape == (2, int(0.5 * RATE)) and stems.shape == (4, 2, int(0.5 * RATE))
        if kinds[k]:
            assert int(known.sum()) == 1 and not bool(rest_mask[known].any()) and int(rest_mask.sum()) == 3
            torch.testing.assert_close(mixture, stems[known][0] + rest)
            assert float(stems[~known].abs().max()) == 0.0  # unknown stems are not invented
        else:
            assert bool(known.all()) and not bool(rest_mask.any())
            torch.testing.assert_close(mixture, stems.sum(0))
    again = MixedSampler(base, WeakDataset(weak), share=0.5, seed=0)
    for k in range(6):  # a pure function of (seed, k)
        for a, b in zip(mixed.example(k), again.example(k)):
            torch.testing.assert_close(a, b)


def test_weak_reader_refuses_a_broken_example(tmp_path):
    write_weak(tmp_path / "ok", "drums", 0.5, 0)
    write_weak(tmp_path / "bad", "bass", 0.5, 1)
    (tmp_path / "bad" / "rest.wav").unlink()
    with pytest.raises(ValueError, match="bad"):
        WeakDataset(tmp_path)
    with pytest.raises(ValueError, match="no weak examples"):
        WeakDataset(tmp_path / "ok")


def test_a_few_steps_on_labelled_and_weak_examples(data, tmp_path):
    labelled, weak = data
    config = tiny_config(labelled, steps=4, valid_every=4, checkpoint_every=4, weak_dataset=str(weak), weak_share=0.5)
    best = train(config, tmp_path / "run")
    records = list(read_log(tmp_path / "run"))
    assert best.is_file() and [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train_loss"]) for r in records) and records[-1]["valid_sdr"]
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["weak_dataset"] == str(weak.resolve()) and stored["weak_share"] == 0.5
    mixed = MixedSampler(TrainingSampler(MusdbDataset(labelled), target_rate=RATE, augment=config.augment, seed=0),
                         WeakDataset(weak), share=0.5, seed=0)
    drawn = [mixed.is_weak(k) for k in range(4 * config.batch_size)]
    assert any(drawn) and not all(drawn)  # the steps above saw both kinds
    plain = json.loads(json.dumps(tiny_config(labelled).to_dict()))
    assert "weak_dataset" in plain  # the option exists; a run without it stores the config as before:
    train(tiny_config(labelled, steps=1, valid_every=1, checkpoint_every=1), tmp_path / "plain")
    assert "weak_dataset" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_cli_help_names_the_weak_options(capsys):
    from demix.pipeline.cli import main

    for argv, flags in ((["train", "--help"], ("--weak-data", "--weak-share")), (["remix", "--help"], ("--labelled",))):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert all(f in text for f in flags), argv
