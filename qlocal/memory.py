"""Process memory, for the peak-memory figures backends and benchmarks report."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (getrusage's ru_maxrss).

    ru_maxrss is in bytes on macOS and in KiB on Linux.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
