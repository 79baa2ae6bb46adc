#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one go (a lent GPU machine, run from the repository root):
# parity smoke test, decode-attention bandwidth, few-row GEMMs against cuBLAS, and xpu-coopt bench on
# the llama-2-7b shape.
#   bash scripts/gpu_bench.sh OUT_DIR
set -uo pipefail
out=${1:?usage: gpu_bench.sh OUT_DIR}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 scripts/cuda_smoke.py --backend triton 2>&1 | tee "$out/smoke.log"
python3 scripts/bench_decode_attention.py --json "$out/decode-attention.json"
# the same kernel as the decode graph runs it: the lengths in a device tensor
python3 scripts/bench_decode_attention.py --device-lengths --contexts 1024 4096 8192 32768 \
    --json "$out/decode-attention-device-lengths.json"
# beam search's decode attention: 4 beams sharing a 1024-token prompt, 128 response steps each
python3 scripts/bench_decode_attention.py --beams 4 --response 128 --contexts 1024 4096 \
    --json "$out/decode-attention-beam4.json"
python3 scripts/bench_linear.py --json "$out/linear.json"
bench() {  # NAME ARGS...
    local name=$1; shift
    python3 -m xpu_coopt.cli bench --model llama-2-7b --device cuda --dtype float16 --backend triton \
        --input-tokens 1024 --output-tokens 128 --repeats 2 --json "$out/$name.json" "$@" 2>&1 |
        grep -v "it/s\]" | tail -8
}
bench h100-llama2-7b-greedy-b1-triton
bench h100-llama2-7b-greedy-b1-triton-eager --cuda-graph off
bench h100-llama2-7b-beam4-b1-triton --num-beams 4
bench h100-llama2-7b-greedy-b64-triton --batch-size 64
bench h100-llama2-7b-greedy-b1-triton-fp8 --kv-dtype fp8_e4m3
# paged cache under the decode graph: unequal prompts store no padding blocks, and the pool grows with the
# generation, the graph captured again at each growth (next-token mean and p90 against the segment cache)
bench h100-llama2-7b-greedy-b16-unequal-segment --batch-size 16 --min-input-tokens 128
bench h100-llama2-7b-greedy-b16-unequal-paged --batch-size 16 --min-input-tokens 128 --kv-cache paged
bench h100-llama2-7b-greedy-b1-1024-out-paged --output-tokens 1024 --repeats 1 --kv-cache paged
# short generations: each repeat captures its own decode graph, or with --keep-decode-graph the later
# ones replay the first's (the JSON's "runs" hold every repeat)
bench h100-llama2-7b-greedy-b1-triton-16-tokens --output-tokens 16 --repeats 3
bench h100-llama2-7b-greedy-b1-triton-16-tokens-kept --output-tokens 16 --repeats 3 --keep-decode-graph
profile() {  # NAME ARGS...
    local name=$1; shift
    python3 scripts/profile_decode_step.py "$@" 2>&1 | grep -v "Warning\|_warn_once" | tee "$out/$name.txt"
}
profile profile-decode-b1
profile profile-decode-b1-unfused --unfused  # the GEMM fusions' gain
profile profile-decode-beam4 --num-beams 4
profile profile-decode-beam4-unfused --num-beams 4 --unfused
profile profile-decode-b1-fp8 --kv-dtype fp8_e4m3
profile profile-decode-b1-fp8-upcast --kv-dtype fp8_e4m3 --fp8-upcast-in-registers
# a conversation's K/V kept between turns, and prompt lookup decoding (the embedded SmolLM2-135M, with its
# tokenizer: the task needs real text), neither yet timed on a GPU
python3 scripts/bench_prefix_cache.py --model llama-2-7b --device cuda --dtype float16 2>&1 | tee "$out/prefix-cache.txt"
python3 scripts/bench_prompt_lookup.py --device cuda --dtype float16 2>&1 | grep -v "it/s\]" | tee "$out/prompt-lookup.txt"
