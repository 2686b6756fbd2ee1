"""Trainings started outside the studio (`qlocal train` in a terminal), found by their processes.

Everywhere, train's <run>/train.pid says a run is live once its folder exists (qlocal.pidfile, read by
qlocal.studio.runs). On Linux the studio also reads /proc, which sees a training from its start: a
process whose argv is qlocal's `train`, its working folder, and its options give the run folder
(`--resume RUN`, or `--output-dir`/`--name`, `--set run.*`, a `--config` file's run section). A run
left to its default name (`<model>-<date>-<time>`, stamped when train starts) is the first such
folder stamped at or after the process started. Without /proc this finds nothing; train.pid does.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from qlocal import pidfile
from qlocal.config import Config

_STAMP = re.compile(r"-(\d{8}-\d{6})$")


def _train_args(argv: list[str]) -> list[str] | None:
    """The arguments after `train` when argv runs qlocal's train command, else None."""
    for i, a in enumerate(argv[:4]):
        name = Path(a).name
        if name == "qlocal" or (a == "-m" and i + 1 < len(argv) and argv[i + 1] in ("qlocal", "qlocal.cli")):
            rest = argv[i + 1:] if name == "qlocal" else argv[i + 2:]
            return rest[1:] if rest[:1] == ["train"] else None
    return None


def _options(args: list[str]) -> dict[str, Any]:
    """The run-locating options of a train argv (last one wins, like click)."""
    out: dict[str, Any] = {}
    keys = {"--resume": "resume", "--name": "run.name", "--output-dir": "run.output_dir", "-o": "run.output_dir",
            "--model": "model.name", "-m": "model.name", "--config": "config"}
    it = iter(args)
    for a in it:
        flag, eq, val = a.partition("=")
        if flag in keys or flag == "--set":
            value = val if eq else next(it, "")
            if flag == "--set":
                k, _, v = value.partition("=")
                if k.strip() in ("run.name", "run.output_dir", "model.name"):
                    out[k.strip()] = v.strip()
            else:
                out[keys[flag]] = value
    return out


def _from_config(cwd: Path, opts: dict[str, Any]) -> None:
    """Fill run/model keys the command line left unset from its --config YAML, when readable."""
    if "config" not in opts:
        return
    import yaml

    try:
        doc = yaml.safe_load((cwd / opts["config"]).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return
    for sec, key in (("run", "name"), ("run", "output_dir"), ("model", "name")):
        value = (doc.get(sec) or {}).get(key) if isinstance(doc, dict) else None
        if value is not None:
            opts.setdefault(f"{sec}.{key}", str(value))


def _default_named(folder: Path, model: str, started: float | None) -> Path | None:
    """The run a default-named train made: `<model short>-<stamp>`, the first stamped since it started."""
    short = Path(model.rstrip("/")).name.replace("/", "-") or "model"
    best: tuple[float, Path] | None = None
    try:
        entries = list(folder.iterdir())
    except OSError:
        return None
    for p in entries:
        m = _STAMP.search(p.name)
        if not m or p.name[: m.start()] != short:
            continue
        stamp = datetime.strptime(m.group(1), "%Y%m%d-%H%M%S").timestamp()
        if started is None or stamp >= started - 1.0:  # the stamp has whole seconds
            if best is None or stamp < best[0]:
                best = (stamp, p)
    return best[1] if best else None


def cli_trainings() -> dict[Path, int]:
    """{resolved run folder: pid} of every live `qlocal train` process this user can read."""
    found: dict[Path, int] = {}
    proc = pidfile.PROC
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode("utf-8", "replace").split("\0")[:-1]
            args = _train_args(argv)
            if args is None:
                continue
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        opts = _options(args)
        if "resume" in opts:
            run: Path | None = cwd / opts["resume"]
        else:
            _from_config(cwd, opts)
            out = cwd / opts.get("run.output_dir", "outputs")
            started = pidfile.process_start(int(entry.name))
            run = out / opts["run.name"] if opts.get("run.name") else \
                _default_named(out, opts.get("model.name", Config().model.name), started)
        if run is not None:
            found.setdefault(run.resolve(), int(entry.name))
    return found
