"""Stopping a cell that runs in a thread other than the main one (a Dask worker's task).

Python delivers a signal to the main thread only, so Ctrl-C or SIGTERM never reaches a
cell running in a worker's thread pool. A thread that runs a cell registers itself with
:func:`interruptible`; :func:`interrupt` then raises ``KeyboardInterrupt`` inside it, which
the runner turns into what a Ctrl-C gives on one machine: the last epoch checkpoint stays,
the MLflow run is marked KILLED, and the next attempt resumes it.

The exception is raised asynchronously (at the thread's next Python instruction: a long
C call such as one big convolution finishes first). :func:`stop_requested` is the polite
form: the runner's per-epoch report checks it, so a cell stops at its next epoch end even
where library code swallowed the exception.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Iterator

_lock = threading.Condition()
_cells: dict[int, str] = {}  # thread ident -> token of the suite run that started the cell
_stopping: set[int] = set()  # threads already sent their KeyboardInterrupt (once only)


@contextlib.contextmanager
def interruptible(token: str = "") -> Iterator[None]:
    """Run the block as a cell :func:`interrupt` can stop (``token`` names whose cell it is)."""
    ident = threading.get_ident()
    with _lock:
        _cells[ident] = token
    try:
        yield
    finally:
        with _lock:
            _cells.pop(ident, None)
            _stopping.discard(ident)
            _lock.notify_all()


def interrupt(token: str | None = None) -> int:
    """Raise ``KeyboardInterrupt`` in every registered cell thread (of ``token`` only, if
    given). Returns how many cells were told to stop."""
    n = 0
    with _lock:
        for ident, owner in _cells.items():
            if token is not None and owner != token:
                continue
            n += 1
            if ident in _stopping:
                continue  # a second exception would cut short its own 'mark killed'
            _stopping.add(ident)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt))
    return n


def stop_requested() -> bool:
    """Whether the calling thread's cell has been told to stop."""
    with _lock:
        return threading.get_ident() in _stopping


def wait_stopped(token: str | None = None, timeout: float = 20.0) -> bool:
    """Wait until no registered cell (of ``token``) runs any more; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    with _lock:
        while any(token is None or owner == token for owner in _cells.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _lock.wait(left)
    return True


def running(token: str | None = None) -> int:
    """How many registered cells (of ``token``) run now."""
    with _lock:
        return sum(token is None or owner == token for owner in _cells.values())


class StopOnSignal:
    """SIGTERM/SIGINT handlers for a process whose cells run in other threads (a Dask
    worker): the signal stops every cell (each marks its run KILLED), then, once they have
    stopped (at most ``grace`` seconds), the handler that was there before runs (the
    default one ends the process). A second signal runs it at once. Install from the main
    thread only."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace: float = 20.0):
        self.grace = grace
        self.previous: dict[int, object] = {}
        self.fired: set[int] = set()

    def install(self) -> bool:
        """Install the handlers; False (nothing done) outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self.previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum in self.fired:  # the cells have stopped (or a second signal): as before
            self._previous(signum, frame)
            return
        self.fired.add(signum)
        interrupt()
        # wait off the main thread: it may be the event loop that reports the cells' ends
        threading.Thread(target=self._resend, args=(signum,), daemon=True, name="qbench-stop").start()

    def _resend(self, signum: int) -> None:
        wait_stopped(timeout=self.grace)
        os.kill(os.getpid(), signum)  # back in the main thread, to the previous handler

    def _previous(self, signum, frame) -> None:
        previous = self.previous.get(signum, signal.SIG_DFL)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            os.kill(os.getpid(), signum)  # the default action: end the process
