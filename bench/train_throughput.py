"""qlocal's torch backend against plain HF Trainer + PEFT (+ bitsandbytes), same everything.

Each case trains the same random model (same shape, seed, LoRA rank/alpha/targets, precision,
sequence length, effective batch) on the same rendered examples, once with qlocal and once with the
baseline, each in its own subprocess so peak memory is measured cleanly. Prints one line per case
and a summary line with the ratios (qlocal / baseline).

    python bench/train_throughput.py                    # cases for this machine (CPU and/or CUDA)
    python bench/train_throughput.py --case cpu-small --steps 8
    python bench/train_throughput.py --case cpu-qwen0.5b --ablation   # each fused piece added in turn
    python bench/train_throughput.py --case cpu-small --dtype bfloat16  # both sides in bf16
    python bench/train_throughput.py --case cpu-small --profile        # torch.profiler table of one step

The sides run one after the other, so a wall-clock ratio is only as good as the load was steady:
each line also gives trained tokens per CPU-second of the process (all its threads), which other
processes on a shared box disturb far less.

--ablation runs qlocal once per row of ABLATION (the plain path first: PEFT's LoRA forward, the
checkpointed head, SDPA with transformers' packed mask; then each fused piece of
qlocal/backends/torch_fused.py added in turn) against one baseline run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "tests/assets/tokenizers/qwen2"

# name -> model shape, quantisation, dtype, sequence length, micro-batch, grad accumulation
CASES: dict[str, dict[str, Any]] = {
    "cpu-small": dict(device="cpu", arch="qwen2", hidden=512, layers=6, heads=8, kv=2, inter=1408,
                      vocab=151936, quantize="none", dtype="float32", seq=512, batch=4, accum=1),
    # Qwen2.5-0.5B's shape; 4 of its 24 layers by default so a run fits a shared 2-core box (--layers 24)
    "cpu-qwen0.5b": dict(device="cpu", arch="qwen2", hidden=896, layers=4, heads=14, kv=2, inter=4864,
                         vocab=151936, quantize="none", dtype="float32", seq=512, batch=4, accum=1),
    "cuda-llama8b-qlora": dict(device="cuda", arch="llama", hidden=4096, layers=32, heads=32, kv=8, inter=14336,
                               vocab=128256, quantize="4bit", dtype="bfloat16", seq=2048, batch=2, accum=4),
    "cuda-llama8b-lora": dict(device="cuda", arch="llama", hidden=4096, layers=32, heads=32, kv=8, inter=14336,
                              vocab=128256, quantize="none", dtype="bfloat16", seq=2048, batch=2, accum=4),
    "cuda-qwen7b-qlora": dict(device="cuda", arch="qwen2", hidden=3584, layers=28, heads=28, kv=4, inter=18944,
                              vocab=152064, quantize="4bit", dtype="bfloat16", seq=2048, batch=2, accum=4),
    "cuda-qwen7b-lora": dict(device="cuda", arch="qwen2", hidden=3584, layers=28, heads=28, kv=4, inter=18944,
                             vocab=152064, quantize="none", dtype="bfloat16", seq=2048, batch=2, accum=4),
}
RANK, ALPHA = 16, 32
# qlocal rows of --ablation: label -> (train.fused_kernels, torch_fused pieces switched off, train.dtype:
# None = the case's dtype, which the baseline uses too)
ABLATION: dict[str, tuple[bool, list[str], str | None]] = {
    "plain path": (False, [], None),
    "+ head grad in forward": (True, ["attention", "adamw", "lora"], None),
    "+ per-example attention": (True, ["adamw", "lora"], None),
    "+ fused AdamW": (True, ["lora"], None),
    "+ fused LoRA matmuls": (True, [], None),
    "+ --dtype bfloat16": (True, [], "bfloat16"),
}
DEFAULT = "+ fused LoRA matmuls"


def model_dir(case: dict[str, Any], workdir: Path) -> Path:
    """One folder per shape, so cases and overrides that share a shape share the model."""
    return workdir / "{arch}-h{hidden}-l{layers}-a{heads}-kv{kv}-f{inter}-v{vocab}".format(**case)


def build_model(case: dict[str, Any], out: Path) -> Path:
    """A random model of the case's shape saved as an HF folder (fp32 weights; each side loads
    them in the case's dtype)."""
    import torch
    import transformers as tf

    if (out / "config.json").is_file():
        return out
    kw = dict(vocab_size=case["vocab"], hidden_size=case["hidden"], num_hidden_layers=case["layers"],
              num_attention_heads=case["heads"], num_key_value_heads=case["kv"], intermediate_size=case["inter"],
              max_position_embeddings=4096, tie_word_embeddings=False)
    cfg = tf.Qwen2Config(**kw) if case["arch"] == "qwen2" else tf.LlamaConfig(**kw)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")  # two workers may build it: the rename decides
    model.save_pretrained(tmp)
    tf.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def examples(case: dict[str, Any], n: int) -> list[Any]:
    """Chat examples rendered with the shared pipeline, lengths spread over (seq * min_len, seq]
    (min_len 1/8 unless the case says otherwise)."""
    import numpy as np
    from transformers import AutoTokenizer

    from qlocal.data.formats import Sample
    from qlocal.data.render import render
    from qlocal.data.templates import resolve_chat_template

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    template, _ = resolve_chat_template(tok, "chatml")
    rng = np.random.default_rng(0)
    words = "the model learns to answer short questions about capitals planets rivers and numbers".split()
    out = []
    for _ in range(n):
        target = int(rng.integers(int(case["seq"] * case.get("min_len", 0.125)), case["seq"]))
        q = " ".join(rng.choice(words, size=max(4, target // 6)))
        a = " ".join(rng.choice(words, size=max(4, target // 3)))
        s = Sample(kind="chat", messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        out.append(render(s, tok, template, max_seq_len=case["seq"]))
    return out


def peak_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    from qlocal.memory import peak_rss_mb

    return peak_rss_mb()


def run_qlocal(case: dict[str, Any], model: Path, steps: int, warmup: int) -> dict[str, Any]:
    from qlocal import config as config_mod
    from qlocal.backends import torch_fused
    from qlocal.backends.torch_backend import TorchBackend
    from qlocal.data.batching import count_targets
    from qlocal.train_schedule import Schedule

    fused, disabled, dtype = ABLATION[case.get("variant", DEFAULT)]
    torch_fused.DISABLED.update(disabled)
    cfg = config_mod.build(sets=[f"train.quantize={case['quantize']}", f"train.dtype={dtype or case['dtype']}",
                                 f"lora.rank={RANK}", f"lora.alpha={ALPHA}", f"train.fused_kernels={fused}",
                                 f"train.grad_checkpointing={case['device'] == 'cuda'}"])
    backend = TorchBackend()
    info = backend.setup(model, cfg)
    exs = examples(case, case["batch"] * case["accum"] * (steps + warmup))
    sched = Schedule(exs, case["batch"], case["accum"], 0, 0, packed=cfg.train.packing)
    tokens = trained = 0
    for step in range(steps + warmup):
        if step == warmup:
            _sync(case)
            t0, c0 = time.perf_counter(), time.process_time()
        micro, _ = sched.micro_batches(step)
        backend.train_step(micro, 1e-4)
        if step >= warmup:
            tokens += sum(int(b["attention_mask"].sum()) for b in micro)
            trained += sum(count_targets(b) for b in micro)
    _sync(case)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens_per_s": tokens / dt, "trained_tokens_per_s": trained / dt, "peak_mb": peak_mb(case["device"]),
            "trained_per_cpu_s": trained / cpu,
            "fused": info["fused_kernels"], "threads": info["cpu_threads"], "dtype": info["dtype"]}


def run_baseline(case: dict[str, Any], model: Path, steps: int, warmup: int) -> dict[str, Any]:
    """transformers Trainer + PEFT (+ bitsandbytes 4-bit), padded batches, labels -100 on prompts."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments, AutoTokenizer)

    dtype = getattr(torch, case["dtype"])
    kw: dict[str, Any] = {"dtype": dtype}
    if case["quantize"] == "4bit":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    m = AutoModelForCausalLM.from_pretrained(str(model), **kw)
    if case["quantize"] == "4bit":
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=case["device"] == "cuda")
    m = get_peft_model(m, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"))
    exs = examples(case, case["batch"] * case["accum"] * (steps + warmup))
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
             "labels": [t if k else -100 for t, k in zip(e.input_ids, e.loss_mask)]} for e in exs]
    tok = AutoTokenizer.from_pretrained(str(model))
    timing: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warmup:
                _sync(case)
                timing["t0"], timing["c0"] = time.perf_counter(), time.process_time()

    args = TrainingArguments(output_dir=str(model.parent / "hf-out"), per_device_train_batch_size=case["batch"],
                             gradient_accumulation_steps=case["accum"], max_steps=steps + warmup, learning_rate=1e-4,
                             logging_steps=10_000, save_strategy="no", report_to=[], gradient_checkpointing=case["device"] == "cuda",
                             gradient_checkpointing_kwargs={"use_reentrant": False},
                             bf16=case["dtype"] == "bfloat16", use_cpu=case["device"] == "cpu",
                             dataloader_num_workers=0, seed=0, data_seed=0)
    trainer = Trainer(model=m, args=args, train_dataset=rows, callbacks=[Clock()],
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    _sync(case)
    dt, cpu = time.perf_counter() - timing["t0"], time.process_time() - timing["c0"]
    # The Trainer samples randomly, so count tokens per step as the average over all examples.
    per_step_tokens = sum(len(e.input_ids) for e in exs) / (steps + warmup)
    per_step_trained = sum(sum(e.loss_mask[1:]) for e in exs) / (steps + warmup)
    return {"tokens_per_s": per_step_tokens * steps / dt, "trained_tokens_per_s": per_step_trained * steps / dt,
            "trained_per_cpu_s": per_step_trained * steps / cpu,
            "peak_mb": peak_mb(case["device"])}


def _sync(case: dict[str, Any]) -> None:
    if case["device"] == "cuda":
        import torch

        torch.cuda.synchronize()


def profile_step(case: dict[str, Any], model: Path, rows: int) -> None:
    """One qlocal step (after one warm-up step) under torch.profiler: the ops that took the time."""
    from torch.profiler import ProfilerActivity, profile

    from qlocal import config as config_mod
    from qlocal.backends import torch_fused
    from qlocal.backends.torch_backend import TorchBackend
    from qlocal.train_schedule import Schedule

    fused, disabled, dtype = ABLATION[case.get("variant", DEFAULT)]
    torch_fused.DISABLED.update(disabled)
    cfg = config_mod.build(sets=[f"train.dtype={dtype or case['dtype']}", f"lora.rank={RANK}", f"lora.alpha={ALPHA}",
                                 f"train.fused_kernels={fused}"])
    backend = TorchBackend()
    backend.setup(model, cfg)
    sched = Schedule(examples(case, case["batch"] * 2), case["batch"], 1, 0, 0, packed=cfg.train.packing)
    backend.train_step(sched.micro_batches(0)[0], 1e-4)
    micro, _ = sched.micro_batches(1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        backend.train_step(micro, 1e-4)
        dt = time.perf_counter() - t0
    print(f"step {dt:.1f} s, row of {micro[0]['input_ids'].shape[1]} tokens, "
          f"{int(micro[0]['loss_mask'][:, 1:].sum())} targets")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                             max_name_column_width=48, max_shapes_column_width=60))


def worker(which: str, case: dict[str, Any], steps: int, warmup: int, workdir: Path) -> None:
    model = build_model(case, model_dir(case, workdir))
    fn = run_qlocal if which == "qlocal" else run_baseline
    print("RESULT " + json.dumps(fn(case, model, steps, warmup)), flush=True)


def measure(which: str, case: dict[str, Any], steps: int, warmup: int, workdir: Path) -> dict[str, Any]:
    """One side in its own process (a clean peak RSS); the worker's RESULT line."""
    cmd = [sys.executable, __file__, "--worker", which, json.dumps(case), "--steps", str(steps),
           "--warmup", str(warmup), "--workdir", str(workdir)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{which} failed on {case}:\n{out.stderr[-3000:]}")
    return {**json.loads(line[len("RESULT "):]), "load": round(os.getloadavg()[0], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="default: every case this machine can run")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, help="override the case's layer count")
    ap.add_argument("--seq", type=int, help="override the case's sequence length")
    ap.add_argument("--batch", type=int, help="override the case's micro-batch size")
    ap.add_argument("--vocab", type=int, help="override the case's vocabulary size")
    ap.add_argument("--min-len", type=float, help="shortest example as a fraction of seq (default 1/8)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="override the case's dtype (both sides)")
    ap.add_argument("--baseline-dtype", action="append", choices=["float32", "bfloat16"],
                    help="HF Trainer in this precision (bfloat16: bf16=True, CPU autocast); repeat for several "
                         "baselines, each ratio printed (default: the case's dtype)")
    ap.add_argument("--ablation", action="store_true", help="qlocal once per ABLATION row (plain path first)")
    ap.add_argument("--variant", action="append", choices=list(ABLATION), help="these ABLATION rows only")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one qlocal step")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--workdir", default=str(REPO / "bench/.work"))
    ap.add_argument("--worker", nargs=2, metavar=("WHICH", "CASE_JSON"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if a.worker:
        worker(a.worker[0], json.loads(a.worker[1]), a.steps, a.warmup, workdir)
        return
    import torch

    names = a.case or [n for n, c in CASES.items() if c["device"] == "cpu" or torch.cuda.is_available()]
    overrides = {k: v for k, v in (("layers", a.layers), ("seq", a.seq), ("batch", a.batch), ("vocab", a.vocab),
                                   ("min_len", a.min_len), ("dtype", a.dtype)) if v is not None}
    variants = list(ABLATION) if a.ablation else a.variant or [DEFAULT]
    summary: dict[str, tuple[float, float, float]] = {}  # the last variant's ratios per case and baseline
    rows = []
    for name in names:
        case = {**CASES[name], **overrides}
        if a.profile:
            profile_step(case, build_model(case, model_dir(case, workdir)), 30)
            continue
        baselines = {}
        for bdtype in a.baseline_dtype or [case["dtype"]]:
            b = baselines[bdtype] = measure("baseline", {**case, "dtype": bdtype}, a.steps, a.warmup, workdir)
            print(f"{name}: HF Trainer+PEFT {bdtype} {b['tokens_per_s']:.1f} tok/s ({b['trained_tokens_per_s']:.1f} "
                  f"trained, {b['trained_per_cpu_s']:.1f} per CPU-s), {b['peak_mb']:.0f} MB, load {b['load']}", flush=True)
        for variant in variants:
            q = measure("qlocal", {**case, "variant": variant}, a.steps, a.warmup, workdir)
            print(f"{name} [{variant}]: qlocal {q['dtype']} {q['threads']} threads {q['tokens_per_s']:.1f} tok/s "
                  f"({q['trained_tokens_per_s']:.1f} trained, {q['trained_per_cpu_s']:.1f} per CPU-s), "
                  f"{q['peak_mb']:.0f} MB, load {q['load']}", flush=True)
            for bdtype, b in baselines.items():
                speed = q["trained_tokens_per_s"] / b["trained_tokens_per_s"]
                mem = q["peak_mb"] / b["peak_mb"]
                per_cpu = q["trained_per_cpu_s"] / b["trained_per_cpu_s"]
                rows.append({"case": name, **case, "variant": variant, "qlocal": q, "baseline": b,
                             "baseline_dtype": bdtype, "speed": speed, "speed_per_cpu_s": per_cpu, "memory": mem})
                print(f"  vs HF {bdtype}: speed x{speed:.2f} (per CPU-second x{per_cpu:.2f}), memory x{mem:.2f}",
                      flush=True)
                summary[f"{name} vs HF {bdtype}"] = (speed, per_cpu, mem)
    if summary:
        print("summary: " + "; ".join(f"{n} speed x{s:.2f} (per CPU-s x{c:.2f}) memory x{m:.2f}"
                                      for n, (s, c, m) in summary.items()))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
