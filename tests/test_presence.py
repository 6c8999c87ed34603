"""Stem presence: frame features, the energy detector's decisions and segments, the shipped classifier
on a rendered song, and the scoring used by ``demix evaluate --presence``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from demix.pipeline import engine as P
from demix.pipeline.learn import presence as LP

RATE = 16000
STEMS = ("vocals", "drums", "bass", "other")


def tone(freq: float, seconds: float, spans=None, amp: float = 0.3, rate: int = RATE) -> np.ndarray:
    """Stereo tone, on only inside ``spans`` (seconds) when given, with 5 ms ramps."""
    t = np.arange(int(seconds * rate)) / rate
    x = amp * np.sin(2 * np.pi * freq * t)
    if spans is not None:
        gate = np.zeros_like(t)
        for a, b in spans:
            gate[(t >= a) & (t < b)] = 1.0
        ramp = int(0.005 * rate)
        gate = np.convolve(gate, np.ones(ramp) / ramp, mode="same")
        x = x * gate
    return np.stack([x, x]).astype(np.float32)


def noise(seconds: float, amp: float, seed: int, rate: int = RATE) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal((2, int(seconds * rate)))).astype(np.float32)


def test_features_stream_in_any_blocks_equal_one_push():
    x = np.stack([noise(3.33, 0.1, 1), noise(3.33, 0.2, 2)])
    whole = P.FrameFeatures(("a", "b"), RATE)
    whole.push(torch.from_numpy(x))
    pieces = P.FrameFeatures(("a", "b"), RATE)
    rng = np.random.default_rng(0)
    i = 0
    while i < x.shape[-1]:
        n = int(rng.integers(1, 3000))
        pieces.push(torch.from_numpy(x[..., i : i + n]))
        i += n
    a, b = whole.finish(), pieces.finish()
    assert a.bands.shape == (67, 2, len(P.BAND_EDGES_HZ) - 1)  # 3.33 s / 50 ms: the last frame is partial
    np.testing.assert_allclose(a.bands, b.bands, rtol=1e-5, atol=1e-12)
    # bands add up to the frame's mean square (Parseval), partial last frame included
    frame = int(0.05 * RATE)
    ms = np.square(x[0].astype(np.float64))
    expect = [ms[:, i * frame : (i + 1) * frame].mean() for i in range(67)]
    np.testing.assert_allclose(a.power("a"), expect, rtol=1e-4)
    assert a.duration_s == pytest.approx(3.33)


def test_silent_stem_absent_loud_stem_present_sparse_stem_segments_within_100ms():
    seconds = 10.0
    spans = [(1.0, 2.5), (4.0, 4.6), (6.2, 9.0)]
    stems = {
        "vocals": np.zeros((2, int(seconds * RATE)), np.float32),  # silent
        "drums": noise(seconds, 0.2, 3),  # loud throughout
        "bass": tone(110.0, seconds, spans, amp=0.25),  # sparse
        "other": tone(1000.0, seconds, amp=0.1),
    }
    feats = P.features_of(stems, RATE)
    got = P.detect_energy(feats, STEMS)
    assert not got["vocals"].present and got["vocals"].segments == () and got["vocals"].score == 0.0
    assert got["drums"].present and got["drums"].score > 0.5
    assert [(s.start_s, s.end_s) for s in got["drums"].segments] == [(0.0, 10.0)]
    assert got["bass"].present
    assert len(got["bass"].segments) == len(spans)
    for seg, (a, b) in zip(got["bass"].segments, spans):
        assert abs(seg.start_s - a) <= 0.1 and abs(seg.end_s - b) <= 0.1, (seg, a, b)
    # the reference activity (labels, scores) is smoothed: it may spread by up to two frames (0.1 s)
    ref = LP.reference_segments(stems["bass"], RATE)
    assert len(ref) == len(spans)
    for seg, (a, b) in zip(ref, spans):
        assert abs(seg.start_s - a) <= 0.1 + 1e-9 and abs(seg.end_s - b) <= 0.1 + 1e-9, (seg, a, b)


def test_quiet_but_real_stem_stays_present_and_leakage_level_stays_absent():
    seconds = 8.0
    loud = noise(seconds, 0.3, 5)
    stems = {"vocals": loud, "drums": 10 ** (-25 / 20) * noise(seconds, 0.3, 6),  # -25 dB: leakage-like
             "bass": 10 ** (-6 / 20) * noise(seconds, 0.3, 7), "other": np.zeros_like(loud)}
    got = P.detect_energy(P.features_of(stems, RATE), STEMS)
    assert got["vocals"].present and got["bass"].present
    assert not got["drums"].present and not got["other"].present


def test_hysteresis_bridges_flicker_and_drops_blips():
    rule = P.Hysteresis(on=0.5, off=0.3, min_active_s=0.25, min_gap_s=0.3, min_present_s=1.0)
    act = np.zeros(200)
    act[20:60] = 0.9
    act[40:42] = 0.4  # dips between off and on: stays on
    act[60:64] = 0.0  # a 0.2 s gap: closed
    act[64:100] = 0.9
    act[150:153] = 0.9  # a 0.15 s blip: dropped
    segs = P.segments_from_activation(act, 0.05, 10.0, rule)
    assert [(s.start_s, s.end_s) for s in segs] == [(1.0, 5.0)]
    verdict = P.decide(segs, rule)
    assert verdict.present and verdict.score == pytest.approx(4.0 / 5.0)
    assert not P.decide((), rule).present


def test_score_presence_counts_and_frame_f1():
    seg = (P.Segment(0.0, 1.0),)
    predicted = [("a", "vocals", P.Presence(True, 0.9, seg)), ("b", "vocals", P.Presence(False, 0.1, ())),
                 ("c", "vocals", P.Presence(True, 0.7, seg))]
    truth = {("a", "vocals"): True, ("b", "vocals"): True, ("c", "vocals"): False}
    ref = np.zeros(40, bool)
    ref[:10] = True  # 0.5 s true; the prediction says 1 s
    scores = LP.score_presence(predicted, truth, {("a", "vocals"): ref}).per_stem["vocals"]
    assert (scores["tp"], scores["fp"], scores["fn"], scores["tn"]) == (1, 1, 1, 0)
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5
    assert scores["frame_f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_shipped_classifier_loads_from_registry_and_refuses_to_separate():
    from demix.models.base import ModelLoadError
    from demix.models.registry import load_model

    clf = load_model("presence", kind="presence")
    assert clf.weights_sha256 and clf.sources == STEMS
    with pytest.raises(ModelLoadError, match="presence model"):
        load_model("presence")
    with pytest.raises(ModelLoadError, match="not a presence model"):
        load_model("unet", kind="presence")


@pytest.mark.timeout(300)
def test_combined_detector_on_a_rendered_song_with_a_stem_left_out(tmp_path):
    """End to end on real (synthetic) music: render a song that leaves stems out, separate it with the
    shipped U-Net, and judge it with the shipped detector (classifier and energy agreeing)."""
    from demix.models.registry import load_model
    from demix.pipeline.data.synth import SynthConfig, plan_song, render_song

    config = SynthConfig(tracks=8, seconds=12.0, seed=11, absent_share=0.5)
    index = next(i for i in range(8) if not all(plan_song(i, config).presence.values()))
    truth = plan_song(index, config).presence
    stems = render_song(index, config)
    mixture = sum(stems[s] for s in STEMS)
    feats = LP.separated_features(load_model("unet"), mixture, config.sample_rate)
    got = P.Detector("combined")(feats, STEMS)
    assert {s: got[s].present for s in STEMS} == {s: bool(truth[s]) for s in STEMS}
