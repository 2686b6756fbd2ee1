"""Weights & Biases: one W&B run per qlocal run, its id kept in tracking.json so a resume continues it
(resume="allow"). wandb's own settings apply: WANDB_MODE=offline writes <dir>/wandb/offline-run-*
for `wandb sync`; WANDB_PROJECT (default qlocal), WANDB_ENTITY; WANDB_DIR, else the run folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qlocal.errors import UserError

_EXIT = {"finished": 0, "stopped": 130, "failed": 1}  # W&B marks any non-zero exit as failed


class WandbRun:
    """History rows per step (steps a previous session already sent are not sent again)."""

    def __init__(self, run: Any, skip_through: int) -> None:
        self.run = run
        self.skip_through = skip_through

    def log(self, step: int, values: dict[str, float]) -> None:
        if step > self.skip_through:
            self.run.log(values, step=step)

    def summary(self, step: int, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, status: str | None) -> None:
        self.run.finish(exit_code=_EXIT.get(status or "finished", 1))


def check_login() -> None:
    """Online W&B with no credentials fails before training (wandb.init would prompt in a terminal,
    or fail after the model has loaded): one line naming the three ways out.

    Asks wandb itself, as wandb.init does: its settings (WANDB_MODE, `wandb offline`) for the mode, and
    its credential lookup (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, .netrc, settings) without a prompt.
    A wandb whose internals moved is not checked here: wandb.init's own error still comes as one line."""
    import wandb

    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings
        if settings._offline or settings._noop:
            return
        auth = wbauth.authenticate_session(host=settings.base_url, source="qlocal", prompt=False,
                                           update_session=False)
    except (ImportError, AttributeError, TypeError):
        return
    except wandb.errors.Error as e:  # e.g. a WANDB_API_KEY of the wrong shape
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"train.report_to: wandb: {first}; fix it, or set WANDB_MODE=offline to keep the run "
                        "local") from None
    if auth is None:
        raise UserError(f"train.report_to: wandb is online ({settings.base_url}) but has no API key: set "
                        "WANDB_API_KEY or run `wandb login`, or set WANDB_MODE=offline to keep the run local "
                        "(`wandb sync` uploads it later)")


def open_run(run: Path, state: dict[str, Any], params: dict[str, Any] | None, purge_from: int | None,
             skip_through: int) -> WandbRun:
    """Start (params given) or resume the W&B run recorded in `state`."""
    import wandb
    from wandb.sdk.lib.runid import generate_id

    resuming = bool(state.get("id"))
    state.setdefault("id", generate_id())
    state.setdefault("project", os.environ.get("WANDB_PROJECT") or "qlocal")
    try:
        wb = wandb.init(project=state["project"], id=state["id"], name=run.name,
                        resume="allow" if resuming else None, config=params,
                        dir=None if os.environ.get("WANDB_DIR") else str(run),
                        settings=wandb.Settings(console="off"))  # the terminal stays qlocal's
    except wandb.errors.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"wandb: {first} (or set WANDB_MODE=offline to keep the run local; "
                        "`wandb sync` uploads it later)") from None
    return WandbRun(wb, skip_through)
