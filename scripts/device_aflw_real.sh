#!/usr/bin/env bash
# experiment=aflw_real_gpu on a lent GPU machine that has no network and takes at most 64 MiB
# of files per call (the `device` tool of our workplace; docs/benchmarks.md, "Real faces on a GPU").
# The training set travels in parts, one per call, made here (with the rest of gpu_carry/) by
#   python scripts/prepare_device_carry.py <packed> --parts 2 --python312 <py3.12 with cython> [--init <ckpt>]
# and waits on the machine in $VRN_DEVICE_DATA between calls; the last call merges the parts
# and trains. gpu_carry/ (ignored by git, carried) also holds the wheels the machine's image lacks
# (gpu_carry/whl: hydra-core, omegaconf, antlr4-python3-runtime), the Cython kernel built for its
# Python (gpu_carry/_raster.cpython-312-*.so) and an optional warm-start checkpoint.
#
#   scripts/device_aflw_real.sh stage gpu_carry/p0            # keep a carried part on the machine
#   scripts/device_aflw_real.sh probe [hydra overrides]       # 2 short epochs: samples/s, a smoke test
#   scripts/device_aflw_real.sh train [hydra overrides]       # merge the parts, train, results -> $OUT
#   scripts/device_aflw_real.sh bench [bench_gpu.py args]     # scripts/bench_gpu.py on the staged data
#
# Results (at most 8 files, the tool's limit) go to $OUT (default outputs/device): metrics.jsonl,
# summary.json, the end of train.log, and the best and last network weights as slim checkpoints
# (scripts/export_pretrained.py's format). Environment: VRN_DEVICE_DATA (default
# /root/vrn_device_data), VRN_DEVICE_RUN (run folder, default /root/vrn_device_run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode="${1:?usage: $0 stage PART | probe | train | bench [args...]}"
shift
data="${VRN_DEVICE_DATA:-/root/vrn_device_data}"
run="${VRN_DEVICE_RUN:-/root/vrn_device_run}"
out="${OUT:-outputs/device}"
mkdir -p "$data" "$out"

# the image's python3 holds torch, lightning, torchmetrics, opencv, scikit-image; add what it lacks
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/vrn_site gpu_carry/whl/*.whl
fi
export PYTHONPATH="/tmp/vrn_site:$PWD:$PWD/third_party/3ddfa_v2${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
py_tag="$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
if [[ ! -f "vrn/geometry/_raster$py_tag" ]]; then
  if [[ -f "gpu_carry/_raster$py_tag" ]]; then
    cp "gpu_carry/_raster$py_tag" vrn/geometry/
  else
    python3 setup.py build_ext --inplace >/dev/null
  fi
fi

export_weights() {  # export_weights CKPT NAME: slim network weights into $out
  [[ -f "$1" ]] && python3 -c "
import sys
from vrn.checkpoint import load_network, save_network
net, spec, layout = load_network(sys.argv[1])
save_network(sys.argv[2], net, spec, layout)
" "$1" "$out/$2" || echo "no checkpoint $1"
}

staged_parts() {  # the staged part folders (every folder in $data but the merged one)
  local d
  for d in "$data"/*/; do
    d="${d%/}"
    [[ "$(basename "$d")" == merged || "$d" == *.partial ]] || echo "$d"
  done
}

collect() {  # collect RUN_DIR PREFIX: the run's record into $out
  local dir="$1" prefix="$2"
  for f in metrics.jsonl summary.json; do
    [[ -f "$dir/$f" ]] && cp "$dir/$f" "$out/${prefix}_$f"
  done
  [[ -f "$dir/train.log" ]] && tail -n 200 "$dir/train.log" >"$out/${prefix}_train_log_tail.txt"
  return 0
}

case "$mode" in
  stage)
    part="${1:?stage needs the carried part folder}"
    dest="$data/$(basename "$part")"
    if [[ -d "$dest" ]]; then
      echo "$dest already staged"
    else
      mv "$part" "$dest"
    fi
    du -sh "$data"/*
    ;;
  probe | train)
    mapfile -t parts < <(staged_parts)
    [[ ${#parts[@]} -gt 0 ]] || { echo "no staged parts in $data: run '$0 stage gpu_carry/pK' first" >&2; exit 2; }
    root="$data/merged"
    if [[ "$mode" == probe ]]; then
      root="${parts[0]}"
    elif [[ ! -d "$root" ]]; then
      python3 scripts/pack_subset.py --merge "$root" "${parts[@]}"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    # a new folder per run (train, train_2, ...): a later call can resume an earlier run with
    # ckpt_path=$run/train/checkpoints/last.ckpt (exact resume on the same merged data)
    dir="$run/$mode"
    n=2
    while [[ -e "$dir" ]]; do
      dir="$run/${mode}_$n"
      n=$((n + 1))
    done
    echo "run folder: $dir"
    extra=()
    [[ "$mode" == probe ]] && extra=(trainer.max_steps=200 trainer.limit_train_batches=100 trainer.limit_val_batches=3)
    set +e
    python3 -m vrn.train experiment=aflw_real_gpu "data.root=$root" logger=csv \
      "hydra.run.dir=$dir" "${extra[@]}" "$@" 2>&1 | tr '\r' '\n' | grep -v -E '^\s*$|it/s\]?$' | tail -n 60
    rc=${PIPESTATUS[0]}
    set -e
    collect "$dir" "$mode"
    if [[ "$mode" == train ]]; then
      best="$(ls "$dir"/checkpoints/epoch_*.ckpt 2>/dev/null | head -n 1 || true)"
      [[ -n "$best" ]] && export_weights "$best" "train_best.ckpt"
      export_weights "$dir/checkpoints/last.ckpt" "train_last.ckpt"
    fi
    cat "$dir/metrics.jsonl" 2>/dev/null || true
    exit "$rc"
    ;;
  bench)
    mapfile -t parts < <(staged_parts)
    python3 scripts/bench_gpu.py --device cuda --packed "${parts[0]}" --json "$out/bench_gpu.json" "$@" \
      | tee "$out/bench_gpu.md"
    ;;
  *)
    echo "unknown mode $mode: stage | probe | train | bench" >&2
    exit 2
    ;;
esac
