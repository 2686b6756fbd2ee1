"""qlocal.atomic: a killed writer leaves nothing at the final path, and its temp is cleaned next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from qlocal import atomic

REPO = Path(__file__).resolve().parent.parent

# A writer that stops mid-write (signal.pause) until the test kills it.
WRITER = """
import signal, sys
from pathlib import Path
from qlocal import atomic

kind, final = sys.argv[1], Path(sys.argv[2])
if kind == "file":
    with atomic.writing(final) as tmp:
        tmp.write_bytes(b"half")
        signal.pause()
elif kind == "folder":
    with atomic.building(final) as tmp:
        (tmp / "part").write_text("half")
        signal.pause()
elif kind == "swap":  # stop between moving the old folder aside and moving the new one in
    real, calls = atomic.os.replace, []

    def replace(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            signal.pause()

    atomic.os.replace = replace
    with atomic.building(final) as tmp:
        (tmp / "which").write_text("new")
"""

pytestmark = pytest.mark.skipif(os.name == "nt", reason="SIGKILL and pid checks are POSIX")


def _start(kind: str, final: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", WRITER, kind, str(final)], env=env)


def _wait_for(proc: subprocess.Popen, state: Callable[[], bool]) -> None:
    """Poll until `state()` holds; fail if the writer exits first."""
    while not state():
        assert proc.poll() is None, f"writer exited ({proc.returncode}) before reaching the state"
        time.sleep(0.01)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reaped: its pid no longer runs
    assert proc.returncode == -signal.SIGKILL


def test_temp_name_is_hidden_carries_the_pid_and_matches_the_pattern(tmp_path: Path) -> None:
    tmp = atomic.temp_path(tmp_path / "model.gguf")
    assert tmp.parent == tmp_path and tmp.name == f".model.gguf.tmp-{os.getpid()}"
    m = atomic.TEMP.match(tmp.name)
    assert m and m["name"] == "model.gguf" and int(m["pid"]) == os.getpid()
    assert atomic.TEMP.match(atomic.temp_path(tmp_path / "run", "old").name)["kind"] == "old"


def test_killed_file_writer_leaves_nothing_at_final_path_and_next_run_cleans_its_temp(tmp_path: Path) -> None:
    final = tmp_path / "report.json"
    proc = _start("file", final)
    tmp = atomic.temp_path(final, pid=proc.pid)
    _wait_for(proc, tmp.is_file)
    _kill(proc)
    assert not final.exists() and tmp.read_bytes() == b"half"

    atomic.write_text(final, "whole")
    assert final.read_text() == "whole"
    assert sorted(tmp_path.iterdir()) == [final]


def test_killed_folder_builder_leaves_nothing_at_final_path_and_next_run_cleans_its_temp(tmp_path: Path) -> None:
    final = tmp_path / "export"
    proc = _start("folder", final)
    tmp = atomic.temp_path(final, pid=proc.pid)
    _wait_for(proc, (tmp / "part").is_file)
    _kill(proc)
    assert not final.exists() and tmp.is_dir()

    with atomic.building(final) as new:
        (new / "done").write_text("yes")
    assert [p.name for p in final.iterdir()] == ["done"]
    assert sorted(tmp_path.iterdir()) == [final]


def test_killed_replacement_keeps_the_old_folder_at_final_path(tmp_path: Path) -> None:
    final = tmp_path / "export"
    final.mkdir()
    (final / "which").write_text("old")
    proc = _start("folder", final)
    _wait_for(proc, (atomic.temp_path(final, pid=proc.pid) / "part").is_file)
    _kill(proc)
    assert (final / "which").read_text() == "old"
    assert atomic.remove_stale_temps(tmp_path) and sorted(tmp_path.iterdir()) == [final]


def test_kill_between_the_two_renames_puts_the_old_folder_back(tmp_path: Path) -> None:
    final = tmp_path / "export"
    final.mkdir()
    (final / "which").write_text("old")
    proc = _start("swap", final)
    old = atomic.temp_path(final, "old", pid=proc.pid)
    _wait_for(proc, old.is_dir)
    _kill(proc)
    assert not final.exists()  # the one moment a kill finds the final path empty ...

    atomic.remove_stale_temps(tmp_path)  # ... and the next run repairs it
    assert (final / "which").read_text() == "old"
    assert sorted(tmp_path.iterdir()) == [final]


def test_live_writers_temp_is_never_removed(tmp_path: Path) -> None:
    final = tmp_path / "model.gguf"
    proc = _start("file", final)
    try:
        tmp = atomic.temp_path(final, pid=proc.pid)
        _wait_for(proc, tmp.is_file)
        assert atomic.remove_stale_temps(tmp_path) == []
        atomic.write_bytes(final, b"mine")  # another writer of the same final path sweeps it too
        assert tmp.read_bytes() == b"half" and final.read_bytes() == b"mine"
    finally:
        _kill(proc)
    assert atomic.remove_stale_temps(tmp_path) == [tmp] and not tmp.exists()


def test_own_pid_temp_not_being_written_is_stale(tmp_path: Path) -> None:
    # Containers reuse small pids: a temp with our pid that this process is not writing is a leftover.
    left = atomic.temp_path(tmp_path / "loss.png")
    left.write_bytes(b"old run")
    with atomic.writing(tmp_path / "other") as tmp:
        tmp.write_bytes(b"x")
        assert atomic.remove_stale_temps(tmp_path) == [left] and tmp.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_replacing_a_folder_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path: Path) -> None:
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "which").write_text("old")
    with atomic.building(final) as tmp:
        (tmp / "which").write_text("new")
        assert (final / "which").read_text() == "old"
    assert (final / "which").read_text() == "new"
    assert sorted(tmp_path.iterdir()) == [final]

    with pytest.raises(RuntimeError), atomic.building(final) as tmp:
        (tmp / "which").write_text("broken")
        raise RuntimeError("writer failed")
    assert (final / "which").read_text() == "new"
    assert sorted(tmp_path.iterdir()) == [final]


def test_replace_false_keeps_a_folder_another_process_finished(tmp_path: Path) -> None:
    final = tmp_path / "hf"
    with atomic.building(final, replace=False) as tmp:
        (tmp / "which").write_text("mine")
        final.mkdir()
        (final / "which").write_text("theirs")
    assert (final / "which").read_text() == "theirs"
    assert sorted(tmp_path.iterdir()) == [final]


def test_failed_file_write_leaves_neither_temp_nor_final(tmp_path: Path) -> None:
    final = tmp_path / "out.jsonl"
    with pytest.raises(OSError), atomic.writing(final) as tmp:
        tmp.write_bytes(b"part")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_remove_dir_leaves_no_folder_and_no_temp(tmp_path: Path) -> None:
    doomed = tmp_path / "step-00000002"
    (doomed / "adapter").mkdir(parents=True)
    (doomed / "state.json").write_text("{}")
    atomic.remove_dir(doomed)
    assert list(tmp_path.iterdir()) == []
