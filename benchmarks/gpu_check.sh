#!/usr/bin/env bash
# Every GPU-only check in one command (about 3-5 minutes on an H200; budget 8):
#   benchmarks/gpu_check.sh                 # on a CUDA machine, from the repository root
#   benchmarks/gpu_check.sh --device cpu --quick   # the same code on the CPU (tests the script)
# Needs python3 with torch only: the package is used from the checkout (PYTHONPATH=.).
# Results: one JSON line per check, a SUMMARY line, and $OUT/gpu_check.json when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 480 "$PY" benchmarks/gpu_check.py ${OUT:+--json "$OUT/gpu_check.json"} "$@"
