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


def release() -> None:
    """Collect garbage and hand freed heap memory back to the OS where the C library keeps it.

    glibc keeps freed small blocks in the heap: loading Gemma 3's tokenizer (262k tokens) and
    dropping it leaves ~300 MB resident, so without this one export phase's peak stacks on the
    last one's leftovers."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass
