"""Starting or joining Ray, and sizing a run's actors for the cluster (a module of the Ray layer:
with :mod:`~demix.pipeline.batch.workers` and :mod:`~demix.pipeline.batch.model_actors`, the only
modules that import ray; they import it inside functions, so importing demix never loads Ray)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Resources:
    """How a run's actors are sized.

    ``actors`` host workers (the Ray Data actor pool: read, overlap-add, write), each with
    ``cpus_per_actor`` CPUs. With ``model_actors`` > 0 the model runs in that many model actors (one
    per GPU, ``gpus_per_model`` and ``cpus_per_model`` each) and host workers hold no model; with 0,
    each host worker loads the model itself (``gpus_per_actor`` GPUs, ``device``).
    """

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    device: str
    model_actors: int = 0
    gpus_per_model: float = 0.0
    cpus_per_model: float = 0.0


def init_ray(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = True) -> None:
    """Join ``address`` (``auto``, ``ray://host:10001``, ``host:6379``) or start a local instance.

    A local instance, and a driver joining a cluster on loopback, stay on 127.0.0.1 (see
    :func:`_loopback_environment`). ``verbose=False`` keeps Ray's chatter off the driver's terminal:
    workers' output is not forwarded (``log_to_driver=False``; it stays in the session's log files),
    and the ``ray`` / ``ray.data`` loggers show errors only."""
    address = address or os.environ.get("RAY_ADDRESS")  # ray.init would read it too (`ray job submit` sets it)
    loopback = not address or (address != "auto" and _on_loopback(address))
    if loopback:
        _loopback_environment(joining=bool(address))
    import ray
    import ray.data

    if not verbose:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return
    kwargs: dict = {"include_dashboard": False, "log_to_driver": verbose, "configure_logging": False}
    if loopback:
        kwargs["_node_ip_address"] = LOOPBACK
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


LOOPBACK = "127.0.0.1"


def _on_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _loopback_environment(*, joining: bool) -> None:
    """Set, before ray is imported, what keeps this driver and the Ray processes it starts on 127.0.0.1.

    Ray resolves a loopback address (``127.0.0.1:6379``, ``localhost``) to the machine's outward
    interface address and looks for the cluster there (``services.resolve_ip_for_localhost``), unless
    clusters are switched off for the platform, as on macOS and Windows: then every local address is
    loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; a cluster meant to stay on loopback is started
    with it too, see the README). Joining: a cluster on this machine started by ``ray start`` uses
    token authentication with the token in ``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN`` /
    ``RAY_AUTH_TOKEN_PATH``); Ray enables it by itself only for ``address="auto"``, so it is enabled
    here for an explicit loopback address, unless ``RAY_AUTH_MODE`` says otherwise."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray" in sys.modules:  # imported before (a test session): the switch is read at import
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False
    if joining and "RAY_AUTH_MODE" not in os.environ:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
            os.environ["RAY_AUTH_MODE"] = "token"


def plan_resources(
    workers: int | None = None, device: str = "auto", *, model_actors: int | None = None,
    host_workers: int | None = None,
) -> Resources:
    """Size a run for the cluster Ray is connected to.

    With GPUs (and ``device`` auto or cuda): one model actor per GPU (``model_actors`` or ``workers``
    fewer), each with 1 CPU; host workers fill the other CPUs (``host_workers`` to choose). Without:
    ``model_actors`` CPU model actors when asked for (the CPUs the host workers leave, divided among
    them), else ``workers`` host workers each holding the model (default: one per node-sized share of
    CPUs, see :func:`_cpu_workers`; on one machine a single worker with all its CPUs).
    """
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    cpus = max(1, int(total.get("CPU", os.cpu_count() or 1)))
    for name, value in (("workers", workers), ("model_actors", model_actors), ("host_workers", host_workers)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1. Found: {value}")
    if gpus > 0 and device in ("auto", "cuda"):
        n = min(model_actors or workers or gpus, gpus)
        return _staged(n, host_workers, cpus, device="cuda", gpus_per_model=1.0, cpus_per_model=1.0)
    if model_actors:
        host = host_workers or max(1, cpus - model_actors)
        per_model = max(1.0, float((cpus - min(host, cpus - 1)) // model_actors))
        return _staged(model_actors, host, cpus, device="cpu", gpus_per_model=0.0, cpus_per_model=per_model)
    return _cpu_workers(workers, cpus, _node_cpus())


def _node_cpus() -> list[int]:
    """CPUs of each live node of the cluster (an actor must fit on one node)."""
    import ray

    return [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]


def _cpu_workers(workers: int | None, cpus: int, nodes: list[int]) -> Resources:
    """Host workers each holding the model on a CPU cluster. Default: as many actors as the smallest
    node's CPUs fit on every node (one actor of all its CPUs on a single machine; 2 × 8 CPUs on two
    8-CPU nodes); ``workers``: that many, each with an equal share, never more CPUs than one node has."""
    largest = max(nodes, default=cpus)
    if workers is None:
        per = max(1, min(nodes, default=cpus))
        n = max(1, sum(c // per for c in nodes)) if nodes else 1
        return Resources(actors=n, gpus_per_actor=0.0, cpus_per_actor=float(per), device="cpu")
    per = max(1, min(cpus // workers, largest))
    return Resources(actors=workers, gpus_per_actor=0.0, cpus_per_actor=float(per), device="cpu")


def _staged(
    n: int, host_workers: int | None, cpus: int, *, device: str, gpus_per_model: float, cpus_per_model: float
) -> Resources:
    """Model actors and host workers: the host workers share what the model actors leave of ``cpus``
    (at least a quarter CPU each, at most one)."""
    free = max(1.0, cpus - n * cpus_per_model)
    host = host_workers or max(1, int(free))
    return Resources(
        actors=host, gpus_per_actor=0.0, cpus_per_actor=max(0.25, min(1.0, free / host)), device=device,
        model_actors=n, gpus_per_model=gpus_per_model, cpus_per_model=cpus_per_model,
    )


def shutdown_ray(abandoned: bool = False) -> None:
    """Shut Ray down (the actors stop at once). ``abandoned``: a result iterator was left running
    (see :class:`~demix.pipeline.batch.feed.Feed`); its errors once Ray is gone are expected, so Ray's loggers go silent."""
    import ray

    if abandoned:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    if ray.is_initialized():
        ray.shutdown()
