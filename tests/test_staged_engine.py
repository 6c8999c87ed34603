"""The staged engine: a shared model stage gives the same stems as one track alone, batches chunks of
several tracks together, keeps a failing track to itself, and (on Ray, with model actors) loses and
duplicates nothing when an actor dies in any stage.

In one process the stage is a :class:`ModelBatcher` shared by track threads (``demix separate --jobs``);
in a catalog run it is a model actor fed by host workers (``demix run --model-actors``), through the
real Ray instance and Prefect API of ``conftest_services``.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import demix_test_models  # noqa: F401 - registers test-gain
from demix.models.registry import load_model
from demix.pipeline.batch import manifest
from demix.pipeline.engine import (
    ModelBatcher, SeparationSettings, TrackError, make_runner, plan_stems, separate_track,
)
from demix.pipeline.io import Encoding

ENCODING = Encoding(format="wav", bit_depth="32f")  # float stems: what the model gave, unquantised


def _write(path: Path, frames: int, rate: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / rate
    audio = 0.3 * np.sin(2 * np.pi * (110 + 40 * seed) * t)[:, None] + 0.05 * rng.standard_normal((frames, 2))
    sf.write(path, audio.astype(np.float32), rate, subtype="FLOAT")
    return path


def _separate_all(model, sources: list[Path], out: Path, settings: SeparationSettings, stage=None, jobs: int = 1) -> dict:
    """Separate every source (with ``stage``: on ``jobs`` threads sharing it); ``{source: result or error}``."""
    plan = plan_stems(model.sources)

    def one(src: Path):
        outputs = {s: str(out / src.stem / f"{s}.wav") for s in plan.names}
        try:
            return separate_track(model, str(src), outputs, plan=plan, encoding=ENCODING, settings=settings, stage=stage)
        except TrackError as err:
            return err

    with ThreadPoolExecutor(jobs) as pool:
        return dict(zip(sources, pool.map(one, sources)))


def _stems(result) -> dict[str, np.ndarray]:
    return {stem: sf.read(uri, dtype="float32", always_2d=True)[0] for stem, uri in result.stems.items()}


def _lengths(model, settings: SeparationSettings) -> list[int]:
    """Frames: empty, shorter than one chunk, exactly one chunk, several chunks (not a multiple)."""
    chunk = settings.segment_samples(model)
    return [0, chunk // 3, chunk, int(2.6 * chunk), int(5.3 * chunk) + 7]


@pytest.mark.parametrize(
    "name, tolerance", [("test-gain", 0.0), ("unet", 1e-5)], ids=["identity-like exactly", "shipped unet within 1e-5"]
)
def test_a_shared_stage_gives_the_same_stems_as_one_track_alone(tmp_path, name, tolerance):
    model = load_model(name)
    settings = SeparationSettings(segment=1.0, batch_size=4)
    sources = [_write(tmp_path / f"t{i}.wav", n, model.sample_rate, i) for i, n in enumerate(_lengths(model, settings))]
    alone = _separate_all(model, sources, tmp_path / "alone", settings)
    with ModelBatcher(make_runner(model), settings.batch_size) as stage:
        shared = _separate_all(model, sources, tmp_path / "shared", settings, stage=stage, jobs=len(sources))
    assert stage.stats.mixed >= 1, "no model batch held chunks of two tracks: the test proves nothing"
    empty = sources[0]  # 0 frames: refused the same way by both ("contains no audio frames")
    assert isinstance(alone[empty], TrackError) and isinstance(shared[empty], TrackError)
    assert (alone[empty].stage, str(alone[empty])) == (shared[empty].stage, str(shared[empty])) == ("decode", str(alone[empty]))
    for src in sources[1:]:
        a, b = _stems(alone[src]), _stems(shared[src])
        assert a.keys() == b.keys() == set(model.sources)
        for stem in a:
            assert a[stem].shape == b[stem].shape == (sf.info(src).frames, 2)
            if tolerance == 0.0:
                assert np.array_equal(a[stem], b[stem]), (src.name, stem)
            else:
                assert np.abs(a[stem] - b[stem]).max(initial=0.0) <= tolerance, (src.name, stem)


def test_a_decode_failure_fails_its_track_while_its_batch_mates_finish(tmp_path):
    model = load_model("test-gain")
    settings = SeparationSettings(segment=1.0, batch_size=8)
    good = [_write(tmp_path / f"good{i}.wav", 8000 * 3, 8000, i) for i in range(3)]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(good[0].read_bytes()[:60] + b"\x00garbage" * 50)
    alone = _separate_all(model, good, tmp_path / "alone", settings)
    with ModelBatcher(make_runner(model), settings.batch_size) as stage:
        shared = _separate_all(model, [good[0], bad, *good[1:]], tmp_path / "shared", settings, stage=stage, jobs=4)
    assert isinstance(shared[bad], TrackError) and shared[bad].stage == "decode", shared[bad]
    assert stage.stats.mixed >= 1
    for src in good:
        a, b = _stems(alone[src]), _stems(shared[src])
        assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not (tmp_path / "shared" / "bad").exists() or not any((tmp_path / "shared" / "bad").iterdir())


class _Refuses(torch.nn.Module):
    """Doubles its input; refuses (raises) any batch holding a chunk whose first sample is negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0, 0] < 0).any()):
            raise ValueError("a chunk this model refuses")
        return (2 * x)[:, None]


def test_batches_are_full_across_groups_and_a_refused_group_fails_alone():
    run = make_runner(_Refuses())
    groups = [torch.full((3, 1, 5), float(i + 1)) for i in range(23)] + [torch.full((1, 1, 5), 99.0)]  # 70 chunks
    groups[7] = -groups[7]
    with ModelBatcher(run, 8, max_wait_s=30.0, track_producers=False) as stage:
        tickets = [stage.submit(g) for g in groups]
    # 9 batches of 8 (the last one of 6); the third (groups 5, 6 and the refused 7) failed: each of its
    # groups ran again alone, so only group 7 fails
    assert stage.stats.forwards == 9 + 3
    for i, (g, t) in enumerate(zip(groups, tickets)):
        if i == 7:
            with pytest.raises(ValueError, match="refuses"):
                t.result()
        else:
            assert torch.equal(t.result(), 2 * g[:, None]), i


def test_producers_all_waiting_run_a_partial_batch_at_once():
    """Two tracks each waiting on 3 chunks with batch size 8: nobody else can add a chunk, so the
    batch runs with 6 instead of waiting for chunks that cannot come."""
    run = make_runner(_Refuses())
    with ModelBatcher(run, 8, max_wait_s=60.0) as stage:
        def track(value: float) -> torch.Tensor:
            with stage.producer():
                return stage.submit(torch.full((3, 1, 4), value)).result()

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(track, [1.0, 2.0]))
    assert [float(r.mean()) for r in results] == [2.0, 4.0]
    assert stage.stats.chunks == 6 and stage.stats.forwards <= 2


# --- on Ray: model actors fed by host workers -------------------------------------------------------

pytest_plugins = ["conftest_services"]


@pytest.fixture
def flow_env(ray_cluster, prefect_api):
    return ray_cluster, prefect_api


def _flow(catalog: Path, out: Path, **overrides) -> dict:
    from test_catalog_flow import run_flow

    settings = {"segment": 1.0, "batch_size": 8}
    return run_flow(str(catalog), str(out), model_actors=1, settings=settings, shard_size=3, **overrides)


@pytest.mark.timeout(300)
def test_model_actors_give_the_same_stems_as_separate(tmp_path, flow_env):
    from test_catalog_flow import _local_catalog

    paths = _local_catalog(tmp_path / "in", 5, seconds=2.5)
    (tmp_path / "in" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    summary = _flow(tmp_path / "in", tmp_path / "out")
    assert (summary["ok_now"], summary["failed_now"]) == (5, 1), summary["failures"]
    (failure,) = summary["failures"]
    assert failure["source_uri"].endswith("broken.wav") and failure["stage"] == "decode"
    stage = summary["model_stage"]
    assert stage["mixed_forwards"] >= 1 and stage["chunks"] > 0, stage
    model = load_model("test-gain")
    plan = plan_stems(model.sources)
    settings = SeparationSettings(segment=1.0)
    tables = manifest.read_manifests(str(tmp_path / "out"))
    by_track = {}
    for row in tables["stems"].to_pylist():
        by_track.setdefault(row["track_id"], {})[row["stem"]] = row["uri"]
    ids = {r["source_uri"]: r["track_id"] for r in tables["tracks"].to_pylist()}
    for path in paths:
        outputs = {s: str(tmp_path / "alone" / path.stem / f"{s}.wav") for s in plan.names}
        separate_track(model, str(path), outputs, plan=plan, encoding=Encoding(), settings=settings)
        for stem in plan.names:
            a = sf.read(outputs[stem], dtype="float32")[0]
            b = sf.read(by_track[ids[str(path)]][stem], dtype="float32")[0]
            assert np.array_equal(a, b), (path.name, stem)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", ["read", "model", "write"])
def test_an_actor_killed_in_any_stage_loses_and_duplicates_nothing(tmp_path, flow_env, stage):
    from test_catalog_flow import _assert_each_track_once, _local_catalog

    _local_catalog(tmp_path / "in", 6)
    marker = tmp_path / "died-once"
    options = {}
    faults = Path(os.environ["DEMIX_TEST_FAULTS"])
    if stage == "model":
        options["model_options"] = {"die_marker": str(marker)}
    else:
        faults.write_text(json.dumps({"stage": stage, "marker": str(marker)}))
    try:
        summary = _flow(tmp_path / "in", tmp_path / "out", **options)
    finally:
        faults.unlink(missing_ok=True)
    assert marker.exists(), f"nothing died in the {stage} stage: the test proves nothing"
    assert (summary["ok_now"], summary["failed_now"]) == (6, 0), summary["failures"]
    _assert_each_track_once(str(tmp_path / "out"), 6)


def test_threads_are_not_left_behind():
    before = {t.name for t in threading.enumerate()}
    with ModelBatcher(make_runner(_Refuses()), 2) as stage:
        stage.submit(torch.ones(1, 1, 3)).result()
    assert "demix-model" not in {t.name for t in threading.enumerate()} - before


def test_a_track_run_alone_has_the_process_to_itself():
    """``Exclusive``: an ``alone`` holder waits for the shared ones to leave, and shared holders
    arriving while it waits or runs wait for it."""
    from demix.pipeline.engine import Exclusive

    lock, log, inside = Exclusive(), [], threading.Event()

    def shared(name: str, hold: float) -> None:
        with lock.shared():
            log.append(f"+{name}")
            inside.set()
            threading.Event().wait(hold)
            log.append(f"-{name}")

    def alone() -> None:
        with lock.alone():
            log.append("+alone")
            threading.Event().wait(0.05)
            log.append("-alone")

    first = threading.Thread(target=shared, args=("a", 0.2))
    first.start()
    inside.wait()
    suspect = threading.Thread(target=alone)
    suspect.start()
    threading.Event().wait(0.05)
    late = threading.Thread(target=shared, args=("b", 0.0))
    late.start()
    for t in (first, suspect, late):
        t.join()
    assert log == ["+a", "-a", "+alone", "-alone", "+b", "-b"]
