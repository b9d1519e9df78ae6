#!/usr/bin/env bash
# Main job on the embedded default: the PyTorch engine with SmolLM2-135M-Instruct and the shipped EAGLE-3
# draft behind a real Triton Inference Server (CPU), learning from the traffic it serves.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec tide serve --config configs/serve_cpu.yaml "$@"
