"""Ctrl-C (SIGINT) for an MPI run: raised where the run can handle it, never lost, never mid-write.

Three things go wrong with Python's default SIGINT handling in a rank of ``qprsgd run``:

1. **Lost.**  The KeyboardInterrupt can be raised inside a finalizer (a weakref callback during
   garbage collection); Python prints "Exception ignored ..." and drops it, and that rank trains
   on while the others stop.  :func:`install` makes the handler record the request first, so
   :func:`check` (called by the worker loop at each step and by the MPI transport while it waits)
   raises it again, and the dropped report is not printed.
2. **Mid-write.**  Blocking SIGINT with ``pthread_sigmask`` in the main thread does not defer it:
   the kernel hands a process-directed signal to another thread (torch's, MPI's) and Python still
   raises in the main thread at its next bytecode.  :func:`deferred` swaps the Python-level
   handler instead, so a block of HDF5 writes always completes and the interrupt is raised right
   after it.
3. **Mixed up with other failures**: handled by the caller (``cli._interrupted``).

The module holds process state (one handler per process, as signals are); only the entry point
(``cli.cmd_run_mpi``) calls :func:`install`.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

_state = {"installed": False, "pending": False}


def _handler(signum, frame):
    _state["pending"] = True
    raise KeyboardInterrupt


def install() -> None:
    """Route SIGINT through :func:`_handler` and drop the "Exception ignored" report of an
    interrupt swallowed by a finalizer (it is still pending: :func:`check` raises it).  Main
    thread only; idempotent."""
    if _state["installed"] or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _handler)
    prev = sys.unraisablehook

    def hook(u):
        if isinstance(u.exc_value, KeyboardInterrupt):
            return
        prev(u)
    sys.unraisablehook = hook
    _state["installed"] = True


def pending() -> bool:
    """True once Ctrl-C arrived in a process where :func:`install` ran."""
    return _state["pending"]


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C arrived but its exception was lost (see the module doc).
    Main thread only: worker threads of the in-process backend are stopped by their runner."""
    if _state["pending"] and threading.current_thread() is threading.main_thread():
        raise KeyboardInterrupt


@contextmanager
def deferred():
    """Hold Ctrl-C back for the block (a group of writes that must land whole): the Python-level
    handler is swapped for one that only records the signal; on exit the previous handler is
    restored and, if SIGINT came, run (it raises KeyboardInterrupt).  Outside the main thread
    (where signal handlers cannot be set) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    prev = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    except ValueError:      # not settable here (e.g. an embedded interpreter): run the block as is
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, prev)
        if held:
            if callable(prev):
                prev(signal.SIGINT, None)
            else:
                signal.raise_signal(signal.SIGINT)   # SIG_DFL ends the process, SIG_IGN ignores it
