"""Threads around the model: decoding runs ahead of it, encoding runs behind it.

Used by :func:`demix.pipeline.engine.track.separate_track`, so the model is not kept waiting on I/O
(decoding, the model and encoding all release the GIL in their heavy parts).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator


class _Raised:
    def __init__(self, err: BaseException) -> None:
        self.err = err


_DONE = object()


class Prefetch:
    """Iterate ``items`` in a worker thread, up to ``depth`` items ahead of the consumer.

    An exception in the worker is re-raised in the consumer at the same position. Leaving the
    ``with`` block stops the worker and waits for it, so the source can be closed safely after.
    """

    def __init__(self, items: Iterable, depth: int = 2) -> None:
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="demix-prefetch", daemon=True)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._items:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(_Raised(err))

    def __iter__(self) -> Iterator:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.err
            yield item

    def __enter__(self) -> Prefetch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()


class Behind:
    """Apply ``fn`` to submitted items in order, in a worker thread, at most ``depth`` behind.

    The first exception in ``fn`` is re-raised by the next :meth:`submit` or on leaving the block.
    """

    def __init__(self, fn: Callable, depth: int = 2) -> None:
        self._fn = fn
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="demix-encode", daemon=True)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._fn(item)
                except BaseException as err:  # noqa: BLE001 - re-raised by the producer
                    self._error = err

    def submit(self, item) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def __enter__(self) -> Behind:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(_DONE)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error


class Exclusive:
    """A shared/alone lock: many holders of :meth:`shared` at once, or one holder of :meth:`alone` and
    nobody else. A waiting :meth:`alone` goes first (new shared holders wait for it), so it is never starved.

    Host workers run a track that already died with its process *alone*: when the process dies again,
    that track is the only one in flight, and no other track is blamed for it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._alone or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._alone or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()
