"""The model stage: one thread that runs full batches of chunks drawn from any number of tracks.

Every track's overlap-add (:mod:`demix.pipeline.engine.overlap_add`) hands its chunks to a
:class:`ModelBatcher` as groups (``(k, channels, length)``) and gets a :class:`Ticket` back; the
batcher's thread forms forwards of exactly ``batch_size`` chunks from the queued groups, in arrival
order, cutting a group between two forwards where needed (cross-track batching), and hands each group
its estimates. A forward runs with fewer chunks only when waiting cannot fill it: every producer
(:meth:`ModelBatcher.producer`) is blocked on a ticket, nobody registered as a producer, the batcher is
closing, or the oldest queued chunk has waited ``max_wait_s``.

The same object is the model stage of both front ends: ``demix separate`` shares one batcher among its
``--jobs`` track threads; in a catalog run each model actor (:mod:`demix.pipeline.batch.workers`) wraps
one, and host workers reach it through Ray. :class:`DirectRunner` is the degenerate stage: the forward
runs at once in the caller's thread (one track, no sharing).

A forward that raises fails only its own groups: when a batch mixes groups, each is run again alone, so
a chunk the model refuses fails its track and no other.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from demix.models.base import Separator

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_runner(model: Separator, device: str = "cpu", dtype: str = "float32") -> Callable[[Tensor], Tensor]:
    """``(batch, channels, length) -> (batch, sources, channels, length)`` on the host, computed on ``device``:
    inference mode, autocast for a half ``dtype``, and on CUDA a pinned host copy with non-blocking
    transfers both ways."""
    dev = torch.device(device)
    half = DTYPES[dtype]
    cuda = dev.type == "cuda"

    def run(chunks: Tensor) -> Tensor:
        if cuda:
            chunks = chunks.pin_memory()
        x = chunks.to(dev, non_blocking=True)
        ctx = torch.autocast(device_type=dev.type, dtype=half) if half is not torch.float32 else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            y = model(x)
        if not cuda:
            return y.float()
        y = y.float()  # on the device: the copy to the host is then a plain float32 transfer
        host = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(y, non_blocking=True)
        torch.cuda.current_stream(dev).synchronize()
        return host

    return run


class Ticket:
    """The estimates of one submitted group, once computed: :meth:`result` blocks until then."""

    def __init__(self, batcher: ModelBatcher | None, chunks: Tensor) -> None:
        self._batcher = batcher
        self._done = threading.Event()
        self._value: Tensor | None = None
        self._error: BaseException | None = None
        self.chunks = chunks
        self.size = chunks.shape[0]
        self.filled = 0

    def _set(self, value: Tensor | None = None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error
        self.chunks = None  # the input is not needed any more
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> Tensor:
        if not self._done.is_set():
            if self._batcher is None:
                self._done.wait()
            else:
                self._batcher._wait(self)
        if self._error is not None:
            raise self._error
        return self._value


class DirectRunner:
    """The model stage in the caller's thread: :meth:`submit` runs the forward at once."""

    def __init__(self, run: Callable[[Tensor], Tensor]) -> None:
        self.run = run

    def submit(self, chunks: Tensor) -> Ticket:
        ticket = Ticket(None, chunks)
        try:
            ticket._set(_checked(self.run(chunks), chunks.shape[0]))
        except Exception as err:  # noqa: BLE001 - the caller's result() raises it
            ticket._set(error=err)
        return ticket

    @contextlib.contextmanager
    def producer(self) -> Iterator[None]:
        yield


@dataclass
class BatchStats:
    """What the model stage did: forwards, chunks, how full its batches were and how busy it was."""

    batch_size: int
    forwards: int = 0
    chunks: int = 0
    mixed: int = 0  # forwards holding chunks of more than one group
    busy_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    first_s: float | None = None  # when the first forward started, since ``started``
    last_s: float | None = None  # when the last forward ended, since ``started``

    @property
    def fill(self) -> float:
        """Mean batch fill: chunks computed / (forwards x batch size)."""
        return self.chunks / (self.forwards * self.batch_size) if self.forwards else 0.0

    @property
    def busy(self) -> float:
        """Fraction of the time between the first forward's start and the last one's end spent in forwards."""
        if self.first_s is None or self.last_s is None or self.last_s <= self.first_s:
            return 0.0
        return self.busy_s / (self.last_s - self.first_s)


def _checked(est: Tensor, n: int) -> Tensor:
    if est.ndim != 4 or est.shape[0] != n:
        raise RuntimeError(f"model returned shape {tuple(est.shape)} for a batch of {n} chunks; expected ({n}, sources, channels, time)")
    return est


class ModelBatcher:
    """The shared model stage (see the module docstring). Use as a context manager: the thread starts
    on entry and, on exit, computes what is queued and stops.

    Args:
        run: the forward (:func:`make_runner`).
        batch_size: chunks per forward.
        max_wait_s: longest a queued chunk waits for a batch to fill while some producer is busy.
        track_producers: decide "everyone is waiting" from :meth:`producer` registrations (in one
            process); off for a remote stage, whose callers cannot register reliably (a killed caller
            would never unregister): then only ``max_wait_s`` ends a wait.
    """

    def __init__(
        self, run: Callable[[Tensor], Tensor], batch_size: int, *, max_wait_s: float = 0.05,
        track_producers: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1. Found: {batch_size}")
        self.run = run
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.track_producers = track_producers
        self.stats = BatchStats(batch_size)
        self._cond = threading.Condition()
        self._queue: deque[tuple[Ticket, float]] = deque()  # (group, time queued)
        self._queued = 0  # chunks queued and not yet taken
        self._producers = 0
        self._waiting = 0
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="demix-model", daemon=True)

    def __enter__(self) -> ModelBatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def submit(self, chunks: Tensor) -> Ticket:
        """Queue a group of ``(k, channels, length)`` chunks (k >= 1)."""
        ticket = Ticket(self, chunks)
        with self._cond:
            if self._closing:
                raise RuntimeError("the model stage is closed")
            self._queue.append((ticket, time.perf_counter()))
            self._queued += ticket.size
            self._cond.notify_all()
        return ticket

    @contextlib.contextmanager
    def producer(self) -> Iterator[None]:
        """Register the calling track as a producer for as long as the block runs."""
        with self._cond:
            self._producers += 1
        try:
            yield
        finally:
            with self._cond:
                self._producers -= 1
                self._cond.notify_all()

    def _wait(self, ticket: Ticket) -> None:
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()
        try:
            ticket._done.wait()
        finally:
            with self._cond:
                self._waiting -= 1

    def _ready(self, now: float) -> bool:
        """Whether to run a forward now (called with the lock held and something queued)."""
        if self._queued >= self.batch_size or self._closing:
            return True
        if self.track_producers and self._waiting >= self._producers:
            return True
        return now - self._queue[0][1] >= self.max_wait_s

    def _take(self) -> list[tuple[Ticket, int, int]]:
        """Up to ``batch_size`` queued chunks as ``(group, first, count)`` pieces (lock held)."""
        pieces, room = [], self.batch_size
        while room and self._queue:
            ticket, _ = self._queue[0]
            n = min(room, ticket.size - ticket.filled)
            pieces.append((ticket, ticket.filled, n))
            ticket.filled += n
            room -= n
            if ticket.filled == ticket.size:
                self._queue.popleft()
        self._queued -= self.batch_size - room
        return pieces

    def _work(self) -> None:
        parts: dict[Ticket, list[Tensor]] = {}
        while True:
            with self._cond:
                while not (self._queue and self._ready(time.perf_counter())):
                    if self._closing and not self._queue:
                        return
                    timeout = None
                    if self._queue:
                        timeout = max(1e-4, self.max_wait_s - (time.perf_counter() - self._queue[0][1]))
                    self._cond.wait(timeout)
                pieces = self._take()
            self._forward(pieces, parts)

    def _forward(self, pieces: list[tuple[Ticket, int, int]], parts: dict[Ticket, list[Tensor]]) -> None:
        whole = len(pieces) == 1 and pieces[0][2] == pieces[0][0].size
        chunks = pieces[0][0].chunks if whole else torch.cat([t.chunks[a : a + n] for t, a, n in pieces])
        start = time.perf_counter()
        try:
            est = _checked(self.run(chunks), chunks.shape[0])
        except Exception as err:  # noqa: BLE001 - handed to the groups of this batch
            self._failed(pieces, parts, err)
            return
        finally:
            self._account(start, chunks.shape[0], len({id(t) for t, _, _ in pieces}) > 1)
        offset = 0
        for ticket, a, n in pieces:
            parts.setdefault(ticket, []).append(est[offset : offset + n])
            offset += n
            if a + n == ticket.size:
                got = parts.pop(ticket)
                ticket._set(got[0] if len(got) == 1 else torch.cat(got))

    def _failed(self, pieces: list[tuple[Ticket, int, int]], parts: dict[Ticket, list[Tensor]], err: Exception) -> None:
        """A failed forward: a group alone in it gets the error; in a mixed batch each group is run
        again alone (all its chunks), so only a group the model refuses by itself fails."""
        groups = list(dict.fromkeys(t for t, _, _ in pieces))
        with self._cond:  # chunks of these groups still queued are not computed in another batch
            for ticket in groups:
                if ticket.filled < ticket.size:
                    self._queue = deque(e for e in self._queue if e[0] is not ticket)
                    self._queued -= ticket.size - ticket.filled
                    ticket.filled = ticket.size
        for ticket in groups:
            parts.pop(ticket, None)
            if len(groups) == 1:
                ticket._set(error=err)
                continue
            start = time.perf_counter()
            try:
                ticket._set(_checked(self.run(ticket.chunks), ticket.size))
            except Exception as alone:  # noqa: BLE001
                ticket._set(error=alone)
            finally:
                self._account(start, ticket.size, False)

    def _account(self, start: float, chunks: int, mixed: bool) -> None:
        end = time.perf_counter()
        s = self.stats
        s.forwards += 1
        s.chunks += chunks
        s.mixed += int(mixed)
        s.busy_s += end - start
        if s.first_s is None:
            s.first_s = start - s.started
        s.last_s = end - s.started
