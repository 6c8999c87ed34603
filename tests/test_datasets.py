"""MUSDB-layout reader, training sampler and validation excerpts, on tiny generated folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from demix.pipeline.data import AugmentConfig, MusdbDataset, TrainingSampler, fixed_excerpts
from demix.pipeline.stems import QUIET_DBFS, STEMS, is_silent
from demix.pipeline.data.synth import toy_song

RATE = 8000


def write_track(folder: Path, *, seconds: float = 2.0, rate: int = RATE, seed: int = 0, silent=(),
                subtype: str = "FLOAT") -> dict[str, np.ndarray]:
    """One MUSDB-layout track folder from :func:`toy_song`; stems in ``silent`` are all zeros."""
    song = toy_song(seconds, rate, seed)
    for stem in silent:
        song[stem] = np.zeros_like(song[stem])
    song["mixture"] = sum(song[s] for s in STEMS)
    folder.mkdir(parents=True, exist_ok=True)
    for key, audio in song.items():
        sf.write(folder / f"{key}.wav", audio.T, rate, subtype=subtype)
    return song


def make_musdb(root: Path, names=("a", "b", "c"), *, seconds: float = 2.0, rate: int = RATE, truth: bool = False,
               silent: dict | None = None) -> Path:
    silent = silent or {}
    for k, name in enumerate(names):
        write_track(root / name, seconds=seconds, rate=rate, seed=k, silent=silent.get(name, ()))
    if truth:
        (root / "truth.json").write_text(json.dumps({n: {s: s not in silent.get(n, ()) for s in STEMS} for n in names}))
    return root


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    names = ("Artist - Song One", "b's & c (live)", "c")
    return make_musdb(tmp_path_factory.mktemp("flat"), names, truth=True, silent={"c": ("vocals",)})


# ---------------------------------------------------------------------------------------- reader


def test_reader_flat_layout_with_truth(flat):
    ds = MusdbDataset(flat)
    assert len(ds) == 3
    assert [t.name for t in ds.tracks] == sorted(["Artist - Song One", "b's & c (live)", "c"])
    t = ds.tracks[0]
    assert (t.sample_rate, t.frames, t.channels, t.stems) == (RATE, 2 * RATE, 2, STEMS)
    assert ds.tracks[ds.index("c")].present == {"vocals": False, "drums": True, "bass": True, "other": True}
    audio = ds.load("Artist - Song One")
    assert set(audio) == {"mixture", *STEMS}
    assert all(a.shape == (2, 2 * RATE) and a.dtype == np.float32 for a in audio.values())
    np.testing.assert_allclose(audio["mixture"], sum(audio[s] for s in STEMS), atol=1e-6)


def test_reader_train_test_layout(tmp_path):
    make_musdb(tmp_path / "train", ("x", "y"))
    make_musdb(tmp_path / "test", ("z",))
    assert [t.name for t in MusdbDataset(tmp_path, subset="train").tracks] == ["x", "y"]
    assert [t.name for t in MusdbDataset(tmp_path, subset="test").tracks] == ["z"]
    assert len(MusdbDataset(tmp_path / "test")) == 1
    with pytest.raises(ValueError, match="subset='train'"):
        MusdbDataset(tmp_path)
    with pytest.raises(ValueError, match="no subset folder 'valid'"):
        MusdbDataset(tmp_path, subset="valid")


def test_reader_no_truth_and_stem_subset(tmp_path):
    make_musdb(tmp_path, ("x",))
    ds = MusdbDataset(tmp_path, stems=("vocals",))
    assert ds.tracks[0].present is None and ds.stems == ("vocals",)
    assert set(ds.load(0)) == {"mixture", "vocals"}


def test_broken_tracks_are_named(tmp_path):
    make_musdb(tmp_path, ("good", "no bass", "short drums", "other rate"))
    (tmp_path / "no bass" / "bass.wav").unlink()
    sf.write(tmp_path / "short drums" / "drums.wav", np.zeros((100, 2), np.float32), RATE)
    sf.write(tmp_path / "other rate" / "vocals.wav", np.zeros((2 * RATE, 2), np.float32), 16000)
    with pytest.raises(ValueError) as info:
        MusdbDataset(tmp_path)
    msg = str(info.value)
    assert "3 of 4 track folders are broken" in msg
    assert "track 'no bass': missing bass.wav" in msg
    assert "track 'short drums': drums.wav has 100 frames" in msg
    assert "track 'other rate': vocals.wav is at 16000 Hz" in msg
    assert "'good'" not in msg


def test_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        MusdbDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="no track folders"):
        MusdbDataset(tmp_path)


def test_excerpt_reads_the_right_slice(flat):
    ds = MusdbDataset(flat)
    whole = ds.load(1)
    part = ds.load(ds.tracks[1].name, start=1234, frames=500, keys=("drums", "mixture"))
    assert set(part) == {"drums", "mixture"}
    for key in part:
        np.testing.assert_array_equal(part[key], whole[key][:, 1234:1734])
    assert ds.load(1, start=2 * RATE - 10)["vocals"].shape == (2, 10)
    with pytest.raises(ValueError, match="cannot read 500 frames"):
        ds.load(1, start=2 * RATE - 10, frames=500)
    with pytest.raises(ValueError, match="no track named"):
        ds.load("missing")


def test_split_is_seeded_and_disjoint(flat):
    ds = MusdbDataset(flat)
    train, valid = ds.split(0.34, seed=3)
    assert sorted(train + valid) == [0, 1, 2] and len(valid) == 1
    assert ds.split(0.34, seed=3) == (train, valid)
    with pytest.raises(ValueError, match="keep one for training"):
        ds.split(0.9, seed=0)


# --------------------------------------------------------------------------------------- sampler


def test_sampler_shapes_mixture_and_determinism(flat):
    ds = MusdbDataset(flat)
    sampler = TrainingSampler(ds, target_rate=RATE, augment=AugmentConfig(excerpt_seconds=0.5), seed=7)
    mix, stems = sampler.example(3)
    assert mix.shape == (2, RATE // 2) and stems.shape == (4, 2, RATE // 2)
    assert mix.dtype == stems.dtype == torch.float32
    assert torch.equal(mix, stems.sum(0))  # exactly
    again = TrainingSampler(ds, target_rate=RATE, augment=AugmentConfig(excerpt_seconds=0.5), seed=7)
    assert all(torch.equal(a, b) for a, b in zip(sampler.example(3), again.example(3)))
    assert not torch.equal(sampler.example(4)[0], mix)
    other_seed = TrainingSampler(ds, target_rate=RATE, augment=AugmentConfig(excerpt_seconds=0.5), seed=8)
    assert not torch.equal(other_seed.example(3)[0], mix)
    # the iterator yields example 0, 1, 2, ... and is endless without epoch_size
    it = iter(sampler)
    for k in range(3):
        assert torch.equal(next(it)[0], sampler.example(k)[0])
    assert len(TrainingSampler(ds, target_rate=RATE, epoch_size=5)) == 5
    with pytest.raises(TypeError):
        len(sampler)


def test_sampler_source_order_and_subset(flat):
    ds = MusdbDataset(flat)
    order = ("drums", "bass", "other", "vocals")
    mix, stems = TrainingSampler(ds, target_rate=RATE, augment=AugmentConfig(excerpt_seconds=0.25), sources=order).example(0)
    assert torch.equal(mix, stems.sum(0))
    mix1, voc = TrainingSampler(ds, target_rate=RATE, augment=AugmentConfig(excerpt_seconds=0.25), sources=("vocals",)).example(0)
    assert voc.shape == (1, 2, RATE // 4)
    assert torch.equal(voc[0], stems[3])
    torch.testing.assert_close(mix1, mix)  # same stems, summed in another order
    with pytest.raises(ValueError, match="sources"):
        TrainingSampler(ds, target_rate=RATE, sources=("piano",))


def _plain(**overrides) -> AugmentConfig:
    return AugmentConfig(**{**dict(excerpt_seconds=0.5, gain_db=(0.0, 0.0), remix_prob=0.0, channel_swap=0.0, sign_flip=0.0), **overrides})


def _reference(ds, recipe):
    return torch.from_numpy(ds.load(recipe.track, start=recipe.start, frames=recipe.frames, keys=(recipe.stem,))[recipe.stem])


def test_without_augmentation_stems_are_one_aligned_excerpt(flat):
    ds = MusdbDataset(flat)
    sampler = TrainingSampler(ds, target_rate=RATE, augment=_plain(), seed=1)
    for k in range(4):
        recipe = sampler.recipe(k)
        assert len({(r.track, r.start) for r in recipe}) == 1
        _, stems = sampler.example(k)
        for s, r in enumerate(recipe):
            assert torch.equal(stems[s], _reference(ds, r))


def test_channel_swap_and_sign_flip_are_applied(flat):
    ds = MusdbDataset(flat)
    swapped = TrainingSampler(ds, target_rate=RATE, augment=_plain(channel_swap=1.0), seed=1)
    flipped = TrainingSampler(ds, target_rate=RATE, augment=_plain(sign_flip=1.0), seed=1)
    _, plain = TrainingSampler(ds, target_rate=RATE, augment=_plain(), seed=1).example(0)
    _, s_swap = swapped.example(0)
    _, s_flip = flipped.example(0)
    assert all(r.channel_swap for r in swapped.recipe(0))
    assert torch.equal(s_swap, plain.flip(1))
    assert not torch.equal(s_swap, plain)  # toy stems are panned: swapping changes them
    assert torch.equal(s_flip, -plain)


def test_gain_and_remix_are_applied(flat):
    ds = MusdbDataset(flat)
    gained = TrainingSampler(ds, target_rate=RATE, augment=_plain(gain_db=(-6.0, 3.0)), seed=2)
    _, stems = gained.example(0)
    for s, r in enumerate(gained.recipe(0)):
        assert -6.0 <= r.gain_db <= 3.0 and r.gain_db != 0.0
        torch.testing.assert_close(stems[s], _reference(ds, r) * 10 ** (r.gain_db / 20), rtol=1e-6, atol=1e-7)
    remixed = TrainingSampler(ds, target_rate=RATE, augment=_plain(remix_prob=1.0), seed=2)
    for k in range(5):
        recipe = remixed.recipe(k)
        _, stems = remixed.example(k)
        assert len({r.track for r in recipe}) > 1  # every stem from another track than the base
        for s, r in enumerate(recipe):
            assert torch.equal(stems[s], _reference(ds, r))
            # 'c' has no vocals (truth.json): never a vocal donor
            assert not (r.stem == "vocals" and r.track == "c")


def test_silent_excerpts_are_redrawn(tmp_path):
    root = make_musdb(tmp_path, ("loud", "quiet"), silent={"quiet": STEMS})
    ds = MusdbDataset(root)
    sampler = TrainingSampler(ds, target_rate=RATE, augment=_plain(silent_excerpt_retries=20), seed=0)
    assert all(sampler.recipe(k)[0].track == "loud" for k in range(8))
    never = TrainingSampler(ds, target_rate=RATE, augment=_plain(silent_excerpt_retries=0), seed=0)
    assert any(never.recipe(k)[0].track == "quiet" for k in range(8))


def test_resampling_and_short_tracks(tmp_path):
    root = make_musdb(tmp_path, ("x", "y"), seconds=0.3, rate=RATE)
    ds = MusdbDataset(root)
    sampler = TrainingSampler(ds, target_rate=2 * RATE, augment=_plain(excerpt_seconds=0.5))
    mix, stems = sampler.example(0)
    assert mix.shape == (2, RATE) and stems.shape == (4, 2, RATE)
    assert torch.equal(mix, stems.sum(0))
    assert float(stems[..., int(0.31 * 2 * RATE):].abs().max()) == 0.0  # zero padding past the track's end
    assert not is_silent(stems[..., : int(0.3 * 2 * RATE)], QUIET_DBFS)


def test_dataloader_workers_split_the_stream(flat):
    ds = MusdbDataset(flat)
    sampler = TrainingSampler(ds, target_rate=RATE, augment=AugmentConfig(excerpt_seconds=0.25), epoch_size=4)
    batches = list(torch.utils.data.DataLoader(sampler, batch_size=2, num_workers=0))
    assert len(batches) == 2 and batches[0][1].shape == (2, 4, 2, RATE // 4)
    assert torch.equal(batches[1][0][1], sampler.example(3)[0])
    sampler.set_epoch(1)
    assert torch.equal(next(iter(sampler))[0], sampler.example(4)[0])


def test_fixed_excerpts_are_from_the_middle(flat):
    ds = MusdbDataset(flat)
    out = fixed_excerpts(ds, [0, 2], seconds=0.5, target_rate=RATE)
    assert [name for name, _, _ in out] == [ds.tracks[0].name, "c"]
    name, mix, stems = out[0]
    whole = ds.load(0)
    start = (2 * RATE - RATE // 2) // 2
    assert torch.equal(mix, torch.from_numpy(whole["mixture"][:, start : start + RATE // 2]))
    assert stems.shape == (4, 2, RATE // 2)
    assert torch.equal(stems[1], torch.from_numpy(whole["drums"][:, start : start + RATE // 2]))
    again = fixed_excerpts(ds, [0, 2], seconds=0.5, target_rate=RATE)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(out, again))
    long = fixed_excerpts(ds, None, seconds=3.0, target_rate=RATE, sources=("bass",))
    assert len(long) == 3 and long[0][2].shape == (1, 2, 3 * RATE)


def test_augment_config_validation():
    with pytest.raises(ValueError, match="remix_prob"):
        AugmentConfig(remix_prob=1.5)
    with pytest.raises(ValueError, match="gain_db"):
        AugmentConfig(gain_db=(3.0, -3.0))
    assert AugmentConfig.none(2.0).remix_prob == 0.0
