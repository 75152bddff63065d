#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one go, sized for a 10-minute slot on one H100/H200:
#     bash benchmarks/gpu_suite.sh OUT_DIR
# Each benchmark writes OUT_DIR/<name>.json and OUT_DIR/<name>.log; one that fails or runs out of its time does not
# stop the others. Highest priority first.
set -u
out=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
rounds=(--window-rounds 5 --run-rounds 2 --steps 5 --hook-rounds 10)

run() {  # name seconds command...
    local name=$1 seconds=$2
    shift 2
    echo "=== $name ($seconds s max): $*"
    local start=$SECONDS
    timeout "$seconds" "$@" --json "$out/$name.json" >"$out/$name.log" 2>&1
    echo "--- $name: exit $? after $((SECONDS - start)) s; $(tail -n 1 "$out/$name.log")"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
run wan_eager 120 python steering_overhead.py --device cuda --model wan21_1.3b "${rounds[@]}"
run wan_regional 170 python steering_overhead.py --device cuda --model wan21_1.3b --compile regional "${rounds[@]}"
run cogvideox_eager 130 python steering_overhead.py --device cuda --model cogvideox5b "${rounds[@]}"
run wan_capture 90 python capture_overhead.py --device cuda --model wan21_1.3b --rounds 2 --steps 5
run peaks 30 python peak_reduction.py --device cuda
