"""Ctrl-C during training: the first one asks for a checkpoint and a clean stop, the second aborts."""

from __future__ import annotations

import signal
import sys
from typing import Any


class StopFlag:
    """First Ctrl-C (or SIGTERM) asks the loop to checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> "StopFlag":
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._old:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
