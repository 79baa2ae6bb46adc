"""Arc A-series GPUs cannot make one allocation over 4 GiB: no tensor a generation allocates may exceed it.
Checked on the meta device (shapes without memory) for a Llama-3-8B-shaped model at batch 8 x 8192
tokens in bfloat16, through the decoder's own code: its weights, the KV cache, the prefill and a
decode step, every op's output recorded. A long prefill runs its gate/up GEMM over chunks of rows."""

from __future__ import annotations

import torch
from helpers import left_padded_prompts, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import xpu_coopt
from xpu_coopt.checkpoints import preset_config, random_model
from xpu_coopt.model import decoder as decoder_module
from xpu_coopt.model.decoder import LlamaDecoder
from xpu_coopt.model.spec import model_spec
from xpu_coopt.ops import Ops, dispatcher_kernels

ARC_A_SERIES_LIMIT = 4 * 2**30  # bytes in one allocation


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage any op returns, with the op and the shape."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: tuple[int, str, tuple[int, ...]] = (0, "", ())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() > self.largest[0]:
                self.largest = (tensor.untyped_storage().nbytes(), str(func), tuple(tensor.shape))
        return out


def test_a_llama_3_8b_generation_at_batch_8_by_8192_tokens_allocates_under_4_gib():
    config = preset_config("llama-3-8b")
    model = random_model("llama-3-8b", torch.bfloat16, "meta")
    batch, length = 8, 8192
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    positions = torch.arange(length, device="meta").expand(batch, length)
    with LargestAllocation() as mode:
        # torch's GEMMs and the ops' fake kernels: the XPU path's allocations (its GEMMs are torch's)
        decoder = LlamaDecoder(model, model_spec(config, "LlamaForCausalLM"), Ops(dispatcher_kernels(), "meta"),
                               torch.bfloat16, inplace=False)  # fmt: skip
        cache = decoder.new_cache(torch.zeros(batch, dtype=torch.int32, device="meta"), length, 1, 16, "auto")
        logits = decoder.forward(ids, positions, cache, True)
        cache.end_step()
        cache.begin_decode_step()
        decoder.forward(logits.argmax(-1).view(-1, 1), cache.positions().view(-1, 1), cache, True)
    size, op, shape = mode.largest
    assert size < ARC_A_SERIES_LIMIT, f"{op} allocates {size / 2**30:.2f} GiB for {shape}"
    # the gate/up GEMM runs over chunks of rows (1 GiB of output each): the largest tensor is its SiLU x up
    assert shape == (batch * length, config.intermediate_size)


def test_a_long_prefill_runs_its_gate_up_gemm_in_chunks_with_its_logits(monkeypatch):
    model = tiny_model("llama-gqa-8q2kv-d64")
    ids, mask = left_padded_prompts([7, 12], model.config.vocab_size)
    expected = xpu_coopt.optimize(model)(ids, mask).logits
    rows = []
    original = Ops.silu_and_mul
    monkeypatch.setattr(
        decoder_module, "GATED_CHUNK_BYTES", 5 * 2 * model.config.intermediate_size * 4
    )  # 5 rows
    monkeypatch.setattr(Ops, "silu_and_mul", lambda self, x: rows.append(x.shape[0]) or original(self, x))
    # the same rows through smaller GEMMs: equal up to the accumulation order torch's GEMM picks by shape
    torch.testing.assert_close(xpu_coopt.optimize(model)(ids, mask).logits, expected, atol=1e-5, rtol=1e-5)
    assert rows == [5, 5, 5, 5, 4] * 2  # each layer's 24 prompt rows in chunks of 5
