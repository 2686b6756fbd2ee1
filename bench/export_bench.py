"""Export benchmark: GGUF conversion time and peak RSS against model size.

    python bench/export_bench.py                 # tiny random model (+ Gemma 3 270M if cached under models/)
    python bench/export_bench.py --hf DIR ...    # any HF folders

Each conversion runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own. The baseline
measured beside it each run is the cost of just importing the converter and reading the model's
safetensors headers, so "RSS over baseline" is what streaming the tensors really costs; the ratio
"extra RSS / model size" should stay well below 1 (the converter holds one chunk or tensor at a time).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from qlocal.memory import peak_rss_mb
from qlocal.export.gguf import convert_hf_to_gguf, index_safetensors
hf, out, outtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
t = time.perf_counter()
if outtype == "baseline":
    index_safetensors(hf)
else:
    convert_hf_to_gguf(hf, out, outtype=outtype)
print(json.dumps({{"seconds": time.perf_counter() - t,
                  "peak_rss_mb": peak_rss_mb()}}))
"""


def _measure(hf: Path, out: Path, outtype: str) -> dict[str, float]:
    code = CHILD.format(repo=str(REPO))
    done = subprocess.run([sys.executable, "-c", code, str(hf), str(out), outtype], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{hf} {outtype}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _size_mb(hf: Path) -> float:
    return sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 2**20


def _tiny(tmp: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_model

    return make_tiny_model("qwen2", tmp / "tiny-qwen2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", nargs="*", type=Path, help="HF folders to convert (default: tiny + cached Gemma 270M)")
    ap.add_argument("--outtypes", default="f16,q8_0")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        models = args.hf or [_tiny(tmp)] + [p for p in [REPO / "models" / "gemma-3-270m" / "hf"] if p.is_dir()]
        print(f"{'model':<22} {'size MB':>8} {'type':<6} {'seconds':>8} {'MB/s':>7} {'peak RSS':>9} "
              f"{'baseline':>9} {'extra/size':>10}")
        for hf in models:
            size = _size_mb(hf)
            base = _measure(hf, tmp / "none.gguf", "baseline")
            for outtype in args.outtypes.split(","):
                m = _measure(hf, tmp / f"out-{outtype}.gguf", outtype)
                extra = max(0.0, m["peak_rss_mb"] - base["peak_rss_mb"])
                name = hf.name if hf.name != "hf" else hf.parent.name
                print(f"{name:<22} {size:>8.1f} {outtype:<6} {m['seconds']:>8.2f} {size / m['seconds']:>7.0f} "
                      f"{m['peak_rss_mb']:>8.0f}M {base['peak_rss_mb']:>8.0f}M {extra / size:>10.2f}")
                (tmp / f"out-{outtype}.gguf").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
