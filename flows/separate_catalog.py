"""The catalog flow: plan -> execute (Ray) -> commit (per shard) -> report. Thin: each task calls one
pipeline function. Runs on Prefect's ephemeral API by default, or on a Prefect server when
``PREFECT_API_URL`` is set. Storage endpoints and credentials come from the standard AWS environment
and config files, never from flow parameters (Prefect stores parameters). ``registry_module`` (see
:class:`demix.pipeline.batch.run.RunSpec`) lets a run use models registered outside :mod:`demix.models.registry`.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from demix.models import ModelLoadError
from demix.pipeline.batch import catalog as cat
from demix.pipeline.batch import manifest, report as reports, workers
from demix.pipeline.batch.run import RunSpec
from demix.pipeline.engine import SeparationSettings
from demix.pipeline.io import Encoding, StorageError, output_root


@dataclass(frozen=True)
class Plan:
    shards: list[cat.Shard]
    total: int
    skipped: int
    settings_hash: str
    model_sha256: str | None


_PERMANENT = (cat.CatalogError, ModelLoadError, ValueError, TypeError, FileNotFoundError, PermissionError)


def retryable(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the error is one no retry can fix (a bad catalog,
    model or argument, or a storage error caused by a missing or forbidden file)."""
    err = state.result(raise_on_failure=False)
    if isinstance(err, StorageError):
        err = err.__cause__
    return not isinstance(err, _PERMANENT)


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retryable, cache_policy=NO_CACHE)
def plan(catalog: str, spec: RunSpec, shard_size: int, force: bool) -> Plan:
    """Read the catalog, drop tracks already committed for the same settings, cut the rest into shards."""
    model = spec.load(device="cpu")  # resolves and verifies the weights once, for the settings hash
    digest = getattr(model, "weights_sha256", None)
    settings_hash = spec.settings_hash(digest, spec.load_presence(model).weights_sha256)
    tracks = cat.read_catalog(catalog)
    done = set() if force else manifest.committed_ok(spec.out, settings_hash)
    pending = [t for t in tracks if t.track_id not in done]
    run_id = uuid.uuid4().hex
    shards = cat.make_shards(pending, shard_size, run_id=run_id)
    return Plan(shards, len(tracks), len(tracks) - len(pending), settings_hash, digest)


@task(retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=retryable, cache_policy=NO_CACHE)
def commit(out: str, result: manifest.ShardResult) -> manifest.Commit:
    """Write one shard's parts and create its commit record (one attempt wins)."""
    return manifest.commit_shard(out, result)


@task(cache_policy=NO_CACHE)
def execute(
    the_plan: Plan, spec: RunSpec, n_workers: int | None, device: str, ray_address: str | None, progress: bool
) -> dict:
    """Run every pending track through the Ray actor pool, committing each shard as it completes."""
    logger = get_run_logger()
    workers.init_ray(ray_address)
    resources = workers.plan_resources(n_workers, device)
    logger.info("actor pool: %s", resources)
    total = sum(len(s.tracks) for s in the_plan.shards)
    stats = {"ok": 0, "failed": 0, "audio_s": 0.0, "commits": 0, "lost_commits": 0}
    started = time.perf_counter()
    bar = tqdm(total=total, unit="track", disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def on_track(row: manifest.TrackRow) -> None:
        stats[row.status] += 1
        stats["audio_s"] += row.duration_s or 0.0
        bar.update(1)

    def on_shard(result: manifest.ShardResult) -> None:
        won = commit(spec.out, result)
        stats["commits"] += 1
        if won.attempt and set(won.track_ids) != {t.track_id for t in result.tracks}:
            stats["lost_commits"] += 1

    with bar:
        workers.run_shards(
            the_plan.shards, spec, the_plan.settings_hash, resources=resources, on_shard=on_shard, on_track=on_track
        )
    stats["wall_s"] = time.perf_counter() - started
    return stats


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retryable, cache_policy=NO_CACHE)
def report(out: str, the_plan: Plan, stats: dict) -> dict:
    """Consolidate the committed manifests and publish a Markdown artifact."""
    tables = manifest.read_manifests(out)
    paths = manifest.write_consolidated(out, tables)
    summary = reports.catalog_summary(tables, paths, the_plan.total, the_plan.skipped, stats)
    markdown = reports.catalog_markdown(summary)
    create_markdown_artifact(markdown=markdown, key="separate-catalog-report", description="demix run summary")
    return summary


@flow(name="separate-catalog", log_prints=False)
def separate_catalog(
    catalog: str,
    out: str,
    model: str = "unet",
    weights: str | None = None,
    weights_sha256: str | None = None,
    model_options: dict | None = None,
    settings: dict | None = None,
    encoding: dict | None = None,
    stems: list[str] | None = None,
    two_stems: str | None = None,
    workers_count: int | None = None,
    device: str = "auto",
    ray_address: str | None = None,
    shard_size: int = 16,
    force: bool = False,
    progress: bool = True,
    registry_module: str | None = None,
    presence: str = "combined",
) -> dict:
    """Separate every track of ``catalog`` into ``out``: exactly once, resumable, with a report."""
    out = output_root(out)
    spec = RunSpec(
        out=out, model=model, weights=weights, weights_sha256=weights_sha256,
        model_options=tuple(sorted((model_options or {}).items())),
        settings=SeparationSettings(**{**(settings or {}), "device": "cpu"}), encoding=Encoding(**(encoding or {})),
        stems=tuple(stems) if stems else None, two_stems=two_stems, registry_module=registry_module,
        presence=presence,
    )
    the_plan = plan(catalog, spec, shard_size, force)
    stats = execute(the_plan, spec, workers_count, device, ray_address, progress)
    return report(spec.out, the_plan, stats)
