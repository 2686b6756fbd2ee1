"""What a config value may be: the choices of enumerated keys, ranges, and keys that only make sense together.

Every failure is a UserError naming the source (file, "command line", "--set") and the key.
"""

from __future__ import annotations

from typing import Any

from qlocal.config.sections import Config
from qlocal.errors import UserError

REPORT_TO = ("tensorboard", "wandb", "mlflow")
"""The experiment trackers `train.report_to` may name (qlocal.tracking has one module each)."""

CHOICES: dict[str, tuple[str, ...]] = {
    "train.backend": ("auto", "torch", "mlx"),
    "train.quantize": ("none", "4bit", "8bit"),
    "train.lr_schedule": ("cosine", "linear", "constant"),
    "train.dtype": ("auto", "float32", "bfloat16", "float16"),
    "train.distributed": ("ddp", "fsdp"),
    "train.method": ("sft", "dpo", "orpo", "kto", "simpo"),
    "preference.loss_type": ("sigmoid", "ipo"),
    "train.report_to": REPORT_TO,  # each item of the list
    "data.format": ("auto", "alpaca", "sharegpt", "messages", "completion", "text", "pairs", "pairs_implicit", "kto"),
}


def check_choice(dotted: str, coerced: Any, source: str) -> Any:
    """`coerced` if key `dotted` takes it (a list key: with none and repeats dropped), else a UserError."""
    allowed = CHOICES.get(dotted)
    if allowed and isinstance(coerced, list):  # a list key: every item is one of the choices
        coerced = list(dict.fromkeys(v for v in coerced if v.lower() != "none"))
        bad = [v for v in coerced if v not in allowed]
        if bad:
            raise UserError(f"{source}: '{dotted}' takes {', '.join(allowed)} (comma-separated) or none, "
                            f"got {bad[0]!r}")
    elif allowed and coerced not in allowed:
        raise UserError(f"{source}: '{dotted}' must be one of {', '.join(allowed)}, got {coerced!r}")
    return coerced


def check_ranges(cfg: Config, source: str) -> None:
    """Every numeric key within its range; checked after each layer is applied."""
    positive = {
        "lora.rank": cfg.lora.rank, "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum, "data.max_seq_len": cfg.data.max_seq_len,
        "train.save_every": cfg.train.save_every, "train.eval_every": cfg.train.eval_every,
        "train.keep_last": cfg.train.keep_last, "train.log_every": cfg.train.log_every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{source}: '{key}' must be positive, got {value}")
    if cfg.train.iters is not None and cfg.train.iters <= 0:
        raise UserError(f"{source}: 'train.iters' must be positive, got {cfg.train.iters}")
    if not 0.0 <= cfg.data.val_split < 1.0:
        raise UserError(f"{source}: 'data.val_split' must be in [0, 1), got {cfg.data.val_split}")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise UserError(f"{source}: 'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.train.cpu_threads < 0:
        raise UserError(f"{source}: 'train.cpu_threads' must be >= 0 (0 = torch's default), got {cfg.train.cpu_threads}")
    if cfg.lora.layers is not None and cfg.lora.layers <= 0:
        raise UserError(f"{source}: 'lora.layers' must be positive, got {cfg.lora.layers}")
    _check_preference(cfg, source)


def _check_preference(cfg: Config, source: str) -> None:
    pc = cfg.preference
    for key in ("beta", "desirable_weight", "undesirable_weight"):
        if getattr(pc, key) <= 0:
            raise UserError(f"{source}: 'preference.{key}' must be positive, got {getattr(pc, key)}")
    if pc.orpo_lambda < 0:
        raise UserError(f"{source}: 'preference.orpo_lambda' must be >= 0, got {pc.orpo_lambda}")
    if not 0.0 <= pc.label_smoothing < 0.5:
        raise UserError(f"{source}: 'preference.label_smoothing' must be in [0, 0.5), got {pc.label_smoothing}")


def check_methods(cfg: Config, source: str) -> None:
    """Keys that only make sense together; checked once all layers are applied (a YAML file may set
    loss_type: ipo and the command line --method dpo)."""
    pc, method = cfg.preference, cfg.train.method
    if pc.loss_type == "ipo" and method != "dpo":
        raise UserError(f"{source}: 'preference.loss_type: ipo' is a dpo loss; set train.method: dpo or loss_type: sigmoid")
    if pc.loss_type == "ipo" and pc.label_smoothing:
        raise UserError(f"{source}: 'preference.label_smoothing' applies to the sigmoid loss, not ipo; drop one")
    if cfg.train.precompute_ref and method not in ("dpo", "kto"):
        raise UserError(f"{source}: 'train.precompute_ref' is for dpo and kto (the methods with a reference model), "
                        f"not {method}; drop it")
