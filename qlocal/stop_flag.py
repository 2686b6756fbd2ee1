"""Ctrl-C (or SIGTERM) during training: the first asks for a checkpoint and a clean stop after the
step, the second aborts, though never in the middle of writing a checkpoint or the adapter.

train.py holds the flag from the run folder's creation to the end of teardown, so no Ctrl-C lands
as a bare KeyboardInterrupt between the last step and the final save. A second Ctrl-C that cut the
run's only checkpoint short used to leave a folder without one, which train.py then removed.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class StopFlag:
    """The run's Ctrl-C state.

    pending: a Ctrl-C reached this process (only the handler sets it, and nothing clears it).
    requested: stop after this step. In one process that is `pending`; with several ranks
    (shared=True) only the ranks' vote in train._step sets it, so they all stop after the same step.
    """

    def __init__(self, shared: bool = False) -> None:
        self.pending = False
        self.shared = shared
        self.after_steps = False  # the last step is done: a Ctrl-C now means "finish the save, then exit"
        self._voted = False
        self._saving = 0
        self._abort_deferred = False

    @property
    def requested(self) -> bool:
        """Stop after the current step (checkpoint, exit 130)."""
        return self._voted or (self.pending and not self.shared)

    def vote(self, votes: float) -> None:
        """The sum of the ranks' `pending` at a step: any vote stops them all after that step."""
        if votes > 0:
            self._voted = True

    def __enter__(self) -> "StopFlag":
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._old:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pending:
            if self._saving:  # aborting now would throw away the write the first Ctrl-C asked for
                self._abort_deferred = True
                print("\nstill saving; aborting as soon as it is written", file=sys.stderr)
                return
            raise KeyboardInterrupt
        self.pending = True
        what = ("the last step is done: saving the adapter, then stopping" if self.after_steps
                else "stopping after this step and saving a checkpoint")
        print(f"\n{what} (Ctrl-C again to abort)", file=sys.stderr)

    @contextmanager
    def saving(self) -> Iterator[None]:
        """A write that a Ctrl-C must not cut (a checkpoint, the adapter): a second Ctrl-C during it
        aborts (KeyboardInterrupt) only once it has been written."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1
        if self._abort_deferred and not self._saving:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
