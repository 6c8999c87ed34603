"""Process settings of the ``demix`` command: the OpenMP wait policy, set on import before torch (and its
libgomp) loads, and :func:`tune_process`.

torch's CPU kernels run on libgomp, whose idle workers spin (about 300k iterations) at every barrier
of a parallel region, except when libgomp manages more threads than there are CPUs: then every team
spins only ~100 iterations and sleeps on a futex. ``demix separate`` runs the network in the model
thread and torch ops in its decode, cut and encode threads, so on a small machine (2 cores) its model
team is throttled while a forward in a lone main thread spins; which of the two is faster depends on
the load (spinning threads steal the cores others need: 2-4x slower forwards on a loaded 2-core box).
``PASSIVE`` gives every team the same behaviour, sleeping at once, whatever the thread and the load.
A value the user set is kept.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_TUNED = False


def tune_process() -> None:
    """Process settings for long batch work, applied by the CLI once its modules are imported:

    * ``gc.freeze()``: the objects alive after start-up (torch, numpy, Prefect and their modules,
      about a million) move to a permanent generation, so the cyclic collector stops rescanning them
      at every full collection (4 % of a host-bound run's CPU in a profile);
    * glibc ``mallopt``: buffers up to 32 MiB come from the heap and freed memory is kept (trim
      threshold 512 MiB) instead of every large array being a fresh ``mmap`` whose pages the kernel
      zeroes (11 % of that profile); no-op where the C library is not glibc.
    """
    import ctypes
    import gc

    global _TUNED
    if _TUNED:  # once per process (main() may be called again in one process, as tests do)
        return
    _TUNED = True
    gc.freeze()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def exit_process(code: int) -> None:
    """End the ``demix`` process with ``code``. When it started no service (neither Ray nor Prefect was
    imported, so no shutdown handler has work to do), it leaves through ``os._exit`` once output and
    logs are flushed: the C++ static destructors that run at a normal interpreter exit made a
    ``demix run`` refused at validation abort about one time in fifteen on a loaded 2-core machine
    (``terminate called without an active exception``, exit 134 after the right error message). It waits
    for non-daemon threads and runs Python's exit handlers (``atexit``) first, as a normal exit does."""
    import atexit
    import logging
    import sys
    import threading

    if "ray" in sys.modules or "prefect" in sys.modules:
        sys.exit(code)
    for thread in threading.enumerate():  # as a normal exit does: wait for non-daemon threads first
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # then what a normal exit runs in Python (handlers, logging), not the C++ destructors
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
