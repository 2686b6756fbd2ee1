"""Fuse a run's LoRA adapter into its 16-bit original base and save a plain HF safetensors folder.

The merge itself streams from the base's shards in fp32 (qlocal.export.merge); this module owns the
run folder's reading, the fused folder's layout and the probe-prompt report.

The base is always re-loaded from the run's `model_path` in 16/32-bit, never from 4-bit weights,
even when the run trained QLoRA: merging into NF4 weights would bake the quantisation error of the
training-time base into the export (see DESIGN.md, "Merging a QLoRA adapter").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlocal import rundir
from qlocal.errors import UserError, missing_extra

# Probe conversations for every parity check (fuse, GGUF verify): short, multilingual, digits.
PROBE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "List three primes below 20, then add 1234 and 5678."}],
    [{"role": "user", "content": "Translate 'good morning' into German and Japanese: おはよう?"}],
]


MERGE_PROBE_TOKENS = 32
"""Tokens of the first probe on which the fp32 merge is compared with base + adapter (complete_report)."""


@dataclass
class RunInfo:
    """What export needs from a run folder."""

    run_dir: Path
    name: str
    base_path: Path
    template: str
    template_name: str
    adapter_dir: Path
    resolved: dict[str, Any] = field(default_factory=dict)
    new_tokens: list[str] = field(default_factory=list)
    """Special tokens the run added to the base vocabulary (config lora.new_tokens)."""


@dataclass
class FuseReport:
    """Result of fuse_run; `max_abs_logit_diff` compares the saved fused model to base+adapter."""

    out_dir: str
    base_path: str
    dtype: str
    max_abs_logit_diff: float
    """Saved fused model (in its saved dtype) vs unmerged base+adapter in fp32, over probe prompts."""
    max_abs_logit_diff_fp32: float
    """The merge arithmetic alone: fused fp32 vs unmerged fp32 on the first MERGE_PROBE_TOKENS tokens
    of the first probe (should be ~1e-5 or less)."""
    max_abs_logit: float
    """Scale of the logits, to read the differences against."""
    probes: int
    seconds: float
    reference: str = "layer by layer"
    """How the logits were computed: "layer by layer" (one decoder layer in memory at a time,
    qlocal.export.layerwise) or "whole model (<why>)"."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_run(run_dir: Path) -> RunInfo:
    """Check a run folder and return its base model, template and adapter, or raise UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder; give outputs/<run>")
    cfg, resolved = rundir.load_config(run_dir)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{run_dir}: the run has no adapter/ (did training finish?); "
                        f"resume it with `qlocal train --resume {run_dir}`")
    base = resolved.get("model_path")
    if not base:
        raise UserError(f"{run_dir}/config.yaml: 'resolved.model_path' is missing; the run folder is incomplete")
    base_path = Path(base)
    if not (base_path / "config.json").is_file():
        raise UserError(f"{run_dir}: its base model {base_path} is gone (no config.json there); restore it "
                        "or re-resolve it (e.g. `qlocal train` once with the same --model) and retry")
    tpl_file = run_dir / "chat_template.jinja"
    if not tpl_file.is_file():
        raise UserError(f"{run_dir}: chat_template.jinja is missing; the run folder is incomplete")
    return RunInfo(run_dir, run_dir.resolve().name, base_path, tpl_file.read_text(encoding="utf-8"),
                   str(resolved.get("chat_template", "model")), adapter, resolved, list(cfg.lora.new_tokens))


def probe_ids(tokenizer: Any, template: str) -> list[list[int]]:
    """Token ids of the probe conversations rendered with `template` (generation prompt added)."""
    out = []
    for conv in PROBE_CONVERSATIONS:
        text = render_chat(tokenizer, template, conv)
        # The template already emits bos where the model wants one; don't add a second.
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def render_chat(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> str:
    """Render `messages` with the run's template and a generation prompt, as text. A template that
    only renders with tools (Hermes 3's tool_use loops over `tools` unguarded) gets an empty list."""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
    except TypeError:  # jinja: 'NoneType' object is not iterable
        return tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False, tools=[])


def base_dtype_name(base_path: Path) -> str:
    """The base model's own dtype from config.json ("bfloat16", "float16" or "float32")."""
    cfg = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
    text_cfg = cfg.get("text_config") or {}
    name = cfg.get("dtype") or cfg.get("torch_dtype") or text_cfg.get("dtype") or text_cfg.get("torch_dtype")
    return name if name in ("bfloat16", "float16", "float32") else "float32"


def load_trained(base_path: Path, adapter_dir: Path) -> Any:
    """The trained model: the original base in fp32 with the PEFT adapter on top (unmerged), eval mode."""
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise missing_extra("torch/peft", "torch") from None
    from qlocal.adapters import fit_vocab

    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    try:
        fit_vocab(base, adapter_dir)
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{adapter_dir}: adapter does not fit base {base_path} ({str(e).splitlines()[0]})") from None


def fused_dtype_name(base_path: Path, fused_dtype: str | None) -> str:
    """The fused folder's dtype: the base's own for "auto"/None, else the one asked for."""
    from qlocal.export.merge import FUSED_DTYPES

    if fused_dtype in (None, "auto"):
        return base_dtype_name(base_path)
    if fused_dtype not in FUSED_DTYPES:
        raise UserError(f"unknown --fused-dtype {fused_dtype!r}; choose one of {', '.join(FUSED_DTYPES)}")
    return fused_dtype


def fuse_run(run_dir: Path, out_dir: Path, fused_dtype: str | None = None, report: bool = True) -> FuseReport:
    """Merge the run's adapter into its original base and save an HF folder at `out_dir` atomically.

    The merge streams tensor by tensor from the base's shards in fp32 (qlocal.export.merge) and is
    saved in the base's own dtype unless `fused_dtype` (auto|float32|bfloat16|float16) says
    otherwise, with the tokenizer and the run's chat template. The report then compares, on the
    probe prompts, base + adapter (fp32) with the fp32 merge and with the saved folder. With
    `report=False` the figures are left NaN (reference "deferred") for `complete_report`, which an
    export calls from verification's passes, so no reference runs twice.
    """
    import time

    from qlocal.export.merge import fused_config, merged_tensors, vocab_size, write_safetensors
    from qlocal.memory import release

    t0 = time.perf_counter()
    info = read_run(run_dir)
    try:
        import torch  # noqa: F401  (the report's logits; checked before anything is written)
    except ImportError:
        raise missing_extra("torch/peft", "torch") from None
    from qlocal.hf import load_tokenizer, quiet_transformers

    quiet_transformers()
    tokenizer = load_tokenizer(info.base_path, added=info.new_tokens)  # with the run's added tokens
    tokenizer.chat_template = info.template
    dtype_name = fused_dtype_name(info.base_path, fused_dtype)
    tensors = merged_tensors(info.base_path, info.adapter_dir)

    def fill(tmp: Path) -> None:
        write_safetensors(tensors, info.base_path, tmp, dtype_name)
        config = fused_config(info.base_path, dtype_name, vocab_size(tensors))
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        gen = info.base_path / "generation_config.json"
        if gen.is_file():
            (tmp / gen.name).write_bytes(gen.read_bytes())
        tokenizer.save_pretrained(tmp)
        (tmp / "qlocal_fuse.json").write_text(json.dumps({
            "run": str(info.run_dir.resolve()), "base": str(info.base_path), "dtype": dtype_name,
            "adapter": str(info.adapter_dir.resolve()), "chat_template": info.template_name}, indent=1))

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    rundir.save_dir_atomic(out_dir, fill)

    # Each set of logits is computed layer by layer (one layer's fp32 weights in memory at a time).
    ids = probe_ids(tokenizer, info.template)
    del tokenizer  # a 262k-token tokenizer is ~300 MB resident: not needed by the passes
    release()
    nan = float("nan")
    rep = FuseReport(out_dir=str(out_dir), base_path=str(info.base_path), dtype=dtype_name, max_abs_logit_diff=nan,
                     max_abs_logit_diff_fp32=nan, max_abs_logit=nan, probes=len(ids),
                     seconds=round(time.perf_counter() - t0, 2), reference="deferred")
    if not report:
        return rep
    ref = reference_lm("trained", info.base_path, info.adapter_dir)
    unmerged = ref.logits(ids)
    ref.close()
    folder = reference_lm("folder", out_dir)
    folder_diff = _max_diff(folder.logits(ids), unmerged)
    folder.close()
    complete_report(rep, (info.base_path, info.adapter_dir), ids, unmerged, folder_diff, ref.mode)
    return rep


def complete_report(report: FuseReport, trained: tuple[Path, Path], ids: list[list[int]], unmerged: list[Any],
                    folder_diff: float, mode: str) -> None:
    """Fill `report`'s figures in place: `unmerged` (base + adapter's logits on the probes `ids`) and
    `folder_diff` (the saved folder's max |logit diff| from them) come from whoever computed them;
    the fp32 merge's pass runs here."""
    import time

    t0 = time.perf_counter()
    merged = reference_lm("merged", *trained)
    # The merge's error is a property of the weights (W + s B A against W x + s B (A x)), and every
    # position passes through every adapted layer: one short probe shows a wrong or lossy merge as
    # surely as all of them, at a fraction of the forward. Causal attention makes its logits the
    # first rows of the full probe's.
    probe = ids[0][:MERGE_PROBE_TOKENS]
    report.max_abs_logit_diff_fp32 = _max_diff(merged.logits([probe]), [unmerged[0][: len(probe)]])
    merged.close()
    report.max_abs_logit_diff = folder_diff
    report.max_abs_logit = max(float(abs(x).max()) for x in unmerged)
    report.reference = mode
    report.seconds = round(report.seconds + time.perf_counter() - t0, 2)


def _max_diff(got: list[Any], want: list[Any]) -> float:
    return max(float(abs(x - y).max()) for x, y in zip(got, want))


def reference_lm(kind: str, path: Path, adapter_dir: Path | None = None) -> Any:
    """Logits runner (qlocal.export.layerwise) over "trained" = base `path` + adapter unmerged in fp32
    (the trained model), "merged" = the streamed fp32 merge, or "folder" = an HF folder's own
    weights. Layer by layer; the whole model only where a family's parameters do not map onto its
    checkpoint one to one (the runner's `mode` then says why)."""
    from qlocal.export import layerwise as lw

    try:
        if kind == "trained":
            return lw.trained_lm(path, adapter_dir)  # type: ignore[arg-type]
        if kind == "merged":
            return lw.merged_lm(path, adapter_dir)  # type: ignore[arg-type]
        return lw.folder_lm(path)
    except lw.Unsupported as e:
        reason = str(e)
    import torch
    from transformers import AutoModelForCausalLM

    if kind == "trained":
        return lw.WholeLM(load_trained(path, adapter_dir), reason)  # type: ignore[arg-type]
    from qlocal.export.merge import merged_tensors

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if kind == "merged":
        model = _with_merged(model, merged_tensors(path, adapter_dir))  # type: ignore[arg-type]
    return lw.WholeLM(model, reason)


def _with_merged(model: Any, tensors: dict[str, Any]) -> Any:
    """`model` (the plain fp32 base) with our streamed fp32 merge copied into the adapted weights."""
    import torch

    from qlocal.export.merge_experts import model_parameter

    with torch.no_grad():
        for name, t in tensors.items():
            if t.lora_a is not None or t.token_rows is not None:
                model_parameter(model, name).copy_(torch.from_numpy(t.read()))
    return model.eval()
