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
if [ "$(uname -s)" = "Linux" ] && [ "$(uname -m)" = "x86_64" ] && [[ ",$extras," =~ ,(gguf|dev), ]]; then
  # llama-cpp-python compiles llama.cpp with -march=native, which uses AMX tile instructions on
  # CPUs that have them; a VM or sandbox that does not grant the tile state kills the process
  # (SIGILL) on the first Q8_0/K-quant matmul. Build for AVX2 instead, once, into a local folder
  # (pip's own cache would hand back a native build made earlier). The folder is per user, beside
  # pip's cache, so a fresh clone on the same machine (CI) reuses it; a checkout's own
  # .cache/wheels (carried to another machine) wins when it has one.
  wheels=".cache/wheels"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    wheels="${XDG_CACHE_HOME:-$HOME/.cache}/qlocal/wheels"
  fi
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python for AVX2 (about 7 minutes on 2 cores, once)" >&2
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
      python -m pip wheel -q --no-deps --no-cache-dir -w "$wheels" "llama-cpp-python>=0.3"
  fi
  python -m pip install -q --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
fi
python -m pip install -q -e ".[$extras]"
