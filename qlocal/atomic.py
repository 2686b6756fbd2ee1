"""Write files and folders so that a killed writer never leaves a half-written one at the final path.

Every temp is a hidden sibling of its final path, named `.<final name>.<kind>-<pid>`:

- `tmp`: content not (yet, or no longer) at the final path: a file or folder being written, or a
  folder being deleted. A dead writer's `tmp` is removed.
- `old`: the previous final folder, moved aside while its replacement is renamed in. A dead
  writer's `old` is put back when the final path is empty (killed between the two renames), and
  removed otherwise.

The pid says whether the writer still runs: a live writer's temps are never touched, a dead one's
are cleaned by the next write of the same final path (and by `remove_stale_temps` on a folder qlocal
owns). A leaf module: it imports nothing of qlocal's own.

Durability: file contents are fsync'ed before the rename and the parent folder after it. A kill
alone would not need it (the page cache outlives the process), but after a power cut a rename that
reached the disk before the data would leave an empty or partial file at the final path.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>[1-9][0-9]*)$")
# Temps this process is writing now. A temp carrying our own pid but not listed here was left by an
# earlier process that had the same pid (containers reuse small pids), so it is stale.
_ACTIVE: set[str] = set()


def temp_path(final: Path, kind: str = "tmp", pid: int | None = None) -> Path:
    """The temp name this process (or `pid`) uses next to `final`."""
    return final.with_name(f".{final.name}.{kind}-{os.getpid() if pid is None else pid}")


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file and a rename."""
    with writing(path) as tmp:
        tmp.write_bytes(data)


def write_array(f: Any, array: Any) -> None:
    """A C-contiguous array's bytes into open file `f`. A full disk is then OSError(ENOSPC) naming
    the file, which the CLI reports in one line (numpy's tofile raises one with no errno)."""
    view = memoryview(array)
    if not view.nbytes:
        return  # (a zero-size view cannot be cast to bytes)
    try:
        f.write(view.cast("B"))
    except OSError as e:
        if e.filename or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(getattr(f, "name", ""))) from e


def write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temp file and a rename."""
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def _claimed_temp(final: Path) -> Iterator[Path]:
    """This process's temp for `final`, marked live while the block runs (dead writers' swept first)."""
    remove_stale_temps(final.parent, final.name)
    tmp = temp_path(final)
    _remove(tmp)
    _ACTIVE.add(_key(tmp))
    try:
        yield tmp
    finally:
        _ACTIVE.discard(_key(tmp))


@contextlib.contextmanager
def writing(final: Path) -> Iterator[Path]:
    """Yield a temp path for a writer that creates the file itself (GGUFWriter, llama.cpp, savefig).

    When the block ends normally the file is renamed over `final`; on any exception it is removed.
    """
    final = Path(final)
    with _claimed_temp(final) as tmp:
        try:
            yield tmp
            _fsync(tmp)
            os.replace(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
    _fsync(final.parent)


@contextlib.contextmanager
def scratch(final: Path) -> Iterator[Path]:
    """Yield a temp path next to `final` for a file only read inside the block (a probe, a check).

    It never reaches `final`: it is removed when the block ends, or by the next sweep of `final`'s
    temps if this process is killed first.
    """
    with _claimed_temp(Path(final)) as tmp:
        try:
            yield tmp
        finally:
            _remove(tmp)


@contextlib.contextmanager
def building(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder to fill; when the block ends normally it becomes `final`.

    An existing `final` stays in place until the new folder is complete, then is swapped out and
    deleted; with replace=False an existing `final` (another process finished first) is kept and
    the new folder discarded. On any exception the temp folder is removed.
    """
    final = Path(final)
    remove_stale_temps(final.parent, final.name)
    tmp, old = temp_path(final), temp_path(final, "old")
    _remove(tmp)
    keys = {_key(tmp), _key(old)}
    _ACTIVE.update(keys)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        _fsync_tree(tmp)
        if not final.exists():
            os.replace(tmp, final)
        elif replace:
            _remove(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _fsync(final.parent)
            _remove(old)
    finally:
        _remove(tmp)  # still here after an exception, or when an existing final was kept
        _ACTIVE.difference_update(keys)
    _fsync(final.parent)


def remove_dir(path: Path) -> None:
    """Delete a folder by renaming it to a temp name first: a kill mid-delete never leaves a
    half-deleted folder at `path` (the temp is cleaned by the next sweep)."""
    doomed = temp_path(path)
    _remove(doomed)
    os.replace(path, doomed)
    _remove(doomed)


def remove_stale_temps(folder: Path, name: str | None = None) -> list[Path]:
    """Clean the temps that dead writers left in `folder` (only those of final name `name` if given).

    Returns the temps removed or put back. Temps of live processes are left alone.
    """
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    cleaned = []
    for entry in entries:
        m = TEMP.match(entry.name)
        if not m or (name is not None and m["name"] != name) or _alive(int(m["pid"]), entry):
            continue
        final = entry.with_name(m["name"])
        if m["kind"] == "old" and not os.path.lexists(final):
            # Killed between moving the old folder aside and the new one in: put the old one back.
            with contextlib.suppress(FileNotFoundError):  # another sweeper was first
                os.replace(entry, final)
        else:
            _remove(entry)
        cleaned.append(entry)
    return cleaned


def _alive(pid: int, temp: Path) -> bool:
    if pid == os.getpid():
        return _key(temp) in _ACTIVE
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate it there; never guess
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but is not ours (EPERM), or cannot tell: leave it
    return True


def _key(path: Path) -> str:
    # One spelling per temp, however the caller spelled the folder (relative, via a symlink).
    return os.path.join(os.path.realpath(path.parent), path.name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk (where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. folders on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for f in files:
            _fsync(Path(folder, f))
        _fsync(Path(folder))
