"""Overlap-add engine: exactness, streaming equivalence, bounded buffers, stem plans."""

from __future__ import annotations

import random

import pytest
import torch

from demix.models.base import Separator
from demix.models.registry import load_model
from demix.pipeline.engine import (
    SeparationSettings,
    plan_stems,
    separate,
    separate_stream,
    track_stats,
    triangle_window,
)
from tests.conftest import ScaleModel


class Identity(Separator):
    """One source equal to the input: overlap-add must give the input back."""

    def __init__(self, sample_rate=1000, segment=1.0):
        super().__init__()
        self.sources = ("all",)
        self.sample_rate = sample_rate
        self.segment = segment

    def forward(self, mix):
        return mix[:, None].clone()


SEGMENT = 1000  # samples at 1 kHz with segment=1.0


@pytest.mark.parametrize("length", [1, 7, SEGMENT - 1, SEGMENT, SEGMENT + 1, 13 * SEGMENT + 17])
@pytest.mark.parametrize(
    "settings",
    [
        SeparationSettings(),
        SeparationSettings(overlap=0.5, batch_size=3),
        SeparationSettings(overlap=0.0),
        SeparationSettings(overlap=0.9, transition_power=2.0),
        SeparationSettings(shifts=3, seed=5),
    ],
    ids=["default", "half-batch3", "no-overlap", "power2", "shifts3"],
)
def test_identity_model_returns_input(length, settings):
    model = Identity()
    torch.manual_seed(length)
    x = torch.randn(2, length)
    y = separate(model, x, settings)
    assert y.shape == (1, 2, length)
    assert torch.allclose(y[0], x, atol=1e-5), (y[0] - x).abs().max()


def test_streaming_matches_in_memory_for_any_block_sizes():
    model = ScaleModel()
    x = torch.randn(2, 9 * SEGMENT + 123)
    settings = SeparationSettings(overlap=0.3, batch_size=2, shifts=2)
    whole = separate(model, x, settings)
    rng = random.Random(0)
    blocks, i = [], 0
    while i < x.shape[-1]:
        n = rng.choice([1, 50, 999, 1000, 1001, 2500])
        blocks.append(x[:, i : i + n])
        i += n
    streamed = torch.cat(list(separate_stream(model, blocks, settings)), dim=-1)
    assert streamed.shape == whole.shape
    assert torch.allclose(streamed, whole, atol=1e-6)


def test_chunks_are_batched_and_bounded():
    model = ScaleModel()
    x = torch.randn(2, 20 * SEGMENT)
    separate(model, x, SeparationSettings(batch_size=4, overlap=0.25))
    assert model.calls, "model never called"
    assert all(c[0] <= 4 and c[1:] == (2, SEGMENT) for c in model.calls)
    # stride 750 over 20000 samples -> ceil(20000/750) = 27 chunks
    assert sum(c[0] for c in model.calls) == 27


def test_stream_emits_output_before_the_end():
    """Buffers stay O(segment): output for early blocks is yielded before later blocks are read."""
    model = ScaleModel()
    consumed = []

    def blocks():
        for k in range(30):
            consumed.append(k)
            yield torch.randn(2, SEGMENT)

    stream = separate_stream(model, blocks(), SeparationSettings(overlap=0.5))
    first = next(stream)
    assert first.shape[-1] > 0
    assert len(consumed) <= 3, f"engine read {len(consumed)} blocks before emitting anything"
    total = first.shape[-1] + sum(b.shape[-1] for b in stream)
    assert total == 30 * SEGMENT


def test_estimates_sum_to_mixture_when_model_promises_it():
    model = ScaleModel()
    assert model.masks_sum_to_one
    x = torch.randn(2, 5 * SEGMENT + 3)
    y = separate(model, x, SeparationSettings(overlap=0.4, shifts=2))
    assert torch.allclose(y.sum(0), x, atol=1e-5)


def test_unet_softmax_masks_sum_to_mixture_through_overlap_add():
    model = load_model("unet", mask="softmax", depth=3, channels=4, pretrained=False)
    assert model.masks_sum_to_one
    x = torch.randn(2, int(2.5 * model.sample_rate)) * 0.1
    y = separate(model, x, SeparationSettings(segment=1.0, overlap=0.25))
    assert y.shape == (4, 2, x.shape[-1])
    assert torch.allclose(y.sum(0), x, atol=1e-4)


def test_track_normalisation_is_undone():
    model = ScaleModel(normalize=True)
    x = 3.0 + 0.5 * torch.randn(2, 4 * SEGMENT)
    stats = track_stats([x[:, :1000], x[:, 1000:]])
    ref = x.mean(0)
    assert stats[0] == pytest.approx(float(ref.mean()), abs=1e-5)
    assert stats[1] == pytest.approx(float(ref.std()), rel=1e-4)
    y = separate(model, x)
    # scale model is linear: gain * (x - m)/s * s + m
    expected = model.gains[:, None, None] * (x - stats[0]) + stats[0]
    assert torch.allclose(y, expected, atol=1e-4)
    with pytest.raises(ValueError, match="track statistics"):
        list(separate_stream(model, [x]))


def test_batch_input_shape_and_bad_shapes():
    model = ScaleModel()
    y = separate(model, torch.randn(3, 2, 1500))
    assert y.shape == (3, 4, 2, 1500)
    with pytest.raises(ValueError, match="Expected"):
        separate(model, torch.randn(1500))
    with pytest.raises(ValueError, match="Expected"):
        list(separate_stream(model, [torch.randn(3, 100)]))


def test_wrong_model_output_is_reported():
    class Bad(ScaleModel):
        def forward(self, mix):
            return super().forward(mix)[..., :-1]

    with pytest.raises(RuntimeError, match="model returned shape"):
        separate(Bad(), torch.randn(2, 3000))


@pytest.mark.parametrize(
    "kwargs,match",
    [({"overlap": 1.0}, "overlap"), ({"segment": 0}, "segment"), ({"batch_size": 0}, "batch_size"), ({"dtype": "int8"}, "dtype"), ({"shifts": -1}, "shifts")],
)
def test_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SeparationSettings(**kwargs)


def test_triangle_window_positive_and_peaked():
    w = triangle_window(10)
    assert w.min() > 0 and w.max() == 1.0
    assert torch.equal(triangle_window(9, 2.0), triangle_window(9) ** 2)


def test_stem_plans():
    sources = ("drums", "bass", "other", "vocals")
    est = torch.arange(4.0)[:, None, None].expand(4, 2, 5)
    two = plan_stems(sources, two_stems="vocals")
    assert two.names == ("vocals", "no_vocals")
    out = two.apply(est)
    assert torch.all(out["vocals"] == 3) and torch.all(out["no_vocals"] == 0 + 1 + 2)
    assert plan_stems(sources, stems=["bass", "drums"]).names == ("bass", "drums")
    assert plan_stems(sources).names == sources
    with pytest.raises(ValueError, match="not a source"):
        plan_stems(sources, two_stems="piano")
    with pytest.raises(ValueError, match="unknown stems"):
        plan_stems(sources, stems=["piano"])


class _Exploding(ScaleModel):
    def forward(self, mix):
        if len(self.calls) >= 2:
            raise RuntimeError("boom")
        return super().forward(mix)


def _wav(tmp_path, seconds=6.0, rate=1000, name="x.wav"):
    import soundfile as sf

    path = tmp_path / name
    sf.write(path, 0.1 * torch.randn(int(seconds * rate), 2).numpy(), rate, subtype="FLOAT")
    return path


def test_separate_track_failure_is_staged_and_leaves_nothing(tmp_path):
    from demix.pipeline.io import Encoding
    from demix.pipeline.engine import TrackError, separate_track

    src = _wav(tmp_path)
    model = _Exploding()
    plan = plan_stems(model.sources)
    out = tmp_path / "out"
    outputs = {s: str(out / f"{s}.wav") for s in plan.names}
    with pytest.raises(TrackError) as info:
        separate_track(model, str(src), outputs, plan=plan, encoding=Encoding(), settings=SeparationSettings(), block_seconds=1.0)
    assert info.value.stage == "separate" and info.value.error_type == "RuntimeError"
    assert "boom" in str(info.value) and str(src) in str(info.value)
    assert not out.exists() or not any(out.iterdir()), "a failed track left files behind"


def test_separate_track_streams_blocks_and_matches_in_memory(tmp_path):
    import soundfile as sf

    from demix.pipeline.io import Encoding
    from demix.pipeline.engine import separate_track

    src = _wav(tmp_path, seconds=7.3)
    model = ScaleModel()
    plan = plan_stems(model.sources, two_stems="vocals")
    outputs = {s: str(tmp_path / f"{s}.wav") for s in plan.names}
    seen = []
    result = separate_track(
        model, str(src), outputs, plan=plan, encoding=Encoding("wav", "32f", "none"),
        settings=SeparationSettings(overlap=0.5), block_seconds=0.7, progress=seen.append,
    )
    assert result.duration_s == pytest.approx(7.3) and sum(seen) == pytest.approx(7.3)
    assert len(seen) == 11, "decoding did not stream in blocks"
    mix = torch.from_numpy(sf.read(src, dtype="float32")[0].T)
    vocals = torch.from_numpy(sf.read(outputs["vocals"], dtype="float32")[0].T)
    rest = torch.from_numpy(sf.read(outputs["no_vocals"], dtype="float32")[0].T)
    assert torch.allclose(vocals, 0.1 * mix, atol=1e-6) and torch.allclose(rest, 0.9 * mix, atol=1e-6)


def test_track_error_pickles():
    import pickle

    from demix.pipeline.engine import TrackError

    err = pickle.loads(pickle.dumps(TrackError("a.wav", "decode", ValueError("bad"))))
    assert err.stage == "decode" and err.source == "a.wav" and err.error_type == "ValueError"


def test_default_overlap_is_the_models_own_and_hashes_as_before(scale_model):
    """``overlap=None`` (the CLI default) uses the model's ``overlap`` when it has one, else 0.25; the
    settings hash of a model without one is what it was when 0.25 was written out."""
    plain = SeparationSettings()
    assert plain.overlap_for(scale_model) == 0.25
    assert plain.hash_fields(scale_model) == SeparationSettings(overlap=0.25).hash_fields(scale_model)
    scale_model.overlap = 0.5
    assert plain.overlap_for(scale_model) == 0.5 and SeparationSettings(overlap=0.3).overlap_for(scale_model) == 0.3
    assert plain.hash_fields(scale_model) != SeparationSettings(overlap=0.25).hash_fields(scale_model)
