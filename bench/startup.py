"""`qlocal --help` start-up time beside `python -c pass` (target: under 0.5 s, no heavy imports).

    python bench/startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "mlx", "peft", "bitsandbytes", "llama_cpp", "numpy", "datasets")


def timed(cmd: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    runs = ap.parse_args().runs
    base = timed([sys.executable, "-c", "pass"], runs)
    help_ = timed([sys.executable, "-m", "qlocal", "--help"], runs)
    probe = "import sys, qlocal.cli; print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    print(f"python -c pass: {base:.3f} s | qlocal --help: {help_:.3f} s | overhead {help_ - base:.3f} s | "
          f"heavy modules imported: {loaded or 'none'} | target < 0.5 s: {'met' if help_ < 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
