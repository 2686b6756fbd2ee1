"""Two qlocal torch variants in one process, steps alternated on the same micro-batches: a paired
comparison that load drift on a shared box affects equally (wall and CPU seconds per step).

    python bench/torch_paired.py --seq 2048 "+ head grad in forward" "+ per-example attention"

Variants are rows of bench/train_throughput.py's ABLATION (a row without a dtype runs in --dtype);
the model is that file's --case shape with --layers layers and a --vocab head, micro-batches of
--batch examples of 3/4 to all of seq.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    import train_throughput as tt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", choices=list(tt.ABLATION))
    ap.add_argument("--case", default="cpu-small", choices=[n for n, c in tt.CASES.items() if c["device"] == "cpu"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="steps per variant; the first is a warm-up")
    ap.add_argument("--workdir", default=str(REPO / "bench/.work"))
    a = ap.parse_args()

    from qlocal import config as config_mod
    from qlocal.backends import torch_fused
    from qlocal.backends.torch_backend import TorchBackend
    from qlocal.train_schedule import Schedule

    case = {**tt.CASES[a.case], "layers": a.layers, "vocab": a.vocab, "seq": a.seq, "batch": a.batch,
            "min_len": 0.75}
    model = tt.build_model(case, tt.model_dir(case, Path(a.workdir)))
    backends = []
    for v in a.variants:
        fused, disabled, dtype = tt.ABLATION[v]
        torch_fused.DISABLED.clear()
        torch_fused.DISABLED.update(disabled)
        b = TorchBackend()
        info = b.setup(model, config_mod.build(sets=[f"lora.rank={tt.RANK}", f"lora.alpha={tt.ALPHA}",
                                                     f"train.fused_kernels={fused}",
                                                     f"train.dtype={dtype or a.dtype}"]))
        backends.append(b)
        print(f"{v}: {info['dtype']}, {info['fused_kernels']}, {info['cpu_threads']} threads", flush=True)
    sched = Schedule(tt.examples(case, a.batch * a.steps), a.batch, 1, 0, 0, packed=True)
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in a.variants}
    for step in range(a.steps):
        micro, _ = sched.micro_batches(step)
        for v, b in zip(a.variants, backends):
            t, c = time.perf_counter(), time.process_time()
            loss = b.train_step(micro, 1e-4).loss
            dt, cpu = time.perf_counter() - t, time.process_time() - c
            if step:
                times[v].append((dt, cpu))
            print(f"step {step} {v}: {dt:.1f} s wall, {cpu:.1f} s CPU, loss {loss:.4f}", flush=True)
    for v in a.variants:
        wall = statistics.median(x[0] for x in times[v])
        cpu = statistics.median(x[1] for x in times[v])
        print(f"{v}: median {wall:.1f} s wall, {cpu:.1f} s CPU per step")


if __name__ == "__main__":
    main()
