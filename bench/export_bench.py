"""Export benchmark: peak RSS of the whole `qlocal export` against its memory bound.

    python bench/export_bench.py --llama-cpp DIR              # every case below, --quant q8_0
    python bench/export_bench.py --cases gemma-lora,qwen05b-peft --models-dir /path/to/models

Cases (each a fresh run folder, then `qlocal export RUN --quant q8_0` in its own process):
  gemma-lora    Gemma 3 270M (the built-in alias, dequantised from the PyPI GGUF package, bf16)
                after a 1-step `qlocal train --backend torch` LoRA
  gemma-qlora   the same with `--quantize 4bit` (QLoRA; merged into the 16-bit base)
  gemma-mlx     the same trained with `--backend mlx`
  qwen05b-peft  a Qwen2.5-0.5B-shaped model with random weights (hidden 896, 24 layers, 14 heads,
                2 kv heads, intermediate 4864, vocab 151936, tied embeddings, bf16 safetensors)
                with a random-B PEFT LoRA on the seven projections

Peak RSS is the export process's own (os.wait4's ru_maxrss: the process and anything it waited
for). The bound is 0.5 x the model's 16-bit size + 1 GiB + the largest GGUF verified (llama.cpp
maps the file it evaluates, so its pages count).

Time: right after each export, in the same run, qlocal's converter alone converts the export's
fused/ folder to the same type in its own process (`bare conversion`: interpreter start, the
pre-tokenizer check, the tensors; no fuse, no verify); the whole export must take at most 8x that.
Beside both, as a reference point, llama.cpp's own convert_hf_to_gguf.py converts the same folder
to the same type (the converter alone, in its own process), when --llama-cpp names a folder
holding it (convert_hf_to_gguf.py, conversion/ and, if the installed gguf is older than the
converter, its gguf-py/): e.g. vendor/llama.cpp of the llama-cpp-python sdist matching the
installed wheel (`pip download llama-cpp-python==<version> --no-deps --no-binary :all:`). The
load average is printed with every row (the box these figures come from is shared): ratios of
figures measured side by side hold, seconds do not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CASES = ("gemma-lora", "gemma-qlora", "gemma-mlx", "qwen05b-peft")
MIB = 2**20
EXPORT_VS_CONVERSION = 8.0  # issue 17: the whole export at most this many bare conversions
BARE = ("import sys; from pathlib import Path; from qlocal.export import convert_hf_to_gguf; "
        "convert_hf_to_gguf(Path(sys.argv[1]), Path(sys.argv[2]), outtype=sys.argv[3])")
# llama.cpp's converter knows BPE pre-tokenizers only by the hash of one text's tokens under a known hub
# tokenizer, and refuses the tests' small Qwen2-style one; where it would, the bench hands it the
# name qlocal's behaviour check gives that tokenizer, so its tensor work can be timed beside ours
LLAMA_CPP_PRE = {"qwen05b-peft": "qwen2"}
LLAMA_CPP_RUNNER = """
import runpy, sys
from pathlib import Path
conv, pre = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, str(conv))
if (conv / "gguf-py").is_dir():
    sys.path.insert(1, str(conv / "gguf-py"))
sys.argv = [str(conv / "convert_hf_to_gguf.py"), *sys.argv[3:]]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def pinned(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return pre
base.TextModel.get_vocab_base_pre = pinned
runpy.run_path(sys.argv[0], run_name="__main__")
"""
QWEN05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
               intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
               rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu")


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd`; its peak RSS in MiB (ru_maxrss of the process and its waited-for children), wall
    seconds, CPU seconds (user + system: on a shared box the fairer measure of the work) and the
    1-minute load average at its end."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss / (MIB if sys.platform == "darwin" else 1024)
    return {"rc": proc.returncode, "peak_mib": rss, "seconds": time.perf_counter() - t, "output": out,
            "cpu_s": usage.ru_utime + usage.ru_stime, "load": round(os.getloadavg()[0], 1)}


def bare_convert(hf_dir: Path, out: Path, outtype: str) -> dict[str, Any]:
    """qlocal's converter alone on `hf_dir` in its own process."""
    m = measure([sys.executable, "-c", BARE, str(hf_dir), str(out), outtype], dict(os.environ, HF_HUB_OFFLINE="1"))
    m["bytes"] = out.stat().st_size if out.is_file() else 0
    out.unlink(missing_ok=True)
    if m["rc"] != 0:
        raise SystemExit(f"bare conversion of {hf_dir} failed (exit {m['rc']}):\n{m['output'][-3000:]}")
    return m


def size16_mib(hf_dir: Path) -> float:
    """The model's size at 16 bits per weight (whatever dtype its safetensors hold)."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from qlocal.export.gguf import index_safetensors

    return sum(2 * int(np.prod(t.shape, dtype=np.int64)) for t in index_safetensors(hf_dir).values()) / MIB


def qwen05b(work: Path) -> Path:
    """The random Qwen2.5-0.5B-shaped bf16 folder (built once under `work`), with the tiny Qwen2 tokenizer."""
    out = work / "qwen2.5-0.5b-shaped"
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers as tf

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tokenizer_path

    tok = tf.AutoTokenizer.from_pretrained(tokenizer_path("qwen2"))
    config = tf.Qwen2Config(**QWEN05B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def make_case(case: str, work: Path, models_dir: Path) -> tuple[Path, Path]:
    """(base folder, run folder) for `case`."""
    run = work / "outputs" / case
    if case == "qwen05b-peft":
        base = qwen05b(work)
        if not (run / "adapter").is_dir():
            sys.path.insert(0, str(REPO / "tests"))
            from export_helpers import make_run

            shutil.rmtree(run, ignore_errors=True)
            make_run(base, run, rank=8, alpha=16.0, b_std=0.02)
        return base, run
    sys.path.insert(0, str(REPO))
    from qlocal.models import resolve_model

    base = resolve_model("gemma-3-270m", models_dir=models_dir).path
    if not (run / "adapter").is_dir():
        extra = {"gemma-lora": ["-b", "torch"], "gemma-qlora": ["-b", "torch", "-q", "4bit"],
                 "gemma-mlx": ["-b", "mlx"]}[case]
        done = subprocess.run([sys.executable, "-m", "qlocal", "train", "-m", str(base),
                               "-d", str(REPO / "data" / "alpaca_sample.jsonl"), "--iters", "1", "--batch-size", "2",
                               "--max-seq-len", "128", "-o", str(run.parent), "--name", case, "--overwrite",
                               "--quiet", *extra], cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{case}: training failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return base, run


def llama_cpp_convert(llama_cpp: Path, hf_dir: Path, out: Path, outtype: str, pre: str | None = None) -> dict[str, Any]:
    """llama.cpp's convert_hf_to_gguf.py on `hf_dir` in its own process; `pre` names the BPE
    pre-tokenizer it falls back to where it does not recognise the tokenizer (LLAMA_CPP_PRE)."""
    # Its own gguf-py when one lies beside it (the converter puts it on sys.path itself), else the
    # installed gguf package.
    args = [str(hf_dir), "--outfile", str(out), "--outtype", outtype]
    if pre:
        m = measure([sys.executable, "-c", LLAMA_CPP_RUNNER, str(llama_cpp), pre, *args])
    else:
        m = measure([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), *args])
    m["gguf"] = "its own gguf-py" if (llama_cpp / "gguf-py").is_dir() else "the installed gguf"
    m["bytes"] = out.stat().st_size if out.is_file() else 0
    m["pre"] = pre
    out.unlink(missing_ok=True)
    return m


def compare_f16(llama_cpp: Path, case: str, hf_dir: Path, work: Path) -> dict[str, Any]:
    """issue 17's conversion target: qlocal's converter against llama.cpp's on `hf_dir` at F16."""
    ours = bare_convert(hf_dir, work / f"{case}-bare-f16.gguf", "f16")
    ref = llama_cpp_convert(llama_cpp, hf_dir, work / f"{case}-llamacpp-f16.gguf", "f16", LLAMA_CPP_PRE.get(case))
    row = {"case": case, "qlocal": {k: ours[k] for k in ("seconds", "cpu_s", "peak_mib", "bytes", "load")},
           "llama_cpp": {k: ref[k] for k in ("rc", "seconds", "cpu_s", "peak_mib", "bytes", "load", "pre")}}
    if ref["rc"] != 0:
        print(f"{case} F16: llama.cpp's converter failed: {ref['output'].strip().splitlines()[-1:]}", flush=True)
        return row
    print(f"{case} F16 conversion: qlocal {ours['seconds']:.1f} s ({ours['cpu_s']:.1f} CPU-s, {ours['peak_mib']:.0f} MiB), "
          f"llama.cpp {ref['seconds']:.1f} s ({ref['cpu_s']:.1f} CPU-s, {ref['peak_mib']:.0f} MiB"
          f"{', pre-tokenizer ' + repr(ref['pre']) + ' given' if ref['pre'] else ''}): "
          f"{ref['seconds'] / ours['seconds']:.2f}x faster wall, {ref['cpu_s'] / ours['cpu_s']:.2f}x CPU, "
          f"{ours['peak_mib'] / ref['peak_mib']:.2f}x its peak RSS; load {ours['load']}-{ref['load']}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--models-dir", type=Path, default=REPO / "models", help="where the Gemma alias is cached")
    ap.add_argument("--llama-cpp", type=Path, help="folder holding llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--f16", action="store_true",
                    help="also convert each fused/ folder at F16 with qlocal and llama.cpp (needs --llama-cpp)")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / ".work", help="scratch folder (kept: bases, runs)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        base, run = make_case(case, args.work, args.models_dir)
        s16 = size16_mib(base)
        out = args.work / "export" / case
        shutil.rmtree(out, ignore_errors=True)
        load0 = round(os.getloadavg()[0], 1)
        m = measure([sys.executable, "-m", "qlocal", "export", str(run), "--quant", args.quant, "--out", str(out)],
                    dict(os.environ, HF_HUB_OFFLINE="1"))
        if m["rc"] != 0:
            raise SystemExit(f"{case}: qlocal export failed (exit {m['rc']}):\n{m['output'][-3000:]}")
        summary = json.loads((out / "export.json").read_text(encoding="utf-8"))
        verified = [f["bytes"] for f in summary["files"].values()] if summary.get("verify") else [0]
        gguf = max(verified) / MIB
        bound = 0.5 * s16 + 1024 + gguf
        row = {"case": case, "size16_mib": s16, "gguf_mib": gguf, "peak_mib": m["peak_mib"], "bound_mib": bound,
               "passed": m["peak_mib"] <= bound, "seconds": m["seconds"], "verify": summary["verify"]["passed"],
               "reference": summary["fuse"].get("reference"), "quant": args.quant,
               "load": [load0, m["load"]], "phases": _phases(summary)}
        bare = bare_convert(out / "fused", args.work / f"{case}-bare.gguf", args.quant)
        row["bare"] = {k: bare[k] for k in ("peak_mib", "seconds", "cpu_s", "bytes", "load")}
        row["cpu_s"] = m["cpu_s"]
        row["export_vs_bare"] = m["seconds"] / bare["seconds"]
        row["export_vs_bare_cpu"] = m["cpu_s"] / bare["cpu_s"]
        if args.llama_cpp:
            ref = llama_cpp_convert(args.llama_cpp, out / "fused", args.work / f"{case}-llamacpp.gguf", args.quant,
                                    LLAMA_CPP_PRE.get(case))
            row["llama_cpp"] = {k: ref[k] for k in ("rc", "peak_mib", "seconds", "cpu_s", "bytes", "gguf", "load")}
            if ref["rc"] != 0:
                row["llama_cpp"]["error"] = ref["output"].strip().splitlines()[-1:]
        if args.llama_cpp and args.f16:
            row["f16"] = compare_f16(args.llama_cpp, case, out / "fused", args.work)
        rows.append(row)
        _print(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")


def _phases(summary: dict[str, Any]) -> dict[str, Any]:
    """Seconds of the export's phases as export.json records them."""
    fuse = summary.get("fuse", {})
    return {"fuse": fuse.get("seconds"), "convert": {q: r.get("seconds") for q, r in summary.get("quantize", {}).items()}}


def _print(rows: list[dict[str, Any]]) -> None:
    print(f"\n| case | 16-bit size | {rows[0]['quant']} GGUF | export peak RSS | bound | result | verify "
          f"| export s (CPU s) | bare conversion s (CPU s, peak) | export / bare, wall; CPU (<= {EXPORT_VS_CONVERSION:g}) "
          "| llama.cpp convert s (CPU s, peak) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lc = r.get("llama_cpp")
        lc_txt = "not run" if lc is None else (f"{lc['seconds']:.0f} s ({lc['cpu_s']:.0f}, {lc['peak_mib']:.0f} MiB)"
                                               if lc["rc"] == 0 else f"failed: {lc.get('error')}")
        b = r["bare"]
        ratio, cpu_ratio = r["export_vs_bare"], r["export_vs_bare_cpu"]
        loads = [*r["load"], b["load"]] + ([lc["load"]] if lc else [])
        print(f"| {r['case']} | {r['size16_mib']:.0f} MiB | {r['gguf_mib']:.0f} MiB | **{r['peak_mib']:.0f} MiB** | "
              f"{r['bound_mib']:.0f} MiB | {'pass' if r['passed'] else 'FAIL'} ({r['peak_mib'] / r['bound_mib']:.2f}x) | "
              f"{'pass' if r['verify'] else 'FAIL'} | {r['seconds']:.0f} ({r['cpu_s']:.0f}) | "
              f"{b['seconds']:.1f} ({b['cpu_s']:.1f}, {b['peak_mib']:.0f} MiB) | **{ratio:.1f}x**; {cpu_ratio:.1f}x "
              f"({'pass' if max(ratio, cpu_ratio) <= EXPORT_VS_CONVERSION else 'FAIL'}) | {lc_txt} | "
              f"{'-'.join(f'{x:g}' for x in loads)} |", flush=True)


if __name__ == "__main__":
    main()
