"""The run folder: outputs/<run>/{config.yaml, adapter/, checkpoints/, metrics.jsonl, loss.png}.

Everything here writes to a temporary name and renames, so a killed run never leaves a
half-written file at a final path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from qlocal import atomic
from qlocal import config as config_mod
from qlocal.config import Config
from qlocal.errors import UserError

if TYPE_CHECKING:
    from qlocal.backends.base import Backend

_CKPT = re.compile(r"^step-(\d+)$")


def check_available(path: Path, overwrite: bool) -> None:
    """Fail early (before loading a model) when the run folder exists or cannot be created."""
    if path.exists() and not overwrite:
        raise UserError(f"{path}: run folder already exists; pass --overwrite to replace it, "
                        f"--resume {path} to continue it, or --name to pick another")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot create the run folder ({parent} is not a writable folder); "
                        "choose another --output-dir")


def create(path: Path, overwrite: bool) -> None:
    """Make a fresh run folder; an existing one is replaced only with overwrite."""
    check_available(path, overwrite)
    if path.exists():
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True)
        (path / "checkpoints").mkdir()
    except OSError as e:
        raise UserError(f"{path}: cannot create run folder ({e.strerror}); choose another --output-dir") from None


def looks_like_path(target: str) -> bool:
    """Whether a command's TARGET is meant as a local path, not a hub id: outputs/..., export/...,
    ./, ../, /, ~, three or more parts, or a first part that is a local folder."""
    parts = Path(target).parts
    return (target.startswith(("outputs/", "export/", "./", "../", "/", "~")) or len(parts) > 2
            or (len(parts) == 2 and Path(parts[0]).is_dir()))


def run_names(folder: Path, exports: bool = False) -> list[str]:
    """Names of the run folders (config.yaml) directly inside `folder`, sorted by name; with
    `exports`, export folders (export.json) too. Hidden names (atomic temps) never count."""
    if not folder.is_dir():
        return []
    marks = ("config.yaml", "export.json") if exports else ("config.yaml",)
    return sorted(p.name for p in folder.iterdir()
                  if not p.name.startswith(".") and any((p / m).is_file() for m in marks))


def check_exists(target: str | Path) -> None:
    """A run or export path that does not exist: one line naming the runs and exports its folder
    holds (every command taking outputs/<run> or export/<run> says it the same way)."""
    path = Path(target).expanduser()
    if path.exists() or not looks_like_path(str(target)):
        return
    kind = {"export": "export folder", "outputs": "run folder"}.get(path.parts[0], "folder")
    folder = path.parent
    if not folder.is_dir():
        how = {"run folder": "; train one with qlocal train", "export folder": "; make one with qlocal export outputs/<run>"}
        raise UserError(f"{target}: no such {kind}, and {folder}/ does not exist here{how.get(kind, '')}")
    near = run_names(folder, exports=True)
    if not near:
        raise UserError(f"{target}: no such {kind}" + (f"; {folder}/ holds no runs or exports" if kind != "folder" else ""))
    shown = ", ".join(near[:8]) + (", ..." if len(near) > 8 else "")
    raise UserError(f"{target}: no such {kind}; {folder}/ holds {shown}")


def check_finished(run: Path, shown: str | None = None) -> None:
    """A run folder whose adapter/ is not written yet: say whether it is still training (its
    train.pid) or was stopped (its last checkpoint), and what to do. `shown` is the run as the
    user should type it (the studio passes outputs/<name> for its absolute path)."""
    from qlocal import pidfile

    if (run / "adapter" / "adapter_config.json").is_file() or not (run / "config.yaml").is_file():
        return
    name = shown or str(run)
    pid = pidfile.live_pid(run)
    if pid is not None:
        raise UserError(f"{name}: is still training (pid {pid}); its adapter/ is written when training ends, "
                        "so wait for it (or stop it with Ctrl-C and finish it later with --resume)")
    ckpts = checkpoints(run)
    if ckpts:
        raise UserError(f"{name}: training stopped at step {ckpts[-1][0]} before the end, so there is no adapter/ "
                        f"yet; finish it with: qlocal train --resume {name}")
    raise UserError(f"{name}: training ended before its first checkpoint, so there is nothing to use; train it again")


def not_a_run(path: Path) -> UserError:
    """The error for a folder without config.yaml; an export folder (export.json) names its run."""
    try:
        came_from = json.loads((path / "export.json").read_text(encoding="utf-8")).get("run")
    except (OSError, ValueError, AttributeError):
        came_from = None
    if came_from:  # the usual slip: export/<run> where outputs/<run> is meant
        return UserError(f"{path}: an export folder, not a run folder; give the run it was exported from: {came_from}")
    return UserError(f"{path}: not a qlocal run folder (no config.yaml); give outputs/<run>")


def load_config(run: Path) -> tuple[Config, dict[str, Any]]:
    """Read a run's resolved config.yaml: (Config, resolved facts)."""
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise not_a_run(run)
    doc = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    resolved = doc.pop("resolved", {}) or {}
    return config_mod.from_dict(doc, str(cfg_path)), resolved


def save_dir_atomic(final: Path, fill: Callable[[Path], None]) -> None:
    """Create a folder by filling a temp sibling and renaming it over `final` (see qlocal.atomic)."""
    with atomic.building(final) as tmp:
        fill(tmp)


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Completed checkpoints, oldest first."""
    found = []
    folder = run / "checkpoints"
    if folder.is_dir():
        for p in folder.iterdir():
            m = _CKPT.match(p.name)
            if m and (p / "state.json").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(run: Path, step: int, state: dict[str, Any], backend: Backend, keep_last: int) -> Path:
    """Write checkpoints/step-N (adapter, optimizer, RNG, state.json) and drop the oldest beyond keep_last."""
    final = run / "checkpoints" / f"step-{step:08d}"
    atomic.remove_stale_temps(run)  # loss.png, config.yaml, adapter/ ... of a killed run
    atomic.remove_stale_temps(run / "checkpoints")  # half-written or half-deleted by a killed run
    for incomplete in (run / "checkpoints").glob("step-*"):  # lost its state.json: never resumable
        if not (incomplete / "state.json").is_file():
            shutil.rmtree(incomplete, ignore_errors=True)

    def fill(tmp: Path) -> None:
        backend.save_adapter(tmp / "adapter")
        backend.save_state(tmp)
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")

    save_dir_atomic(final, fill)
    for _, old in checkpoints(run)[:-keep_last]:
        # Renamed before deleting: a kill mid-delete leaves a hidden temp (cleaned up next save),
        # never a step-N folder that has lost its state.json.
        atomic.remove_dir(old)
    return final


class Metrics:
    """Append-only metrics.jsonl; on resume, lines past the checkpoint's step are dropped.

    on_write, when set, gets every record written (the run's experiment trackers, qlocal.tracking);
    logged_through is the last step the file held before resume cut it back (0 when fresh).
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        self.on_write: Callable[[dict[str, Any]], None] | None = None
        self.logged_through = 0
        if resume_step is not None and path.exists():
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            self.logged_through = max((json.loads(ln).get("step", 0) for ln in lines), default=0)
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            atomic.write_text(path, "".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.on_write is not None:
            self.on_write(record)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def plot_losses(metrics: Metrics, out: Path, title: str) -> None:
    """loss.png: training loss per step and validation loss where measured; a preference run adds
    a second panel with reward accuracy and margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics.read()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    acc = [(r["step"], r["rewards/accuracies"]) for r in rows if "rewards/accuracies" in r]
    margin = [(r["step"], r["rewards/margins"]) for r in rows if "rewards/margins" in r]
    panels = 2 if acc or margin else 1
    fig, axes = plt.subplots(panels, 1, figsize=(7, 4 * panels), squeeze=False, sharex=True)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if panels == 2:
        _plot_rewards(axes[1][0], acc, margin)
    try:
        with atomic.writing(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")  # the temp name has no .png
    finally:
        plt.close(fig)


def _plot_rewards(ax: Any, acc: list[tuple[int, float]], margin: list[tuple[int, float]]) -> None:
    """Reward accuracy (left axis, 0-1) and reward margin (right axis) per step."""
    if acc:
        ax.plot(*zip(*acc), color="tab:green", label="reward accuracy", linewidth=1.2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("reward accuracy")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if margin:
        right = ax.twinx()
        right.plot(*zip(*margin), color="tab:purple", label="reward margin", linewidth=1.2)
        right.set_ylabel("reward margin")
        lines = ax.get_lines() + right.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="best")
    elif acc:
        ax.legend()


def save_config_with_template(run: Path, cfg: Config, resolved: dict[str, Any], template: str) -> None:
    """config.yaml (settings + resolved facts) and chat_template.jinja: all export needs to know."""
    atomic.write_text(run / "chat_template.jinja", template)
    config_mod.save(cfg, run / "config.yaml", extra=resolved)
