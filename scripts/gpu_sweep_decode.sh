#!/usr/bin/env bash
# The decode kernel's launch candidates found offline (docs/benchmarks.md, "Registers and occupancy without
# a GPU"), timed one after another in one session on a lent GPU, the defaults first:
#   bash scripts/gpu_sweep_decode.sh OUT_DIR
set -uo pipefail
out=${1:?usage: gpu_sweep_decode.sh OUT_DIR}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
sweep() {  # NAME OPTIONS...
    local name=$1; shift
    echo "== $name $*"
    python3 scripts/bench_decode_attention.py --contexts 4096 8192 32768 --json "$out/decode-$name.json" "$@" |
        tail -6
}
sweep default
sweep programs3-registers168 --programs-per-sm 3 --max-registers 168
sweep programs3 --programs-per-sm 3
sweep registers168 --max-registers 168
# FP8 tiles converted before Triton moves them into tl.dot's operand layout (offline sm_90 SASS: the prompt
# loop's instructions 9.6 -> 6.0 a key, no single-byte shared-memory loads; docs/benchmarks.md)
sweep fp8-upcast-registers --fp8-upcast-in-registers
# Since the response loop runs through tl.dot, the float16 kernel needs 96 registers at one beam (5 blocks an
# SM by registers): its 3 pipeline stages' 70 KiB of shared memory bind at 3 blocks, and the grid gives an
# SM about 2 programs. Two stages (38 KiB: 5 blocks), alone and with programs to fill them:
sweep stages2 --num-stages 2
sweep stages2-programs4 --num-stages 2 --programs-per-sm 4
