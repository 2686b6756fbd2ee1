"""<run>/train.pid: which process is training a run folder now, readable on any POSIX system.

train writes it (rank 0) once the run folder exists and removes it when it exits; a killed trainer
leaves it behind, so a reader trusts it only while that pid is alive and the process holding the pid
started before the file was written (a pid reused later belongs to a process started after the
trainer died). The start time comes from /proc on Linux, psutil where installed, else POSIX
`ps -o etime=` (macOS has no /proc). A leaf module: it imports nothing of qlocal's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

NAME = "train.pid"
PROC = Path("/proc")  # where Linux keeps process start times (a test points it elsewhere)
_SLACK_S = 2.0  # start times are whole seconds (boot time, ps's etime): compare with this much slack


def process_start(pid: int) -> float | None:
    """When process `pid` started, as a Unix time; None when it is gone or this system cannot tell."""
    if PROC.is_dir():
        try:
            ticks = int((PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
            btime = next(int(ln.split()[1]) for ln in (PROC / "stat").read_text().splitlines()
                         if ln.startswith("btime"))
            return btime + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            return None
    try:
        import psutil
    except ImportError:
        return _ps_start(pid)
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


def _ps_start(pid: int) -> float | None:
    """Start time from POSIX ps's elapsed time, `[[dd-]hh:]mm:ss`."""
    try:
        out = subprocess.run(["ps", "-o", "etime=", "-p", str(pid)], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    days, _, clock = out.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        seconds = int(days or 0) * 86400 + sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    except ValueError:
        return None
    return time.time() - seconds


@contextlib.contextmanager
def holding(run: Path) -> Iterator[None]:
    """<run>/train.pid for as long as the block runs (removed after, when it is still ours)."""
    path = run / NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(), "written": time.time()}
    tmp = path.with_name(f".{NAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                path.unlink()


def live_pid(run: Path) -> int | None:
    """The pid training `run` now, from its train.pid; None when there is none, it is stale (that
    process is gone, or its pid now belongs to a later process), or it was written on another host."""
    try:
        record = json.loads((run / NAME).read_text(encoding="utf-8"))
        pid, written = int(record["pid"]), float(record["written"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("host") != socket.gethostname() or pid <= 0:
        return None  # another machine's process (a shared folder): not ours to probe
    if os.name == "nt":
        return None  # os.kill(pid, 0) would terminate the process there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return None
    started = process_start(pid)
    if started is not None and started > written + _SLACK_S:
        return None  # the pid was reused after the trainer died
    return pid
