"""The catalog flow: plan -> execute (Ray) -> commit (per shard) -> report. Thin: each task calls one
pipeline function. Runs on Prefect's ephemeral API by default, or on a Prefect server when
``PREFECT_API_URL`` is set. Storage endpoints and credentials come from the standard AWS environment
and config files, never from flow parameters (Prefect stores parameters). ``registry_module`` (see
:class:`demix.pipeline.batch.run.RunSpec`) lets a run use models registered outside :mod:`demix.models.registry`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from demix.flows.common import Console, LazyBar, publish_report, retryable, start_pool, stopped
from demix.pipeline.batch import catalog as cat
from demix.pipeline.batch import html, manifest, preflight, report as reports, workers
from demix.pipeline.batch.gc import RunLease
from demix.pipeline.batch.run import RunSpec
from demix.pipeline.io import output_root


@dataclass(frozen=True)
class Plan:
    shards: list[cat.Shard]
    total: int
    skipped: int
    settings_hash: str
    model_sha256: str | None


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retryable, cache_policy=NO_CACHE)
def plan(catalog: str, spec: RunSpec, shard_size: int, force: bool) -> Plan:
    """Read the catalog, drop tracks already committed for the same settings, cut the rest into shards."""
    todo = preflight.pending_tracks(catalog, spec, force)
    shards = cat.make_shards(todo.pending, shard_size, run_id=uuid.uuid4().hex)
    return Plan(shards, len(todo.tracks), todo.skipped, todo.settings_hash, todo.model_sha256)


@task(retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=retryable, cache_policy=NO_CACHE)
def commit(out: str, result: manifest.ShardResult) -> manifest.Commit:
    """Write one shard's parts and create its commit record (one attempt wins)."""
    return manifest.commit_shard(out, result)


@task(cache_policy=NO_CACHE)
def execute(
    the_plan: Plan, spec: RunSpec, n_workers: int | None, device: str, ray_address: str | None, progress: bool,
    console: Console, model_actors: int | None = None, host_workers: int | None = None,
) -> dict:
    """Run every pending track through the Ray actors, committing each shard as it completes."""
    total = sum(len(s.tracks) for s in the_plan.shards)
    model_stage: dict = {}
    stats = {"ok": 0, "failed": 0, "audio_s": 0.0, "commits": 0, "lost_commits": 0, "wall_s": 0.0, "model_stage": model_stage}
    if console.should_stop() or not total:
        return stopped(console, stats, total)
    resources = start_pool(console, ray_address, n_workers, device, model_actors=model_actors, host_workers=host_workers)
    started = time.perf_counter()
    bar = LazyBar(console, total=total, unit="track", disable=not progress)

    def on_track(row: manifest.TrackRow) -> None:
        bar.update(1)

    def on_shard(result: manifest.ShardResult) -> None:  # counted once committed: Ctrl-C abandons the rest
        won = commit(spec.out, result)
        stats["commits"] += 1
        for row in result.tracks:
            stats[row.status] += 1
            stats["audio_s"] += row.duration_s or 0.0
        if won.attempt and set(won.track_ids) != {t.track_id for t in result.tracks}:
            stats["lost_commits"] += 1

    with bar:
        workers.run_shards(
            the_plan.shards, spec, the_plan.settings_hash, resources=resources, on_shard=on_shard, on_track=on_track,
            should_stop=console.should_stop, stage_totals=model_stage,
        )
    stats["wall_s"] = time.perf_counter() - started
    return stopped(console, stats, total)


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retryable, cache_policy=NO_CACHE)
def report(out: str, the_plan: Plan, stats: dict, stage_seconds: dict | None = None) -> dict:
    """Consolidate the committed manifests, write the HTML report (``OUT/report/index.html``) and publish
    a Markdown artifact that links to it."""
    started = time.perf_counter()
    tables = manifest.read_manifests(out)
    paths = manifest.write_consolidated(out, tables)
    summary = reports.catalog_summary(tables, paths, the_plan.total, the_plan.skipped, stats)
    summary["stage_seconds"] = {**(stage_seconds or {}), "consolidate manifests": time.perf_counter() - started}
    samples = 0 if summary["interrupted"] else html.SAMPLES  # stopping: no time for the gallery's audio
    summary["report"] = html.write_run_report(out, summary, tables, samples=samples)
    publish_report(reports.catalog_markdown(summary), summary["report"], key="separate-catalog-report", description="demix run summary")
    return summary


@flow(name="separate-catalog", log_prints=False)
def separate_catalog(
    catalog: str,
    out: str,
    model: str = "unet",
    weights: str | None = None,
    weights_sha256: str | None = None,
    trust_weights: bool = False,
    model_options: dict | None = None,
    settings: dict | None = None,
    encoding: dict | None = None,
    stems: list[str] | None = None,
    two_stems: str | None = None,
    workers_count: int | None = None,
    model_actors: int | None = None,
    host_workers: int | None = None,
    device: str = "auto",
    ray_address: str | None = None,
    shard_size: int = 16,
    force: bool = False,
    progress: bool = True,
    registry_module: str | None = None,
    presence: str = "combined",
    should_stop: Callable[[], bool] | None = None,
    status: Callable[[str | None], None] | None = None,
    verbose: bool = True,
) -> dict:
    """Separate every track of ``catalog`` into ``out``: exactly once, resumable, with a report.

    ``should_stop`` (Ctrl-C in the CLI): once true, no more results are taken or shards committed,
    unfinished shards are abandoned, Ray is shut down, and the summary says ``interrupted``.
    ``status`` receives start-up phases; ``verbose=False`` keeps Ray's chatter off the terminal."""
    console = Console(status, should_stop, verbose)
    spec = preflight.run_spec(
        output_root(out), model, weights=weights, weights_sha256=weights_sha256, trust_weights=trust_weights,
        model_options=model_options,
        settings=settings, encoding=encoding, stems=stems, two_stems=two_stems, registry_module=registry_module,
        presence=presence,
    )
    with RunLease(spec.out):  # `demix gc` leaves alone what this run writes before it commits
        console.status("planning: reading the catalog and the committed manifests")
        started = time.perf_counter()
        the_plan = plan(catalog, spec, shard_size, force)
        planned = time.perf_counter()
        stats = execute(the_plan, spec, workers_count, device, ray_address, progress, console, model_actors, host_workers)
        seconds = {"plan": planned - started, "separate and commit": time.perf_counter() - planned}
        return report(spec.out, the_plan, stats, seconds)
