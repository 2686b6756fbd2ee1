"""The config sections: one dataclass per concern, each field's docstring the reference for its key.

Defaults live here; qlocal.config.layers applies YAML / flags / --set onto them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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
    """Compute dtype: auto (bf16 on CUDA/MLX, fp32 on a torch CPU), float32, bfloat16 or float16.
    bfloat16 on a CPU with AMX-BF16 or AVX512-BF16 keeps LoRA weights and optimizer state fp32 and
    trains ~2x faster there; auto does not pick it (see backends/torch_dtype.py)."""
    cpu_threads: int = 0
    """torch on CPU: intra-op threads; 0 = torch's default (OMP_NUM_THREADS when set, else every core)."""
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
