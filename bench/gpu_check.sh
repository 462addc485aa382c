#!/usr/bin/env bash
# The GPU check of bench/gpu_check.py, for a machine with an NVIDIA GPU and a CUDA build of
# PyTorch (plus transformers) already installed; no network needed. Python packages missing
# there can come as wheels in .whl/ (bitsandbytes, safetensors...): they are installed first.
#   bash bench/gpu_check.sh [results-dir]     (default bench/results; finishes in under 10 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${1:-bench/results}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 560 python3 bench/gpu_check.py --out "$out_dir/gpu_check.json"
