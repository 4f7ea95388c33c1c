"""How a job meets a fault: a signal becomes an interruption that ends the run KILLED and
resumable, and the clean-up calls to the store after a stop are tried, never raised."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)

CLEANUP_WAIT_S = 2.0  # between tries of closing a failed run in the store (``attempt``)

# What ends a run KILLED and resumable rather than FAILED: Ctrl-C, SIGTERM (made a
# KeyboardInterrupt below), sys.exit, and submitit's UncompletedJobError, which its signal
# handler raises in a SLURM job signalled before its time limit once its requeues are used up.
try:
    from submitit.core.utils import UncompletedJobError
    INTERRUPTS = (KeyboardInterrupt, SystemExit, UncompletedJobError)
except ImportError:  # submitit is optional for a single run
    INTERRUPTS = (KeyboardInterrupt, SystemExit)


class Interrupted(KeyboardInterrupt):
    """A job stopped by a signal: SIGINT (Ctrl-C) or SIGTERM (``kill``, a scheduler). The CLI
    exits with 128 + its number (130, 143), as a shell expects."""

    def __init__(self, signum: int):
        super().__init__(signum)  # its args, so that it pickles (a joblib worker's error)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted ({signal.Signals(self.signum).name})"


class Signals:
    """What ``signals_as_interrupt`` caught: ``received``, the number of the signal, or None."""

    received: int | None = None

    def shield(self) -> None:
        """Ignore SIGTERM from now on, for a clean-up that must finish."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Held:
    """The store calls under way in the main thread (``uninterrupted``), and a signal that came
    during one of them."""

    depth = 0
    pending: int | None = None


@contextmanager
def uninterrupted():
    """Hold back the Interrupted of ``signals_as_interrupt`` for the length of one call to the
    store: raised inside SQLite's commit, it would leave this process holding the database's
    write lock, and the clean-up calls that follow would wait for it in vain (the run would stay
    RUNNING). The signal is raised when the call returns; a second one raises at once, so that a
    store that does not answer can still be left with Ctrl-C. Elsewhere than in the main
    thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Held.depth += 1
    try:
        yield
    finally:
        _Held.depth -= 1
        signum = _Held.pending if _Held.depth == 0 else None
        if signum is not None:
            _Held.pending = None
    if signum is not None:
        raise Interrupted(signum)


@contextmanager
def signals_as_interrupt():
    """Raise Interrupted on SIGINT and SIGTERM, so that the run ends KILLED with its checkpoint
    saved instead of dying mid-write. Yields the Signals that remember which signal came:
    Lightning turns a KeyboardInterrupt during training into SystemExit(1). SIGINT stays
    ignored where it was (a background job), and the handlers are restored at the end (Lightning
    leaves SIGINT ignored). Signals belong to the main thread: elsewhere this does nothing."""
    signals = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return

    def interrupt(signum, frame):
        signals.received = signum
        if _Held.depth and _Held.pending is None:  # in a store call: raised when it returns
            _Held.pending = signum
            print(f"{signal.Signals(signum).name}: stopping once the call to the tracking store returns "
                  "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
            return
        raise Interrupted(signum)

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(signum, interrupt)
    try:
        yield signals
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def attempt(call, *args, tries: int = 1) -> bool:
    """Make one clean-up call to the store after a run stopped, up to ``tries`` times: whether
    it succeeded. A failure is logged, not raised, so that it does not hide why the run stopped."""
    for left in reversed(range(tries)):
        try:
            call(*args)
            return True
        except Exception as err:
            log.error("Closing the run: %s failed (%s: %s)%s", getattr(call, "__name__", call), type(err).__name__,
                      err, f"; trying again in {CLEANUP_WAIT_S:g} s" if left else "")
            if left:
                time.sleep(CLEANUP_WAIT_S)
    return False
