#!/usr/bin/env bash
# Create .venv and install qlocal with the extras named in $1 (default: dev).
# Linux x86-64: torch is pinned to 2.13.0, the CPU wheel this kind of machine carries; an
# unpinned torch would pull several GB of CUDA packages. macOS gets MLX and the PyPI torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip wheel
if [ "$(uname -s)" = "Linux" ]; then
  python -m pip install -q "torch==2.13.0"
fi
if [ "$(uname -s)" = "Darwin" ] && [ "$(uname -m)" = "arm64" ]; then
  extras="$extras,mlx"
elif [ "$(uname -s)" = "Linux" ]; then
  extras="$extras,mlx"   # mlx[cpu] on Linux so the MLX backend is tested for real
fi
python -m pip install -q -e ".[$extras]"
