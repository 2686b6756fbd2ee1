"""What a training run shows on stderr: the header, the per-step progress bar, the closing summary."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qlocal import rundir
from qlocal.backends.base import StepStats
from qlocal.config import Config
from qlocal.train_data import PreparedData


class Progress:
    """The tqdm bar and what it shows after each step."""

    def __init__(self, total: int, start: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=quiet, dynamic_ncols=True,
                        file=sys.stderr)
        self.last_val: float | None = None

    def advance(self, stats: StepStats, tokens_per_s: float) -> None:
        post = {"loss": f"{stats.loss:.4f}", "tok/s": f"{tokens_per_s:.0f}"}
        for key, short in (("rewards/accuracies", "acc"), ("rewards/margins", "margin")):
            if key in stats.metrics:
                post[short] = f"{stats.metrics[key]:.3f}"
        if self.last_val is not None:
            post["val"] = f"{self.last_val:.4f}"
        self.bar.set_postfix(post)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def print_header(run: Path, cfg: Config, resolved: dict[str, Any], data: PreparedData, start: int) -> None:
    """The run's settings, printed once before the first step (resumed: the step it resumes at)."""
    lines = [
        f"run       {run}" + (f"  (resuming at step {start})" if start else ""),
        f"model     {cfg.model.name}  [{resolved['model_source']}: {resolved['model_path']}]",
        f"backend   {resolved['backend']} on {resolved.get('device', '?')} ({resolved['backend_reason']}), "
        f"dtype {resolved.get('dtype')}" + (f" ({resolved['dtype_reason']})" if resolved.get("dtype_reason") else "")
        + f", quantize {cfg.train.quantize}",
        f"data      {cfg.data.path}: {len(data.train)} train / {len(data.val)} val examples, format "
        f"{data.format}, template {data.template_name}, {data.truncated} truncated to {cfg.data.max_seq_len}",
        f"lora      rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, {resolved.get('trainable_params', 0):,} "
        f"trainable params on {', '.join(resolved.get('target_modules', []))}",
        f"steps     {resolved['total_steps']} x batch {cfg.train.batch_size} x accum {cfg.train.grad_accum}, "
        f"lr {cfg.train.lr:g} {cfg.train.lr_schedule}",
    ]
    print("\n".join(lines), file=sys.stderr)


def print_footer(run: Path, metrics: rundir.Metrics) -> None:
    """The end-of-run summary: first and last loss, last validation loss, the adapter, the next command."""
    rows = metrics.read()
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    msg = f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "done"
    if vals:
        msg += f", val loss {vals[-1]:.4f}"
    print(f"{msg}\nadapter   {run / 'adapter'}\nnext      qlocal export {run} --gguf --quant q4_k_m", file=sys.stderr)
