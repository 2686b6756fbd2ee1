"""Trained tokens/s and peak memory against sequence length: qlocal vs its baseline, torch and MLX.

    python bench/scaling.py                                  # seq 512 1024 2048 4096, both backends
    python bench/scaling.py --seq 512 --seq 4096 --backend torch

torch (CPU): bench/train_throughput.py's workers, qlocal against HF Trainer + PEFT, each side in
its own process (peak RSS); a random Qwen2-shaped model (hidden 512, 8 heads / 2 kv heads,
ff 1408) with --layers layers and a --vocab head, micro-batches of --batch examples of 3/4 to all
of seq tokens. MLX: bench/mlx_throughput.py --synthetic on the same lengths, qlocal against
mlx_lm.lora's trainer (MLX allocator peak, trained tokens per CPU-second).

Beside each peak: its growth from the row before, in MB per 1,000 more tokens. Constant means
memory grows linearly with the sequence length; rising means faster (a T x T attention matrix
per head does: twice the length, four times the matrix).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


def torch_row(seq: int, a: argparse.Namespace) -> dict[str, Any]:
    import train_throughput as tt

    case = {**tt.CASES["cpu-small"], "layers": a.layers, "vocab": a.vocab, "seq": seq, "batch": a.batch,
            "min_len": 0.75}
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    b = tt.measure("baseline", case, a.steps, a.warmup, workdir)
    q = tt.measure("qlocal", case, a.steps, a.warmup, workdir)
    return {"qlocal": q["trained_tokens_per_s"], "base": b["trained_tokens_per_s"], "qlocal_mb": q["peak_mb"],
            "base_mb": b["peak_mb"], "tokens": seq * a.batch}


def mlx_row(seq: int, a: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mlx.json"
        cmd = [sys.executable, str(REPO / "bench/mlx_throughput.py"), "--synthetic", "--max-seq-len", str(seq),
               "--batch-size", str(a.batch), "--iters", str(a.steps), "--rounds", "1", "--layers", str(a.layers),
               "--hidden", "512", "--vocab", str(a.vocab), "--json", str(out)] + ["--no-warm-pass"] * (a.warmup == 0)
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if res.returncode != 0 or not out.is_file():
            sys.exit(f"mlx_throughput failed at seq {seq}:\n{res.stderr[-3000:]}")
        med = json.loads(out.read_text())["median"]
    q, m = med["qlocal"], med["mlx_lm"]
    return {"qlocal": q["trained_cpu_s"], "base": m["trained_cpu_s"], "qlocal_mb": q["peak_mb"],
            "base_mb": m["peak_mb"], "tokens": seq * a.batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, action="append", help="default: 512 1024 2048 4096")
    ap.add_argument("--backend", action="append", choices=["torch", "mlx"], help="default: both")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1, help="timed steps (torch) / batches per pass (MLX)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up steps (torch); MLX: 0 times its first pass")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--workdir", default=str(REPO / "bench/.work"))
    a = ap.parse_args()
    seqs = a.seq or [512, 1024, 2048, 4096]
    rows = []
    for backend in a.backend or ["torch", "mlx"]:
        unit, base = ("trained tok/s", "HF Trainer+PEFT") if backend == "torch" else ("trained tok/cpu-s", "mlx_lm.lora")
        print(f"{backend}: qlocal vs {base}; {unit}; peak MB (+MB per 1k more tokens than the row before)", flush=True)
        prev: dict[str, Any] | None = None
        for seq in seqs:
            r = (torch_row if backend == "torch" else mlx_row)(seq, a)
            rows.append({"backend": backend, "seq": seq, **r})

            def growth(key: str) -> str:
                if prev is None:
                    return "      "
                return f"{(r[key] - prev[key]) * 1000 / (r['tokens'] - prev['tokens']):+6.0f}"

            print(f"  seq {seq:5d}: qlocal {r['qlocal']:7.1f}  base {r['base']:7.1f}  x{r['qlocal'] / r['base']:.2f} | "
                  f"peak qlocal {r['qlocal_mb']:7.0f} MB ({growth('qlocal_mb')})  "
                  f"base {r['base_mb']:7.0f} MB ({growth('base_mb')})  x{r['qlocal_mb'] / r['base_mb']:.2f}",
                  flush=True)
            prev = r
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
