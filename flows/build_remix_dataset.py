"""The remix flow: plan -> build (Ray) -> commit (per shard) -> report. Thin: each task calls one
pipeline function (:mod:`demix.pipeline.batch.remix`, :mod:`demix.pipeline.batch.manifest`,
:mod:`demix.pipeline.batch.workers`, :mod:`demix.pipeline.batch.report`).

Exactly once like the catalog flow: examples have deterministic ids and file keys, rows reach
``remixes.parquet`` only through a shard's create-once commit record, and a rerun skips examples
already committed. Storage credentials come from the standard AWS environment, never parameters.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from demix.flows.common import Console, LazyBar, retryable, start_pool, stopped  # retryable: RemixError is a ValueError
from demix.pipeline.batch import manifest, remix, report as reports, workers
from demix.pipeline.batch.gc import RunLease
from demix.pipeline.io import join, output_root


@dataclass(frozen=True)
class RemixPlan:
    shards: list[tuple[str, list[remix.Recipe]]]
    total: int
    skipped: int
    digest: str


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retryable, cache_policy=NO_CACHE)
def plan(run_uri: str, out: str, config: remix.RemixConfig, shard_size: int, labelled: str | None = None) -> RemixPlan:
    """Read the run's committed manifests, plan every example (weak ones with ``labelled``), drop those
    already committed, shard."""
    tables = manifest.read_manifests(run_uri)
    sources = remix.stem_sources(tables["stems"], tables["tracks"])
    if labelled is not None:
        recipes = remix.plan_weak(sources, tables["tracks"], labelled, config, run_uri=run_uri, out=out)
    else:
        recipes = remix.plan_remixes(sources, config, run_uri=run_uri, out=out)
    done = remix.committed_examples(out)
    pending = [r for r in recipes if r.example_id not in done]
    shards = remix.shard_recipes(pending, shard_size, run_id=uuid.uuid4().hex)
    return RemixPlan(shards, len(recipes), len(recipes) - len(pending), recipes[0].plan_digest)


@task(retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=retryable, cache_policy=NO_CACHE)
def commit(out: str, shard_id: str, rows: list[dict], failures: list[manifest.FailureRow]) -> manifest.Commit:
    """Write one shard's ``remixes`` and ``failures`` parts and create its commit record."""
    return remix.commit_examples(out, shard_id, rows, failures)


@task(cache_policy=NO_CACHE)
def execute(the_plan: RemixPlan, out: str, n_workers: int | None, ray_address: str | None, progress: bool, console: Console) -> dict:
    """Build every pending example on the Ray actor pool, committing each shard as it completes."""
    total = sum(len(r) for _, r in the_plan.shards)
    stats = {"ok": 0, "failed": 0, "commits": 0, "wall_s": 0.0}
    if console.should_stop() or not total:
        return stopped(console, stats, total)
    start_pool(console, ray_address, n_workers, "cpu")
    get_run_logger().info("remix: %d examples to build in %d shards", total, len(the_plan.shards))
    started = time.perf_counter()
    with LazyBar(console, total=total, unit="example", disable=not progress) as bar:

        def on_example(ok: bool) -> None:
            bar.update(1)

        def on_shard(shard_id: str, rows: list[dict], failures: list[manifest.FailureRow]) -> None:
            commit(out, shard_id, rows, failures)  # counted once committed: Ctrl-C abandons the rest
            stats["commits"] += 1
            stats["ok"] += len(rows)
            stats["failed"] += len(failures)

        workers.run_remix_shards(
            the_plan.shards, workers=n_workers, on_shard=on_shard, on_example=on_example, should_stop=console.should_stop
        )
    stats["wall_s"] = time.perf_counter() - started
    return stopped(console, stats, total)


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retryable, cache_policy=NO_CACHE)
def report(out: str, split: str, the_plan: RemixPlan, stats: dict) -> dict:
    """Consolidate ``remixes.parquet`` / ``failures.parquet``, write ``<split>/truth.json``, publish an artifact."""
    remixes, failures = remix.consolidated(out)
    rows = [r for r in remixes.to_pylist() if r["split"] == split]
    paths = manifest.write_consolidated(out, {"remixes": remixes, "failures": failures})
    truth_uri = remix.write_truth(out, split, rows)
    summary = reports.remix_summary(
        remixes, failures, rows, {**paths, "truth": truth_uri}, join(out, split), the_plan.total, the_plan.skipped, stats
    )
    markdown = reports.remix_markdown(summary)
    create_markdown_artifact(markdown=markdown, key="build-remix-dataset-report", description="demix remix summary")
    return summary


@flow(name="build-remix-dataset", log_prints=False)
def build_remix_dataset(
    run_uri: str,
    out: str,
    examples: int,
    seed: int = 0,
    seconds: float | None = None,
    gain_db: tuple[float, float] = (-3.0, 3.0),
    split: str = "train",
    workers_count: int | None = None,
    ray_address: str | None = None,
    shard_size: int = 32,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    status: Callable[[str | None], None] | None = None,
    verbose: bool = True,
    labelled: str | None = None,
) -> dict:
    """Build ``examples`` remixed examples from the committed separation run at ``run_uri`` into ``out``;
    with ``labelled`` (a MUSDB-layout folder of true stems) the weak kind of
    :mod:`demix.pipeline.batch.remix.weak`.

    ``should_stop``, ``status`` and ``verbose`` as in :func:`demix.flows.separate_catalog.separate_catalog`."""
    console = Console(status, should_stop, verbose)
    config = remix.RemixConfig(examples=examples, seed=seed, seconds=seconds, gain_db=tuple(gain_db), split=split)
    run_uri, out = output_root(run_uri), output_root(out)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1. Found: {shard_size}")
    with RunLease(out):  # `demix gc OUT` leaves alone what this run writes before it commits
        console.status("planning: reading the run's manifests and the committed examples")
        the_plan = plan(run_uri, out, config, shard_size, labelled)
        stats = execute(the_plan, out, workers_count, ray_address, progress, console)
        return report(out, config.split, the_plan, stats)
