#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one go on one H100/H200:
#     bash benchmarks/gpu_suite.sh OUT_DIR [NAME ...]     # NAME: run only these, in this order (default: all)
#     SUITE_SECONDS=560 bash benchmarks/gpu_suite.sh ...  # and cut each time box to what is left of 560 s
# Each benchmark writes OUT_DIR/<name>.json and OUT_DIR/<name>.log; one that fails or runs out of its time does not
# stop the others. The default order is highest priority first; all of them take up to 14 minutes.
set -u
out=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
rounds=(--window-rounds 5 --run-rounds 2 --steps 5 --hook-rounds 10)

run() {  # name seconds command...
    local name=$1 seconds=$2
    shift 2
    if [ "${SUITE_SECONDS:-0}" -gt 0 ] && [ $((SUITE_SECONDS - SECONDS)) -lt "$seconds" ]; then
        seconds=$((SUITE_SECONDS - SECONDS))
        [ "$seconds" -ge 20 ] || { echo "--- $name: skipped, no time left"; return; }
    fi
    echo "=== $name ($seconds s max): $*"
    local start=$SECONDS
    timeout "$seconds" "$@" --json "$out/$name.json" >"$out/$name.log" 2>&1
    echo "--- $name: exit $? after $((SECONDS - start)) s; $(tail -n 1 "$out/$name.log")"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
# name, time box (s), command; a full run of the suite takes about 9 minutes.
declare -A box=([wan_eager]=110 [wan_hook]=130 [memory]=130 [wan_regional]=150 [cogvideox_eager]=130 [wan_full]=200
                [wan_capture]=90 [peaks]=30)
declare -A command=(
    [wan_eager]="python steering_overhead.py --device cuda --model wan21_1.3b ${rounds[*]}"
    [wan_hook]="python steering_overhead.py --device cuda --model wan21_1.3b --compile hook ${rounds[*]}"
    [memory]="python memory_options.py --device cuda --model wan21_1.3b --steps 2 --rounds 1"
    [wan_regional]="python steering_overhead.py --device cuda --model wan21_1.3b --compile regional ${rounds[*]}"
    [cogvideox_eager]="python steering_overhead.py --device cuda --model cogvideox5b ${rounds[*]}"
    [wan_full]="python steering_overhead.py --device cuda --model wan21_1.3b --compile full --window-rounds 3 --run-rounds 1 --steps 5 --hook-rounds 5"
    [wan_capture]="python capture_overhead.py --device cuda --model wan21_1.3b --rounds 2 --steps 5"
    [peaks]="python peak_reduction.py --device cuda"
)
shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(wan_eager wan_hook memory wan_regional cogvideox_eager wan_capture peaks wan_full)
for name in "${names[@]}"; do
    [ -n "${command[$name]:-}" ] || { echo "unknown benchmark $name; known: ${!command[*]}"; exit 2; }
    # shellcheck disable=SC2086  # the command is split into words on purpose
    run "$name" "${box[$name]}" ${command[$name]}
done
