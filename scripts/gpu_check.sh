#!/usr/bin/env bash
# GPU check: one prepared run (< 8 minutes on one GPU) that prints one Markdown table for
# docs/benchmarks.md ("GPU check" section): fast_dev_run of vrn_unguided on the GPU, training
# throughput (samples/s, peak memory) at batch 8 and 16 in fp32 / bf16-mixed / +channels_last /
# +torch.compile, the DataLoader feed rate with N workers, and the batched demo.
#
#   scripts/gpu_check.sh                         # fresh machine: venv + pip install -e ".[dev]" first
#   VRN_SKIP_INSTALL=1 scripts/gpu_check.sh      # use the active / existing environment as it is
#   scripts/gpu_check.sh --aflw /path/to/aflw_vrn/packed --workers 0,8,16   # extra args go to bench_gpu.py
#
# Environment: VRN_ASSETS_DIR (default ../shared/assets), VRN_VENV (default .venv),
# VRN_GPU_CHECK_TIMEOUT (hard limit in seconds, default 470), VRN_GPU_CHECK_BUDGET (seconds after
# which bench_gpu.py skips the remaining rows, default 400). The output is also written to
# outputs/gpu_check/gpu_check.md (and the rows to gpu_check.json there; outputs/ is not tracked).
# A CUDA build of torch must be installed first on a GPU machine (README "Install").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export VRN_ASSETS_DIR="${VRN_ASSETS_DIR:-../shared/assets}"
venv="${VRN_VENV:-.venv}"
limit="${VRN_GPU_CHECK_TIMEOUT:-470}"
budget="${VRN_GPU_CHECK_BUDGET:-400}"

if [[ "${VRN_SKIP_INSTALL:-0}" != "1" ]]; then
  if [[ ! -f "$venv/bin/activate" ]]; then
    python3 -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
  python -m pip install --quiet --upgrade pip
  pip install --quiet -e ".[dev]"
elif [[ -z "${VIRTUAL_ENV:-}" && -f "$venv/bin/activate" ]]; then
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

out=outputs/gpu_check
mkdir -p "$out"
timeout --signal=INT --kill-after=30 "$limit" \
  python scripts/bench_gpu.py --device cuda --budget-s "$budget" --json "$out/gpu_check.json" "$@" | tee "$out/gpu_check.md"
