"""Typed run configuration: defaults < YAML file < CLI flags < --set key=value.

One dataclass per concern; the field docstrings (comments) are the reference for every key.
Unknown keys and values of the wrong type are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlocal import atomic
from qlocal.errors import UserError


@dataclass
class ModelConfig:
    name: str = "gemma-3-270m"
    """Base model: a local HF folder, a hub id (org/name) or a built-in alias."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name` is a hub id."""
    chat_template: str | None = None
    """None = the model's own template; else a named fallback (chatml, llama3, gemma, mistral,
    alpaca) or a path to a .jinja file."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run. Off unless asked for."""
    allow_pickle: bool = False
    """Accept pickle .bin weights (pickle can run code). Off: safetensors only."""
    require_export: bool = False
    """Stop before training (exit 2, nothing written) when this base model will not export to GGUF
    (architecture not in the export table, or a tokenizer llama.cpp cannot reproduce). Off: a warning."""


@dataclass
class DataConfig:
    path: str = "data/alpaca_sample.jsonl"
    """Training data: .jsonl/.json/.csv/.parquet file or a `datasets` hub id."""
    val_path: str | None = None
    """Validation data in any supported format."""
    val_split: float = 0.0
    """Fraction of the training records carved out for validation when val_path is unset."""
    split: str = "train"
    """Split to read from a hub dataset."""
    format: str = "auto"
    """auto, alpaca, sharegpt, messages, completion or text; for a preference train.method: auto,
    pairs, pairs_implicit (chosen/rejected conversations sharing a prefix) or kto."""
    max_seq_len: int = 1024
    """Examples longer than this are truncated (and counted)."""
    train_on_prompt: bool = False
    """Train on prompt tokens too; by default only assistant turns carry loss."""
    drop_long: bool = False
    """Drop examples longer than max_seq_len instead of truncating them (both are counted)."""
    skip_bad_lines: bool = False
    """Skip malformed records with a counted warning instead of stopping at the first."""
    columns: dict[str, str] = field(default_factory=dict)
    """Field mapping for other dataset shapes: {system|user|assistant|messages|text: column}. The
    named column becomes that turn (or the conversation list / raw text). See qlocal.data.mapping."""
    prompt_template: str | None = None
    """The user turn built from record fields, str.format style: "{case}\\n{steps}" (lists joined
    with newlines, {{ }} for literal braces). A field missing from a record is an error naming it."""
    response_template: str | None = None
    """The assistant turn built from record fields, like prompt_template."""
    system_prompt: str | None = None
    """A system turn for every record: fixed text, or a template over record fields."""
    label_map: dict[str, str] = field(default_factory=dict)
    """Label value -> answer text for classification sets ({"0": "negative", "1": "positive"}).
    Applies to the field `label_field`; templates see the mapped text. Without response_template
    the mapped label is the answer."""
    label_field: str = "label"
    """The record field label_map translates."""
    tools: str | None = None
    """A JSON file of function schemas (a list, OpenAI shape) for chat records that carry no `tools`
    of their own; the chat template renders them (masked). See qlocal.data.tools."""
    train_on_reasoning: bool = True
    """Train on assistant reasoning (reasoning_content / thinking / <think> blocks); off leaves the
    thinking text without loss but still trains its tags and the answer."""


@dataclass
class LoraConfig:
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / rank on every backend."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; `all-linear` = every linear layer except the output head."""
    layers: int | None = None
    """Adapt only the last N transformer layers (None = all)."""
    new_tokens: list[str] = field(default_factory=list)
    """Special tokens added to the base vocabulary, whose embedding and output rows train with the
    adapter. `qlocal train` adds the chat template's markers the vocabulary lacks (ChatML's
    <|im_start|>/<|im_end|> on a Llama 3 base) so the model can learn to end a turn."""


@dataclass
class TrainConfig:
    backend: str = "auto"
    """auto, torch or mlx."""
    quantize: str = "none"
    """none, 4bit (QLoRA: NF4 + double quant on torch, affine on MLX) or 8bit."""
    iters: int | None = None
    """Optimizer steps; when unset, `epochs` decides."""
    epochs: float = 1.0
    """Passes over the training data when `iters` is unset."""
    batch_size: int = 4
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate."""
    lr_schedule: str = "cosine"
    """cosine, linear or constant (after warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps (overrides warmup_ratio when > 0)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of total steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    packing: bool = True
    """Padding-free batches: a micro-batch's examples concatenated with per-example positions and
    attention (both backends; on MLX a model whose attention fails its packing check gets one
    example per row)."""
    fused_kernels: bool = True
    """On CUDA: Liger kernels (RMSNorm, SwiGLU, RoPE) when liger-kernel is installed, and
    FlashAttention-2 varlen attention for packed batches when flash-attn is installed. torch on
    any device: the head's gradient taken in its forward, packed rows attended per example through
    SDPA, fused AdamW (qlocal/backends/torch_fused.py); false: the plain PEFT/transformers path."""
    loss_chunk: int = 1024
    """Target positions per chunk of the output head + loss (0 = no chunking)."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 on CUDA/MLX, fp32 on CPU), float32, bfloat16 or float16."""
    seed: int = 0
    """Seed for LoRA init, dropout and data order."""
    eval_every: int = 50
    """Validation every N steps (and at the end) when there is validation data."""
    save_every: int = 100
    """Checkpoint every N steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    method: str = "sft"
    """sft, dpo (the loss by preference.loss_type: sigmoid or ipo), orpo, kto or simpo. The preference
    methods read pairs or labelled completions (qlocal.data.preference) and the preference section."""
    precompute_ref: bool = False
    """dpo/kto: compute the reference log-probs (the base with the adapter off) once before training
    and keep them with the data: faster steps, one extra pass; off computes them in every step."""
    distributed: str = "ddp"
    """With several ranks (torchrun / accelerate launch): ddp (each rank holds the whole model;
    LoRA and QLoRA) or fsdp (FSDP2: base weights sharded across ranks per decoder layer, for 16-bit
    LoRA of models too large for one GPU). Ignored in a single process and on MLX."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get every metrics.jsonl line, the config and loss.png: any of
    tensorboard (<run>/tensorboard), wandb (WANDB_MODE=offline honoured), mlflow (MLFLOW_TRACKING_URI,
    else sqlite under the run folder); empty or none = no tracker. See qlocal.tracking."""


@dataclass
class PreferenceConfig:
    """Hyperparameters of the preference methods; defaults are TRL's for the same method."""

    beta: float = 0.1
    """dpo, kto, simpo: inverse temperature of the implicit reward (how far the policy may move from
    the reference; for ipo the regulariser tau). TRL's default 0.1 (the SimPO paper uses 2.0-2.5)."""
    loss_type: str = "sigmoid"
    """dpo: sigmoid (the DPO paper) or ipo (IPO's squared loss on length-averaged log-probs)."""
    label_smoothing: float = 0.0
    """dpo sigmoid: assumed probability that a pair's preference is flipped (conservative DPO), < 0.5."""
    orpo_lambda: float = 0.1
    """orpo: weight of the odds-ratio term added to the chosen answer's SFT loss (TRL ORPOConfig.beta)."""
    simpo_gamma: float = 0.5
    """simpo: target reward margin between chosen and rejected (TRL CPOConfig.simpo_gamma)."""
    desirable_weight: float = 1.0
    """kto: weight of the desirable (label true) examples' losses."""
    undesirable_weight: float = 1.0
    """kto: weight of the undesirable (label false) examples' losses."""


@dataclass
class RunConfig:
    output_dir: str = "outputs"
    """Folder that holds run folders."""
    name: str | None = None
    """Run folder name (default: model-date-time)."""
    overwrite: bool = False
    """Replace an existing run folder of the same name."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _field_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(options))})"


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a UserError naming the key."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) not in (list, dict) else hint
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and optional):
        if optional:
            return None
        raise UserError(f"{source}: '{key}' cannot be empty")
    try:
        if typing.get_origin(base) is dict:
            return _coerce_mapping(key, value, source)
        if isinstance(value, dict):  # a nested mapping under a scalar key is a typo, never a value
            raise ValueError
        if typing.get_origin(base) is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return [str(v) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        name = getattr(base, "__name__", str(base))
        raise UserError(f"{source}: '{key}' must be {name}, got {value!r}") from None


def _scalar_text(value: Any) -> str:
    # YAML reads `0:` as int and `yes:` as bool; keys and values of a mapping are compared as text.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _coerce_mapping(key: str, value: Any, source: str) -> dict[str, str]:
    """A {text: text} mapping (data.columns, data.label_map); scalar keys and values only."""
    if not isinstance(value, dict):
        raise UserError(f"{source}: '{key}' must be a mapping like {{a: b}}, got {value!r}")
    out = {}
    for k, v in value.items():
        if v is None or isinstance(v, (dict, list)):
            raise UserError(f"{source}: '{key}.{k}' must be a single value (text or number), got {v!r}")
        out[_scalar_text(k)] = _scalar_text(v)
    return out


def apply(cfg: Config, updates: dict[str, Any], source: str) -> Config:
    """Apply flat `section.key` -> value updates (or nested dicts) onto cfg, checking every key."""
    sections = _sections(cfg)
    for dotted, value in _flatten(updates, source).items():
        if "." not in dotted:
            raise UserError(f"{source}: '{dotted}' is not a config key; keys look like section.key, e.g. lora.rank")
        sec_name, key = dotted.split(".", 1)
        if sec_name not in sections:
            raise UserError(f"{source}: unknown config section '{sec_name}'{_suggest(sec_name, list(sections))}")
        section = sections[sec_name]
        types = _field_types(section)
        if key not in types:
            raise UserError(f"{source}: unknown config key '{dotted}'{_suggest(key, list(types))}")
        coerced = _coerce(dotted, value, types[key], source)
        allowed = CHOICES.get(dotted)
        if allowed and isinstance(coerced, list):  # a list key: every item is one of the choices
            coerced = list(dict.fromkeys(v for v in coerced if v.lower() != "none"))
            bad = [v for v in coerced if v not in allowed]
            if bad:
                raise UserError(f"{source}: '{dotted}' takes {', '.join(allowed)} (comma-separated) or none, "
                                f"got {bad[0]!r}")
        elif allowed and coerced not in allowed:
            raise UserError(f"{source}: '{dotted}' must be one of {', '.join(allowed)}, got {coerced!r}")
        setattr(section, key, coerced)
    _check(cfg, source)
    return cfg


def _flatten(updates: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in updates.items():
        if isinstance(v, dict) and "." not in str(k):  # a section; "data.label_map": {..} is a value
            for k2, v2 in v.items():
                # A mapping value is kept whole: dict-typed keys (data.label_map) take it, and
                # _coerce rejects it for every other key.
                flat[f"{k}.{k2}"] = v2
        else:
            flat[str(k)] = v
    return flat


def _check(cfg: Config, source: str) -> None:
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


def _check_methods(cfg: Config, source: str) -> None:
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


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a nested dict, with a clear error for a bad file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: a config file must be a mapping of sections (model:, data:, lora:, train:, preference:, run:)")
    return data


def parse_set(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Parse repeated `--set key=value` items; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item}: expected key=value, e.g. --set lora.rank=16")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else None
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def build(config_file: str | None = None, flags: dict[str, Any] | None = None,
          sets: tuple[str, ...] | list[str] = ()) -> Config:
    """Resolve a Config from its layers: defaults < YAML file < CLI flags < --set."""
    cfg = Config()
    if config_file:
        apply(cfg, load_yaml(config_file), str(config_file))
    if flags:
        apply(cfg, {k: v for k, v in flags.items() if v is not None}, "command line")
    if sets:
        apply(cfg, parse_set(sets), "--set")
    _check_methods(cfg, "config")
    return cfg


def from_dict(data: dict[str, Any], source: str) -> Config:
    """Rebuild a Config from a saved config.yaml."""
    cfg = apply(Config(), data, source)
    _check_methods(cfg, source)
    return cfg


def save(cfg: Config, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config (plus `extra` resolved facts under `resolved:`) atomically."""
    doc = cfg.to_dict()
    if extra:
        doc["resolved"] = extra
    atomic.write_text(path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
