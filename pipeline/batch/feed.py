"""A driver's view of a result iterator it must be able to stop waiting for (Ctrl-C): a daemon thread
pulls the results into a queue, and :meth:`Feed.rows` polls a stop flag while it waits. Plain Python:
the Ray iterator it wraps comes from :mod:`demix.pipeline.batch.workers`."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

STOP_POLL_S = 0.2  # how often the driver checks ``should_stop`` while it waits for the next result


class Feed:
    """Results of a Ray Data iterator, pulled by a daemon thread into a queue, so the driver can stop
    waiting for them (Ray Data's iterator has no timeout). After :meth:`close` the thread stops at
    the next result; a thread still blocked in Ray ends when Ray shuts down."""

    _END = object()

    def __init__(self, source: Iterator[dict]) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._pull, args=(source,), name="demix-results", daemon=True)
        self._thread.start()

    def _pull(self, source: Iterator[dict]) -> None:
        try:
            for row in source:
                if self._closed.is_set():
                    break
                self._queue.put(row)
        except BaseException as err:  # noqa: BLE001 - handed to the driver, which raises it
            self._queue.put(err)  # (after Ctrl-C: the errors of an abandoned job, read by nobody)
        finally:
            getattr(source, "close", lambda: None)()  # Ray Data tears its executor down
            self._queue.put(self._END)

    def rows(self, should_stop: Callable[[], bool]) -> Iterator[dict]:
        """Yield results as they come; return at the end, or as soon as ``should_stop()`` is true."""
        while not should_stop():
            try:
                item = self._queue.get(timeout=STOP_POLL_S)
            except queue.Empty:
                continue
            if item is self._END or should_stop():
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=STOP_POLL_S)
