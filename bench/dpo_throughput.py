"""qlocal DPO (torch backend) against TRL's DPOTrainer + PEFT, same model, pairs and batch, on CPU.

Both train a LoRA adapter with the sigmoid DPO loss and take the reference from the same model with
the adapter switched off (TRL: PeftModel.disable_adapter, qlocal: Backend.set_adapter_enabled), so
neither holds a second model. Each side runs in its own subprocess so peak RSS is its own. The pairs
are the same token ids for both (random prompts and answers, lengths spread over (seq/8, seq/2]).
Prints one line per side and the ratios (qlocal / TRL).

    python bench/dpo_throughput.py --steps 4
    python bench/dpo_throughput.py --set train.loss_chunk=110   # qlocal config overrides (its side only)
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
sys.path.insert(0, str(REPO / "bench"))

from train_throughput import build_model, peak_mb  # noqa: E402

CASE = dict(device="cpu", arch="qwen2", hidden=256, layers=4, heads=4, kv=2, inter=704, vocab=151936,
            quantize="none", dtype="float32", seq=384, batch=2, accum=2)
RANK, ALPHA, BETA, LR = 16, 32, 0.1, 1e-4


def pairs(n: int) -> list[dict[str, list[int]]]:
    import numpy as np

    rng = np.random.default_rng(0)
    seq = CASE["seq"]

    def ids(k: int) -> list[int]:
        return rng.integers(10, 150_000, size=k).tolist()

    return [{"prompt_ids": ids(int(rng.integers(seq // 16, seq // 4))),
             "chosen_ids": ids(int(rng.integers(seq // 16, seq // 4))),
             "rejected_ids": ids(int(rng.integers(seq // 16, seq // 4)))} for _ in range(n)]


def _row_tokens(p: dict[str, list[int]]) -> tuple[int, int]:
    """(tokens of both rows, scored answer tokens) of one pair."""
    return (2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]),
            len(p["chosen_ids"]) + len(p["rejected_ids"]))


def run_qlocal(model: Path, steps: int, warmup: int, sets: list[str] | None = None) -> dict[str, Any]:
    from functools import partial

    from qlocal import config as config_mod
    from qlocal import reference
    from qlocal.backends.torch_backend import TorchBackend
    from qlocal.data.preference import PairExample, collate_pairs
    from qlocal.preference_losses import DPO
    from qlocal.train_schedule import Schedule

    cfg = config_mod.build(sets=[f"lora.rank={RANK}", f"lora.alpha={ALPHA}", "lora.dropout=0.0", *(sets or [])])
    backend = TorchBackend()
    backend.setup(model, cfg)
    raw = pairs(CASE["batch"] * CASE["accum"] * (steps + warmup))
    exs = [PairExample(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"], [1] * len(p["chosen_ids"]),
                       [1] * len(p["rejected_ids"])) for p in raw]
    sched = Schedule(exs, CASE["batch"], CASE["accum"], 0, 0, packed=False, collate_fn=partial(collate_pairs, pad_id=0))
    objective = DPO(beta=BETA)
    tokens = scored = 0
    for step in range(steps + warmup):
        if step == warmup:
            t0 = time.perf_counter()
        micro, _ = sched.micro_batches(step)
        backend.train_step(reference.complete(backend, micro, objective), LR, objective)
        if step >= warmup:
            tokens += sum(int(b["attention_mask"].sum()) for b in micro)
            scored += sum(int(b["loss_mask"].sum()) for b in micro)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": tokens / dt, "scored_tokens_per_s": scored / dt, "peak_mb": peak_mb("cpu")}


def run_trl(model: Path, steps: int, warmup: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from trl import DPOConfig, DPOTrainer

    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model))
    raw = pairs(CASE["batch"] * CASE["accum"] * (steps + warmup))
    timing: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warmup:
                timing["t0"] = time.perf_counter()

    args = DPOConfig(output_dir=str(model.parent / "trl-out"), per_device_train_batch_size=CASE["batch"],
                     gradient_accumulation_steps=CASE["accum"], max_steps=steps + warmup, learning_rate=LR,
                     beta=BETA, max_length=None, logging_steps=10_000, save_strategy="no", report_to=[],
                     use_cpu=True, dataloader_num_workers=0, seed=0, data_seed=0)
    dummy = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2)
    trainer = DPOTrainer(model=m, args=args, train_dataset=dummy, processing_class=tok, callbacks=[Clock()],
                         peft_config=LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train_dataset = Dataset.from_list(raw)  # the same token ids as qlocal's (TRL only tokenises text)
    trainer.train()
    dt = time.perf_counter() - timing["t0"]
    # TRL samples randomly: count tokens per step as the average over all pairs.
    tok_all, scored_all = (sum(x) for x in zip(*(_row_tokens(p) for p in raw)))
    per = (steps + warmup)
    return {"tokens_per_s": tok_all / per * steps / dt, "scored_tokens_per_s": scored_all / per * steps / dt,
            "peak_mb": peak_mb("cpu")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--workdir", default=str(REPO / "bench/.work"))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="qlocal config override for its side (e.g. train.loss_chunk=110); repeatable")
    ap.add_argument("--worker", choices=("qlocal", "trl"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(CASE, workdir / "dpo-cpu")
    if a.worker:
        result = run_qlocal(model, a.steps, a.warmup, a.sets) if a.worker == "qlocal" else run_trl(model, a.steps, a.warmup)
        print("RESULT " + json.dumps(result), flush=True)
        return
    res = {}
    for which in ("trl", "qlocal"):
        cmd = [sys.executable, __file__, "--worker", which, "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--workdir", str(workdir), *(f"--set={x}" for x in a.sets if which == "qlocal")]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{which} failed:\n{out.stderr[-3000:]}")
        res[which] = json.loads(line[len("RESULT "):])
        r = res[which]
        print(f"{which}: {r['tokens_per_s']:.0f} tok/s ({r['scored_tokens_per_s']:.0f} scored), {r['peak_mb']:.0f} MB",
              flush=True)
    q, t = res["qlocal"], res["trl"]
    print(f"summary: dpo-cpu speed x{q['scored_tokens_per_s'] / t['scored_tokens_per_s']:.2f} "
          f"memory x{q['peak_mb'] / t['peak_mb']:.2f} (qlocal / TRL DPOTrainer + PEFT)")


if __name__ == "__main__":
    main()
