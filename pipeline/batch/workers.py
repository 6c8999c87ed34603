"""The Ray layer, and the only module that imports ray.

A catalog run is one streaming Ray Data job: the pending tracks become a dataset, ``map_batches``
sends them through a pool of :class:`SeparatorActor` (each loads its model once: one actor per GPU
with ``num_gpus=1`` when the cluster has GPUs, ``workers`` CPU actors otherwise), and the driver
iterates the results as they finish. Ray Data restarts a dead actor and retries its batch
(``max_restarts=-1``, ``max_task_retries=-1``), so a track can be *computed* twice; it is *recorded*
once because stems go to deterministic keys and rows reach the manifests only through a shard commit.
Blocks hold at most ``TRACKS_PER_BLOCK`` tracks, so a dead actor costs at most that many retries;
a track that keeps killing its actor (a decoder crash, the OOM killer) is given up after
``MAX_ATTEMPTS_PER_TRACK`` deaths, counted by a small per-run actor (starts without a finish), and
recorded as failed.

Why Ray Data rather than a hand-made actor pool: it streams (bounded objects in flight), restarts
actors and retries their batches, sizes one pool for CPUs or GPUs, and scales to a cluster with
``--ray-address`` unchanged. Decoding and encoding overlap with model compute inside each actor
(:func:`demix.pipeline.engine.separate_track` runs them in threads around the model).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace

import torch

from demix.pipeline.batch.catalog import Shard, Track
from demix.pipeline.batch.cluster import Resources, plan_resources
from demix.pipeline.batch.feed import Feed
from demix.pipeline.batch.manifest import FailureRow, ShardResult, StemRow, TrackRow
from demix.pipeline.batch.model_actors import RemoteStage, model_info, stage_stats, start_model_actors, stop_model_actors
from demix.pipeline.batch.remix.build import build_example
from demix.pipeline.batch.remix.plan import Recipe
from demix.pipeline.batch.run import RunSpec, process_track
from demix.pipeline.engine import Exclusive, ModelBatcher, TrackError, make_runner

# ray is imported inside the functions that use it, and only in this module (no other module of demix
# may import ray): importing demix.pipeline.batch, the flows or the CLI never starts or loads Ray.


TRACKS_IN_FLIGHT = 2
"""Tracks of one Ray Data batch a host worker separates at once, so the model stage has chunks of
several tracks to fill its batches from."""

CALLS_IN_FLIGHT = 2
"""Ray Data batches a host worker runs at once (threads): while one batch's tracks are written, the
next one's are read and computed (no bubble at batch ends)."""

TRACKS_PER_BLOCK = 32
"""Upper bound of tracks in one Ray Data block (the unit a dead actor's retry redoes)."""

MAX_ATTEMPTS_PER_TRACK = 4
"""Times a track is handed to a separator actor before it is given up (each earlier attempt having
killed its actor's process) and recorded as failed, stage ``separate``, error ``WorkerDied``."""


class AttemptCounter:
    """Starts and finishes of each track across actor restarts (a Ray actor, one per run).

    A start without a finish means the process died while separating that track. Tracks that
    finished before a death in the same block are started again by the retry, but not counted as
    deaths, so several tracks can share a block.
    """

    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def start(self, track_id: str) -> int:
        """Count one more start of ``track_id``; returns 1 + the starts that never finished."""
        self._open[track_id] = self._open.get(track_id, 0) + 1
        return self._open[track_id]

    def finish(self, track_id: str) -> None:
        """``track_id``'s latest start finished (with a result row, ok or failed)."""
        self._open[track_id] = max(0, self._open.get(track_id, 0) - 1)


def given_up(
    track: Track, spec: RunSpec, settings_hash: str, model_sha256: str | None, deaths: int
) -> tuple[TrackRow, list[StemRow], list[FailureRow]]:
    """Manifest rows of a track whose separation killed its worker process ``deaths`` times."""
    row = TrackRow(
        track_id=track.track_id, source_uri=track.uri, source_bytes=None, duration_s=None, sample_rate=None,
        channels=None, status="failed", model=spec.model, model_sha256=model_sha256, settings_hash=settings_hash,
        elapsed_s=0.0,
    )
    message = f"the separator process died {deaths} times while separating this track; given up (see the Ray logs)"
    return row, [], [FailureRow(track.track_id, track.uri, "separate", "WorkerDied", message, attempts=deaths)]


class _CountedActor:
    """Base of the pool actors: with an ``attempts`` counter (an :class:`AttemptCounter` actor
    handle), :meth:`_start` counts a start of a unit (track, example) and returns 1 + its unfinished
    earlier starts, :meth:`_finish` records that it finished. A unit started more than
    ``max_attempts`` times (every earlier start killed the process) is not tried again."""

    def __init__(self, attempts=None, max_attempts: int = MAX_ATTEMPTS_PER_TRACK) -> None:
        self.attempts = attempts
        self.max_attempts = max_attempts

    def _start(self, unit_id: str) -> int:
        if self.attempts is None:
            return 1
        import ray

        return ray.get(self.attempts.start.remote(unit_id))

    def _finish(self, unit_id: str) -> None:
        if self.attempts is not None:
            import ray

            ray.get(self.attempts.finish.remote(unit_id))


class SeparatorActor(_CountedActor):
    """A host worker: ``__call__`` separates the tracks of a batch at once in threads (read, overlap-add,
    write), their chunks computed by one model stage: a :class:`ModelBatcher` over the model loaded
    once in ``__init__``, or, given ``model_actors``, those (a :class:`RemoteStage`). Ray Data runs
    ``CALLS_IN_FLIGHT`` batches of an actor at once.

    Delegates all work to :func:`demix.pipeline.batch.run.process_track`, which tests call without Ray. A track
    started more than ``max_attempts`` times (see :class:`_CountedActor`) gets the rows of
    :func:`given_up`; a track that was started before (its process died with it in flight) runs alone
    in the process (:class:`Exclusive`), so a later death is blamed on it and on no other track.
    """

    def __init__(
        self, spec: RunSpec, settings_hash: str, device: str, threads: int, attempts=None,
        max_attempts: int = MAX_ATTEMPTS_PER_TRACK, model_actors: list | None = None,
    ) -> None:
        super().__init__(attempts, max_attempts)
        torch.set_num_threads(max(1, threads))
        spec = replace(spec, settings=replace(spec.settings, device=device))  # chunks go where the model is
        self.spec = spec
        self.settings_hash = settings_hash
        if model_actors:
            spec.import_registry()  # its fault hooks and plug-ins, though the weights stay in the model actors
            self.model, self.stage = model_info(model_actors[0]), RemoteStage(model_actors)
        else:
            self.model = spec.load(device=device)
            run = make_runner(self.model, device, spec.settings.dtype)
            self.stage = ModelBatcher(run, spec.settings.batch_size).__enter__()  # lives as long as the actor
        self.detector = spec.load_presence(self.model)
        self.lock = Exclusive()

    def __call__(self, batch: dict) -> dict:
        """The tracks of ``batch``; with model actors, at once in threads (their chunks share model batches)."""
        jobs = list(zip(batch["shard_id"], batch["track_id"], batch["uri"]))
        if len(jobs) > 1:
            with ThreadPoolExecutor(len(jobs), thread_name_prefix="demix-track") as pool:
                results = list(pool.map(lambda job: self._one(*job), jobs))
        else:
            results = [self._one(*job) for job in jobs]
        return {
            "shard_id": [str(j[0]) for j in jobs], "track_id": [str(j[1]) for j in jobs], "result": results,
        }

    def _one(self, shard_id, track_id, uri) -> str:
        track = Track(str(track_id), str(uri))
        attempt = self._start(track.track_id)
        if attempt > self.max_attempts:
            digest = getattr(self.model, "weights_sha256", None)
            row, stems, failures = given_up(track, self.spec, self.settings_hash, digest, attempt - 1)
        else:
            with self.lock.alone() if attempt > 1 else self.lock.shared():
                row, stems, failures = process_track(
                    self.model, track, self.spec, settings_hash=self.settings_hash, detector=self.detector, stage=self.stage,
                )
        self._finish(track.track_id)
        return json.dumps({"track": asdict(row), "stems": [asdict(s) for s in stems], "failures": [asdict(f) for f in failures]})


def _decode(result: str) -> tuple[TrackRow, list[StemRow], list[FailureRow]]:
    data = json.loads(result)
    return TrackRow(**data["track"]), [StemRow(**s) for s in data["stems"]], [FailureRow(**f) for f in data["failures"]]


def run_shards(
    shards: Sequence[Shard],
    spec: RunSpec,
    settings_hash: str,
    *,
    resources: Resources,
    on_shard: Callable[[ShardResult], None],
    on_track: Callable[[TrackRow], None] | None = None,
    actor_cls: type = SeparatorActor,
    max_attempts: int = MAX_ATTEMPTS_PER_TRACK,
    should_stop: Callable[[], bool] | None = None,
    stage_totals: dict | None = None,
) -> int:
    """Separate every track of ``shards`` on the actor pool; call ``on_shard`` as each shard completes.

    With ``resources.model_actors`` the model actors are started first (and stopped after); their
    totals (:func:`~demix.pipeline.batch.model_actors.stage_stats`) land in ``stage_totals``.
    Returns the number of tracks processed. Shards complete in any order; ``on_shard`` (the commit)
    runs on the driver. A track is started at most ``max_attempts`` times (see :class:`SeparatorActor`).
    Once ``should_stop()`` is true (checked between results and every ``STOP_POLL_S``), no further
    result is taken and no further shard is committed: shards not complete by then are abandoned
    (nothing of them reaches the manifests) and the caller shuts Ray down.
    """
    items = [{"shard_id": s.shard_id, "track_id": t.track_id, "uri": t.uri} for s in shards for t in s.tracks]
    results = {s.shard_id: ShardResult(s.shard_id) for s in shards}

    def on_result(shard_id: str, text: str) -> None:
        track, stems, failures = _decode(text)
        shard = results[shard_id]
        shard.tracks.append(track)
        shard.stems.extend(stems)
        shard.failures.extend(failures)
        if on_track is not None:
            on_track(track)

    kwargs = {"spec": spec, "settings_hash": settings_hash, "device": resources.device, "threads": max(1, int(resources.cpus_per_actor))}
    handles = start_model_actors(spec, resources, max_attempts) if resources.model_actors and items else []
    if handles:
        kwargs["model_actors"] = handles
    try:
        return _run_pool(
            items, actor_cls, kwargs, resources, {s.shard_id: len(s.tracks) for s in shards}, on_result,
            lambda shard_id: on_shard(results.pop(shard_id)), max_attempts, should_stop,
        )
    finally:
        if handles:
            if stage_totals is not None and not (should_stop and should_stop()):
                stage_totals.update(stage_stats(handles))
            stop_model_actors(handles)


def _run_pool(
    items: list[dict], actor_cls: type, kwargs: dict, resources: Resources, sizes: dict[str, int],
    on_result: Callable[[str, str], None], on_shard_done: Callable[[str], None], max_attempts: int,
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Run ``items`` through a pool of ``actor_cls`` (a :class:`_CountedActor` built with ``kwargs``
    plus a per-run :class:`AttemptCounter`), on the driver: ``on_result(shard_id, result)`` once per
    unit (a retried batch delivered twice is dropped), ``on_shard_done(shard_id)`` once a shard's
    ``sizes[shard_id]`` units are all back, until ``should_stop()``. Returns the number of units processed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not items:
        return 0
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1. Found: {max_attempts}")
    # on the driver's node (the head's, through Ray Client): placed anywhere, the loss of whichever
    # node held it failed every worker's next call, and so the run (tests/test_services_stack.py)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    attempts = ray.remote(num_cpus=0, scheduling_strategy=here)(AttemptCounter).remote()
    seen: dict[str, set[str]] = {shard_id: set() for shard_id in sizes}
    done = 0
    feed = Feed(_stream(items, actor_cls, {**kwargs, "attempts": attempts, "max_attempts": max_attempts}, resources))
    try:
        for row in feed.rows(should_stop or (lambda: False)):
            shard_id, unit_id = row["shard_id"], row["track_id"]
            if shard_id not in seen or unit_id in seen[shard_id]:
                continue  # a retried batch delivered twice: keep the first
            seen[shard_id].add(unit_id)
            on_result(shard_id, row["result"])
            done += 1
            if len(seen[shard_id]) == sizes[shard_id]:
                del seen[shard_id]
                on_shard_done(shard_id)
    finally:
        feed.close()
        ray.kill(attempts)
    return done


def _stream(items: list[dict], actor_cls: type, kwargs: dict, resources: Resources) -> Iterator[dict]:
    """Send ``items`` (dicts with ``shard_id``, ``track_id``, ...) through a pool of ``actor_cls``
    built with ``kwargs``; yield each result row as it arrives (possibly twice after a retry)."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # blocks of at most TRACKS_PER_BLOCK items (a retry after an actor died redoes at most that many;
    # one block per item made Ray Data's start-up crawl at 10^5 tracks), and at least a few blocks
    # per actor so every actor gets work
    blocks = min(len(items), max(math.ceil(len(items) / TRACKS_PER_BLOCK), 4 * resources.actors))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        actor_cls,
        fn_constructor_kwargs=kwargs,
        batch_size=TRACKS_IN_FLIGHT,
        compute=ray.data.ActorPoolStrategy(
            size=resources.actors, max_concurrent_calls_per_actor=CALLS_IN_FLIGHT, enable_true_multi_threading=True,
        ),
        num_gpus=resources.gpus_per_actor or None,
        num_cpus=resources.cpus_per_actor,
    )  # Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1: a dead actor's batch is retried
    yield from _iter_rows(ds)


class RemixActor(_CountedActor):
    """Builds remix examples (:func:`demix.pipeline.batch.remix.build_example`); a bad example becomes a failure
    row. Like :class:`SeparatorActor`, an example whose build killed the process ``max_attempts``
    times is given up."""

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"shard_id": [], "track_id": [], "result": []}
        for shard_id, example_id, text in zip(batch["shard_id"], batch["track_id"], batch["recipe"]):
            recipe = Recipe.from_json(str(text))
            n = self._start(recipe.example_id)
            result: dict = {"row": None, "failure": None}
            if n > self.max_attempts:
                message = f"the remix worker died {n - 1} times while building this example; given up"
                result["failure"] = asdict(FailureRow(recipe.example_id, recipe.run_uri, "remix", "WorkerDied", message, n - 1))
            else:
                try:
                    result["row"] = build_example(recipe)
                except TrackError as err:
                    result["failure"] = asdict(
                        FailureRow(recipe.example_id, recipe.run_uri, err.stage, err.error_type, str(err)[:2000])
                    )
            self._finish(recipe.example_id)
            out["shard_id"].append(str(shard_id))
            out["track_id"].append(str(example_id))
            out["result"].append(json.dumps(result))
        return out


def run_remix_shards(
    shards: Sequence[tuple[str, Sequence]],
    *,
    workers: int | None,
    on_shard: Callable[[str, list[dict], list[FailureRow]], None],
    on_example: Callable[[bool], None] | None = None,
    max_attempts: int = MAX_ATTEMPTS_PER_TRACK,
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Build every recipe of ``shards`` (``(shard_id, [Recipe, ...])``) on a pool of CPU actors;
    call ``on_shard(shard_id, rows, failures)`` as each shard completes, until ``should_stop()``
    (as in :func:`run_shards`). Returns examples built."""
    items = [{"shard_id": sid, "track_id": r.example_id, "recipe": r.to_json()} for sid, recipes in shards for r in recipes]
    rows: dict[str, list[dict]] = {sid: [] for sid, _ in shards}
    failures: dict[str, list[FailureRow]] = {sid: [] for sid, _ in shards}

    def on_result(shard_id: str, text: str) -> None:
        result = json.loads(text)
        if result["row"] is not None:
            rows[shard_id].append(result["row"])
        else:
            failures[shard_id].append(FailureRow(**result["failure"]))
        if on_example is not None:
            on_example(result["row"] is not None)

    return _run_pool(
        items, RemixActor, {}, plan_resources(workers, "cpu"), {sid: len(recipes) for sid, recipes in shards}, on_result,
        lambda shard_id: on_shard(shard_id, rows.pop(shard_id), failures.pop(shard_id)), max_attempts, should_stop,
    )


def _iter_rows(ds) -> Iterator[dict]:
    yield from ds.iter_rows()
