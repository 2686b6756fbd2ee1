"""TensorBoard: event files in <run>/tensorboard, written by tensorboardX (no torch needed, so the
MLX backend logs the same way). `tensorboard --logdir outputs` shows every run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

LOG_DIR = "tensorboard"
_TEXT = (".yaml", ".yml", ".json", ".jinja", ".txt")
_TEXT_LIMIT = 200_000  # characters of a text artifact shown (an eval report with many samples is long)


class TensorBoard:
    """Scalars per step, hyperparameters in the hparams plugin, artifacts as images or text."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.step = 0

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.step = step

    def summary(self, step: int, values: dict[str, float]) -> None:
        self.log(step, values)

    def artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            import matplotlib.image

            self.writer.add_image(path.name, matplotlib.image.imread(path), self.step, dataformats="HWC")
        elif path.suffix in _TEXT:
            text = path.read_text(encoding="utf-8")[:_TEXT_LIMIT]
            self.writer.add_text(path.name, f"```\n{text}\n```", self.step)  # markdown: kept verbatim

    def close(self, status: str | None) -> None:
        if status is not None:
            self.writer.add_text("status", status, self.step)
        self.writer.close()


def _hparam(value: Any) -> Any:
    # The hparams plugin takes numbers, text and bools; lists and mappings become text.
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def open_run(run: Path, state: dict[str, Any], params: dict[str, Any] | None, purge_from: int | None,
         skip_through: int) -> TensorBoard:
    """A writer on <run>/tensorboard. purge_from: on resume, TensorBoard's readers drop this run's
    events from that step on (they are written again); skip_through is for trackers that cannot."""
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    state["log_dir"] = LOG_DIR  # relative: the run folder may move
    # A new events file per session; the nanosecond suffix keeps them in write order by name.
    writer = SummaryWriter(logdir=str(run / LOG_DIR), purge_step=purge_from, flush_secs=10,
                           filename_suffix=f".{time.time_ns()}")
    tb = TensorBoard(writer)
    if purge_from is not None:
        tb.step = purge_from - 1
    if params is not None:
        exp, start, _ = hparams({k: _hparam(v) for k, v in params.items() if v is not None},
                                {"loss": 0.0, "val_loss": 0.0})
        for summary in (exp, start):
            writer._get_file_writer().add_summary(summary)
    return tb
