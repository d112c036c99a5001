"""SIGTERM and SIGINT while a command writes something that must be whole: training's steps and checkpoints,
an import's or ``bn-stats``' new run.

``Interrupts`` takes both signals in hand for a ``with`` block (main thread only; elsewhere it does nothing):

* the first is recorded (``requested``). While ``defer`` is set the code goes on and checks ``requested`` where
  it can stop cleanly (training: after the current step, with a checkpoint; a new run: before it is published,
  then it removes what it wrote). Otherwise it is also raised at once as ``KeyboardInterrupt``; Python may lose
  that exception (raised inside a garbage-collection callback it is printed as "Exception ignored" and dropped),
  so ``check()`` raises it again from the record at the next point where stopping is clean;
* a second gives up at once: ``KeyboardInterrupt``. With ``hard=True`` (a new run's save in flight, which takes
  a second or two and whose writer threads would recreate what is removed under them) the second is said and
  the save goes on, so that a double Ctrl-C still leaves nothing; a third exits with status 130 right away,
  after ``cleanup`` (the build folder removed as far as the writers let it; what is left, the next import or
  ``bn-stats`` into the same folder removes, as after a kill -9).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable


class Interrupts:
    def __init__(self, defer: bool = True, hard: bool = False):
        self.requested = False
        self.defer = defer
        self.hard = hard
        self.cleanup: Callable[[], None] | None = None
        self._count = 0
        self._old: dict = {}

    def __enter__(self) -> Interrupts:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        self._old_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        return self

    def _unraisable(self, unraisable) -> None:
        # the KeyboardInterrupt Python drops (see the module docstring) is recorded: no "Exception ignored" traceback
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and self.requested):
            self._old_hook(unraisable)

    def _handle(self, signum, frame):
        self._count += 1
        if self._count == 1:
            self.requested = True
            if not self.defer:
                raise KeyboardInterrupt
            return
        if not self.hard:  # a second signal: give up at once
            raise KeyboardInterrupt
        if self._count == 2:
            sys.stderr.write("resflax: interrupted: the save in flight finishes, then what it wrote is removed "
                             "(interrupt once more to stop at once)\n")
            sys.stderr.flush()
            return
        with contextlib.suppress(Exception):
            if self.cleanup is not None:
                self.cleanup()
            sys.stderr.write("resflax: error: interrupted three times: stopped at once\n")
            sys.stderr.flush()
        os._exit(130)

    def check(self) -> None:
        """``KeyboardInterrupt`` if a signal came (whether or not its exception reached this far)."""
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        sys.unraisablehook = self._old_hook


def current() -> Interrupts | None:
    """The ``Interrupts`` whose handler is installed for SIGINT now (the command line's, or a writer's), if any."""
    handler = signal.getsignal(signal.SIGINT)
    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, Interrupts) else None


@contextlib.contextmanager
def deferred():
    """A block that an interrupt should not cut (a library's read whose threads would report the cut: Orbax's
    asyncio loop closed under its tensorstore reads prints "Event loop is closed"): the installed ``Interrupts``
    records a signal instead of raising it, and raises it after the block. Without one installed, nothing."""
    owner = current()
    if owner is None:
        yield
        return
    before = owner.defer
    owner.defer = True
    try:
        yield
    finally:
        owner.defer = before
    owner.check()


def check_interrupted() -> None:
    """``KeyboardInterrupt`` if the installed ``Interrupts`` recorded a signal: before a command writes its output."""
    owner = current()
    if owner is not None:
        owner.check()
