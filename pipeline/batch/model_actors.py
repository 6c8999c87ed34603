"""The model stage of a catalog run on Ray: model actors, and the stage handle host workers use.

A :class:`ModelServer` actor loads the model once (on its GPU, or its CPUs) and wraps a
:class:`~demix.pipeline.engine.ModelBatcher`: it is a threaded actor, so the ``forward`` calls of
every host worker wait in it at once while the batcher's thread runs full batches of
``--batch-size`` chunks drawn from all of them (cross-track batching; autocast, pinned host buffers
and non-blocking copies on CUDA). Host workers hold a :class:`RemoteStage` (what
:func:`~demix.pipeline.engine.separate_track` takes as ``stage``) and a :class:`ModelInfo` (what the
overlap-add and the writers need to know about the model, without its weights).

Faults: model actors are restarted by Ray (``max_restarts=-1``) and a call in flight when one died is
retried on the restarted actor (``max_task_retries``), so a killed model actor loses nothing; a chunk
that kills it every time fails its track after ``max_task_retries`` retries (``stage`` separate).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import asdict, dataclass

import numpy as np
import torch

from demix.pipeline.batch.cluster import Resources
from demix.pipeline.batch.run import RunSpec
from demix.pipeline.engine import ModelBatcher, make_runner

MAX_WAIT_S = 0.5
"""How long a model actor lets a short batch wait for more chunks. It cannot know whether a host worker
is about to send some (callers on other processes do not register), so it waits longer than an
in-process stage (50 ms): long enough for a host worker to decode its next track; a run ends with
one such wait."""

MAX_CALLS_IN_FLIGHT = 1024
"""Concurrent ``forward`` calls a model actor accepts (they wait in its batcher, holding no thread of work)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a host worker needs to know about the model: the overlap-add geometry, the sources, and
    the weights' digest for the manifests."""

    sources: tuple[str, ...]
    sample_rate: int
    audio_channels: int
    segment: float
    normalize_input: bool
    weights_sha256: str | None

    @classmethod
    def of(cls, model) -> ModelInfo:
        return cls(
            tuple(model.sources), int(model.sample_rate), int(model.audio_channels), float(model.segment),
            bool(model.normalize_input), getattr(model, "weights_sha256", None),
        )


class ModelServer:
    """A model actor (see the module docstring)."""

    def __init__(self, spec: RunSpec, device: str, threads: int, max_wait_s: float = MAX_WAIT_S) -> None:
        torch.set_num_threads(max(1, threads))
        self.model = spec.load(device=device)
        run = make_runner(self.model, device, spec.settings.dtype)
        self.batcher = ModelBatcher(run, spec.settings.batch_size, max_wait_s=max_wait_s, track_producers=False)
        self.batcher.__enter__()

    def info(self) -> dict:
        return asdict(ModelInfo.of(self.model))

    def forward(self, chunks: np.ndarray) -> np.ndarray:
        """``(k, channels, length)`` -> ``(k, sources, channels, length)``, computed in a shared batch."""
        return self.batcher.submit(torch.from_numpy(np.array(chunks))).result().numpy()

    def stats(self) -> dict:
        s = self.batcher.stats
        return {"forwards": s.forwards, "chunks": s.chunks, "mixed": s.mixed, "busy_s": s.busy_s,
                "span_s": (s.last_s or 0.0) - (s.first_s or 0.0), "batch_size": s.batch_size}


class _RemoteTicket:
    def __init__(self, ref) -> None:
        self.ref = ref

    def result(self) -> torch.Tensor:
        import ray

        return torch.from_numpy(np.array(ray.get(self.ref)))  # a writable copy of the object store's bytes


class RemoteStage:
    """The model stage as a host worker sees it: groups go to the model actors in turn."""

    def __init__(self, handles: list) -> None:
        if not handles:
            raise ValueError("a remote model stage needs at least one model actor")
        self._next = itertools.cycle(handles)

    def submit(self, chunks: torch.Tensor) -> _RemoteTicket:
        return _RemoteTicket(next(self._next).forward.remote(chunks.numpy()))

    def producer(self):
        return contextlib.nullcontext()


def start_model_actors(spec: RunSpec, resources: Resources, max_task_retries: int) -> list:
    """Start ``resources.model_actors`` :class:`ModelServer` actors and wait until each has loaded its model."""
    import ray

    spec.import_registry()
    cls = ray.remote(ModelServer).options(
        num_gpus=resources.gpus_per_model or None, num_cpus=resources.cpus_per_model,
        max_restarts=-1, max_task_retries=max_task_retries, max_concurrency=MAX_CALLS_IN_FLIGHT,
    )
    handles = [cls.remote(spec, resources.device, int(max(1, resources.cpus_per_model))) for _ in range(resources.model_actors)]
    ray.get([h.info.remote() for h in handles])  # a model that cannot load fails here, once
    return handles


def model_info(handle) -> ModelInfo:
    import ray

    return ModelInfo(**ray.get(handle.info.remote()))


def stage_stats(handles: list) -> dict:
    """The model stage's totals over every actor: forwards, mean batch fill, busy fraction."""
    import ray

    if not handles:
        return {}
    parts = ray.get([h.stats.remote() for h in handles])
    forwards = sum(p["forwards"] for p in parts)
    chunks = sum(p["chunks"] for p in parts)
    span = sum(p["span_s"] for p in parts)
    return {
        "forwards": forwards, "chunks": chunks, "mixed_forwards": sum(p["mixed"] for p in parts),
        "fill": chunks / (forwards * parts[0]["batch_size"]) if forwards else 0.0,
        "busy": sum(p["busy_s"] for p in parts) / span if span > 0 else 0.0,
    }


def stop_model_actors(handles: list) -> None:
    import ray

    for h in handles:
        ray.kill(h)
