"""The terminal side of the long commands (``demix run``, ``demix remix``): Ctrl-C, a start-up status
line, and library chatter kept off the terminal unless ``-v``.

Ctrl-C: the terminal sends SIGINT to the whole foreground process group, so Prefect's ephemeral API
server (a uvicorn child process) would die with the first one and leave the flow retrying it for
minutes. :class:`Interrupts` blocks SIGINT in this process before Prefect and Ray start; the blocked
mask is inherited by every thread and child process started after it, so only this process sees
the signal, taken by a watcher thread with ``sigwait``. The first Ctrl-C sets the stop flag the
flows poll (no more results taken, unfinished shards abandoned, Ray shut down, exit status 130); a
second one terminates our child processes and exits 130 at once.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from pathlib import Path

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def quiet_libraries(verbose: bool) -> None:
    """Keep Prefect's own lines (temporary-server notices, task states) off the terminal unless
    ``verbose``; set before Prefect is imported and only where the user has not set them. Ray's
    Python loggers are quietened by the flows (``verbose=False``); its C++ log by :class:`Chatter`."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the flows start Ray themselves; a result iterator abandoned after Ctrl-C must not start a new one
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    if verbose:
        return
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", "CRITICAL")


class Chatter:
    """Unless ``verbose``: what is written below Python to this process's stderr (file descriptor
    2: Ray's C++ core-worker log, child processes such as Prefect's API server) is discarded instead
    of reaching the terminal, while Python's ``sys.stderr`` (status line, progress bar, errors) still
    reaches it. A context manager: on exit stderr is restored (``-v`` shows these lines; Ray's own
    session logs keep theirs)."""

    def __init__(self, verbose: bool, command: str) -> None:
        self.verbose, self.command = verbose, command
        self._saved: int | None = None
        self._old_stderr = None

    def __enter__(self) -> Chatter:
        if self.verbose:
            return self
        fd = os.open(os.devnull, os.O_WRONLY)
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._old_stderr = sys.stderr
        sys.stderr = os.fdopen(os.dup(self._saved), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
        os.dup2(fd, 2)
        os.close(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        sys.stderr, self._saved = self._old_stderr, None  # the other stream stays open: loggers may hold it


def _children() -> list[int]:
    """Process ids of this process's children (Linux ``/proc``; none found elsewhere)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").glob("*/children"):
        try:
            pids += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    return pids


class Interrupts:
    """Ctrl-C handling for one command (a context manager; see the module docstring).

    ``stop`` is set by the first SIGINT; :meth:`should_stop` is what the flows poll. ``notice`` is
    the one line printed on stderr then.
    """

    def __init__(self, notice: str) -> None:
        self.notice = notice
        self.stop = threading.Event()
        self._count = 0
        self._lock = threading.Lock()
        self._closing = False
        self._watcher: threading.Thread | None = None
        self._old_handler = None

    def should_stop(self) -> bool:
        return self.stop.is_set()

    def __enter__(self) -> Interrupts:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        # a thread started before the block may still be handed the signal: Python's handler then
        # runs the same logic in the main thread
        self._old_handler = signal.signal(signal.SIGINT, lambda signum, frame: self._interrupted())
        self._watcher = threading.Thread(target=self._watch, name="demix-sigint", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing = True
        if self._watcher is not None and self._watcher.is_alive():
            signal.pthread_kill(self._watcher.ident, signal.SIGINT)
            self._watcher.join(timeout=1.0)
        signal.signal(signal.SIGINT, self._old_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def _watch(self) -> None:
        while True:
            signal.sigwait({signal.SIGINT})
            if self._closing:
                return
            self._interrupted()

    def _interrupted(self) -> None:
        with self._lock:
            self._count += 1
            count = self._count
        if count == 1:
            print(f"\ndemix: {self.notice}", file=sys.stderr, flush=True)
            self.stop.set()
            return
        print("\ndemix: aborted", file=sys.stderr, flush=True)
        for pid in _children():
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        os._exit(EXIT_INTERRUPTED)


class Status:
    """``status(text)``: one start-up phase at a time on stderr, ``status(None)``: done. On a terminal
    a spinner line with the seconds spent (redrawn in place, erased when done); nothing when stderr is
    not a terminal (logs and scripts get the summary and the errors only) or when not ``enabled``."""

    FRAMES = "|/-\\"

    @property
    def stream(self):
        return self._stream or sys.stderr  # sys.stderr as it is now (see :class:`Chatter`)

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self._stream = stream
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self._text: str | None = None
        self._since = time.monotonic()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, text: str | None) -> None:
        if not self.enabled or text == self._text:
            return
        with self._lock:
            self._text, self._since = text, time.monotonic()
        if not self.tty:
            return
        if text is None:
            self._wake.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            return
        if self._thread is None:
            self._wake.clear()
            self._thread = threading.Thread(target=self._spin, name="demix-status", daemon=True)
            self._thread.start()

    def _spin(self) -> None:
        for frame in itertools.cycle(self.FRAMES):
            with self._lock:
                text, since = self._text, self._since
            if text is None:
                break
            self.stream.write(f"\r{frame} {text} ({time.monotonic() - since:.0f} s)\x1b[K")
            self.stream.flush()
            if self._wake.wait(0.1):
                break
        self.stream.write("\r\x1b[K")
        self.stream.flush()
