"""Where `qlocal export` spends its CPU time: the export of one run, phase by phase.

    nice -n 5 python bench/export_phases.py bench/.work/outputs/qwen05b-peft /tmp/phases-out --quant q8_0

Runs export_run in this process with each phase's function wrapped: CPU seconds (process time, all
threads) and wall seconds per call, its labelled children excluded, summed per phase. The run folder
is one export_bench.py made (`--cases qwen05b-peft` builds it under bench/.work). The output folder
is replaced. CPU seconds are the figure to compare on a shared box; wall seconds are given beside.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_stack: list[dict[str, float]] = []
_totals: dict[str, list[float]] = {}


def _wrap(obj: Any, name: str, label: str) -> None:
    f = getattr(obj, name)

    @functools.wraps(f)
    def timed(*a: Any, **k: Any) -> Any:
        fr = {"c0": time.process_time(), "w0": time.perf_counter(), "cc": 0.0, "cw": 0.0}
        _stack.append(fr)
        try:
            return f(*a, **k)
        finally:
            _stack.pop()
            c, w = time.process_time() - fr["c0"], time.perf_counter() - fr["w0"]
            if _stack:
                _stack[-1]["cc"] += c
                _stack[-1]["cw"] += w
            t = _totals.setdefault(label, [0, 0.0, 0.0])
            t[0] += 1
            t[1] += c - fr["cc"]
            t[2] += w - fr["cw"]

    setattr(obj, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--quant", default="q8_0")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import qlocal.export as ex
    import qlocal.export.fuse as fuse
    import qlocal.export.merge as merge
    import qlocal.export.pretokenizer as pre
    import qlocal.export.ref_runs as runs
    import qlocal.export.verify as verify
    from qlocal.export.pipeline import ExportOptions, export_run

    for obj, name, label in (
            (merge, "write_safetensors", "fuse: write fused/ (fp32 merge -> bf16)"),
            (fuse, "fuse_run", "fuse: the rest (run folder, tokenizer)"),
            (pre, "check_pretokenizer", "pre-tokenizer check"),
            (ex, "convert_hf_to_gguf", "convert (+ quantise)"),
            (verify, "_drafts", "llama.cpp draft (its greedy tokens)"),
            (runs._Runs, "greedy", "HF reference: probes + greedy (draft, KV-cached steps)"),
            (runs._Runs, "logits", "HF fused-folder pass + fp32-merge probe"),
            (fuse, "complete_report", "fp32-merge check (glue)"),
            (verify, "_fused_error", "fused/ error sums"),
            (verify, "HFReference", "HF reference setup (tokenizer, models)"),
            (verify, "verify_gguf", "llama.cpp: load, tokens, eval, free greedy, stops")):
        _wrap(obj, name, label)
    shutil.rmtree(args.out, ignore_errors=True)
    load0 = os.getloadavg()[0]
    c0, w0 = time.process_time(), time.perf_counter()
    export_run(args.run, ExportOptions(quants=args.quant.split(","), out_dir=args.out), echo=lambda s: None)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    print("| phase | calls | CPU s | wall s |\n|---|---|---|---|")
    for label, (n, c, w) in _totals.items():
        print(f"| {label} | {n:.0f} | {c:.1f} | {w:.1f} |")
    print(f"| rest (export glue, Modelfile) | | {cpu - sum(v[1] for v in _totals.values()):.1f} | "
          f"{wall - sum(v[2] for v in _totals.values()):.1f} |")
    print(f"| **export_run total** (interpreter start and imports not counted) | | **{cpu:.1f}** | {wall:.1f} |")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"peak RSS {ru.ru_maxrss / 1024:.0f} MiB; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
