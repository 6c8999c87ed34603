"""What both flows share: which errors a retry cannot fix, the terminal side of a run (start-up
status, the progress bar, the stop flag of Ctrl-C) and the Prefect artifacts of its report, so that
each flow reads as a table of contents."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from tqdm import tqdm

from demix.models import ModelLoadError
from demix.pipeline.batch import catalog as cat
from demix.pipeline.batch import cluster
from demix.pipeline.io import StorageError, is_remote, local_path

_PERMANENT = (cat.CatalogError, ModelLoadError, ValueError, TypeError, FileNotFoundError, PermissionError)


def retryable(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the error is one no retry can fix (a bad catalog,
    model or argument, or a storage error caused by a missing or forbidden file)."""
    err = state.result(raise_on_failure=False)
    if isinstance(err, StorageError):
        err = err.__cause__
    return not isinstance(err, _PERMANENT)


class Console:
    """What the flows tell the terminal, when a caller (the CLI) asks for it: ``status(text)`` shows a
    start-up phase (``None``: the progress bar takes over), ``should_stop()`` asks to stop taking
    work (Ctrl-C), ``verbose`` lets Ray's own output through."""

    def __init__(self, status=None, should_stop=None, verbose: bool = True) -> None:
        self.status: Callable[[str | None], None] = status or (lambda text: None)
        self.should_stop: Callable[[], bool] = should_stop or (lambda: False)
        self.verbose = verbose


def start_pool(
    console: Console, ray_address: str | None, n_workers: int | None, device: str, *,
    model_actors: int | None = None, host_workers: int | None = None,
) -> cluster.Resources:
    """Start (or join) Ray and size the actors (:func:`~demix.pipeline.batch.cluster.plan_resources`),
    telling ``console`` what is happening."""
    console.status("starting Ray")
    cluster.init_ray(ray_address, verbose=console.verbose)
    resources = cluster.plan_resources(n_workers, device, model_actors=model_actors, host_workers=host_workers)
    models = f" and {resources.model_actors} model actor(s)" if resources.model_actors else ""
    console.status(f"starting {resources.actors} worker(s){models} on {resources.device}; waiting for the first result")
    get_run_logger().info("actor pool: %s", resources)
    return resources


class LazyBar:
    """A tqdm bar on stderr drawn from its first update on (until then the console's status line
    shows the start-up phase, which it ends)."""

    def __init__(self, console: Console, **kwargs) -> None:
        self.console, self.kwargs, self.bar = console, kwargs, None

    def update(self, n: int) -> None:
        if self.bar is None:
            self.console.status(None)
            self.bar = tqdm(file=sys.stderr, dynamic_ncols=True, **self.kwargs)
        self.bar.update(n)

    def __enter__(self) -> LazyBar:
        return self

    def __exit__(self, *exc) -> None:
        self.console.status(None)
        if self.bar is not None:
            self.bar.close()


def stopped(console: Console, stats: dict, total: int) -> dict:
    """Mark ``stats`` interrupted when ``console`` asked to stop before ``total`` units were back,
    and shut Ray down then: abandoned actors stop at once."""
    stats["interrupted"] = console.should_stop() and stats["ok"] + stats["failed"] < total
    if stats["interrupted"]:
        cluster.shutdown_ray(abandoned=True)
    return stats


def report_link(uri: str) -> str:
    """A link to a report: ``file://`` for a local path, the URI itself for an object store."""
    return uri if is_remote(uri) else Path(local_path(uri)).resolve().as_uri()


def publish_report(markdown: str, report: str, *, key: str, description: str) -> None:
    """Publish a run's Markdown summary as a Prefect artifact that links to its HTML ``report``, and the
    report itself as a link artifact (``<key>-html``)."""
    link = report_link(report)
    markdown = f"{markdown}\n\nHTML report (plots, failures, previews): [{report}]({link})\n"
    create_markdown_artifact(markdown=markdown, key=key, description=description)
    create_link_artifact(link=link, link_text=report, key=f"{key}-html", description=f"{description}: HTML report")
