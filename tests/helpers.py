"""What several test modules share: the data's paths, the kernel tables under test, tolerances, small
models and prompts, and random cache cases. Test modules import from here, never from one another."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from xpu_coopt.backends.cpu import cpu_kernels
from xpu_coopt.backends.cpu import gemm as cpu_gemm
from xpu_coopt.backends.sycl.kernels import sycl_kernels
from xpu_coopt.backends.triton.kernels import triton_kernels
from xpu_coopt.ops import dispatcher_kernels, fp8

NAN_CODE = 0x7F  # a NaN in both e4m3fn and e5m2: unused cache cells hold it to prove they are never read

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STORIES_MODEL = DATA / "stories260K.bin"
STORIES_TOKENIZER = DATA / "tok512.bin"
TINYSTORIES_TEXT = DATA / "tinystories-valid.txt"

# Every kernel table that implements docs/ops.md; each must match the oracles. Device backends add theirs.
KERNEL_BACKENDS = {
    # torch.ops.xpu_coopt on CPU tensors: the registered CPU kernels, native ones included
    "dispatcher-cpu": dispatcher_kernels,
    # the same kernels called as plain functions (backend="torch") in PyTorch only: the decode attention on
    # the batched matmuls of devices other than the CPU ("reference" fixture: no rows path, no native kernel)
    "reference": cpu_kernels,
    "sycl-cpu": sycl_kernels,  # sycl_kernels/ compiled by SYCL-RTC, run on the OpenCL CPU device
    "triton-interpreter": triton_kernels,  # xpu_coopt/backends/triton/, under TRITON_INTERPRET=1 on CPU tensors
}

# oneDNN's packed bfloat16 GEMMs need AVX-512 (bw, vl, dq) or AVX-NE-CONVERT; on other CPUs the tests of
# pack_shared_weights=True cannot run, and its error is tested instead (tests/model/test_optimize.py).
_UNPACKABLE = cpu_gemm.why_not_packable(torch.device("cpu"), torch.bfloat16)
needs_bfloat16_packing = pytest.mark.skipif(
    _UNPACKABLE is not None, reason=f"pack_shared_weights=True cannot run here: {_UNPACKABLE}"
)

# Tolerances against float64 oracles, by activation dtype: (atol, rtol).
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol)


def require_data(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data {path} is missing: the shared data folder must sit beside the checkout")
    return path


# stories260K's weights in other architectures' attention variants, by architecture: their fixtures' names
STORIES_VARIANTS = {"smollm3": "stories_nope_model", "qwen3": "stories_qwen3_model"}


COMMON = dict(vocab_size=256, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=256)
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
# SmolLM3's default special tokens lie outside the tests' vocabulary.
SMOLLM3_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}


def rope_config(parameters: dict) -> dict:
    """Config arguments for these rope parameters, as the installed transformers takes them: 5's
    rope_parameters, or 4's rope_theta and rope_scaling (the parity tests run against either)."""
    if TRANSFORMERS_MAJOR >= 5:
        return {"rope_parameters": dict(parameters)}
    scaling = {key: value for key, value in parameters.items() if key != "rope_theta"}
    return {
        "rope_theta": parameters["rope_theta"],
        "rope_scaling": None if scaling["rope_type"] == "default" else scaling,
    }


CONFIGS = {
    "llama-mha-d64": (LlamaForCausalLM, LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, **COMMON)),
    "llama-gqa-8q2kv-d64": (LlamaForCausalLM, LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, **COMMON)),
    "llama-mqa-d128": (LlamaForCausalLM, LlamaConfig(hidden_size=512, num_attention_heads=4, num_key_value_heads=1, **COMMON)),
    "llama-tied-bias": (LlamaForCausalLM, LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                                      tie_word_embeddings=True, attention_bias=True, mlp_bias=True, **COMMON)),
    "llama3-rope": (LlamaForCausalLM, LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                                  **rope_config(LLAMA3_ROPE), **COMMON)),
    "llama-linear-rope": (LlamaForCausalLM, LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                                                        **rope_config({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
                                                        **COMMON)),
    # dynamic NTK scaling: the default frequencies up to max_position_embeddings, which generate() keeps to
    "llama-dynamic-rope": (LlamaForCausalLM, LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                                         **rope_config({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
                                                         **COMMON)),
    "mistral": (MistralForCausalLM, MistralConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                                  sliding_window=None, **COMMON)),
    # sliding-window attention on every layer (Mistral-7B-v0.1's 4096, scaled down to the tests' prompts)
    "mistral-window": (MistralForCausalLM, MistralConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                                         head_dim=32, sliding_window=6, **COMMON)),
    "qwen2-bias": (Qwen2ForCausalLM, Qwen2Config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, **COMMON)),
    # use_sliding_window: full attention on the first max_window_layers layers, a window on the others
    "qwen2-window": (Qwen2ForCausalLM, Qwen2Config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                                   use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                                   **COMMON)),
    # Qwen2.5's long-context setting (YaRN); a pretraining context short enough for the ramp to fall inside head_dim
    "qwen2-yarn": (Qwen2ForCausalLM, Qwen2Config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                                 **rope_config(YARN), **COMMON)),
    # each head's query and key RMS-normalized before rope; head_dim * heads unequal to hidden_size, as Qwen3-0.6B's
    "qwen3-qk-norm": (Qwen3ForCausalLM, Qwen3Config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                                    head_dim=64, **COMMON)),
    "qwen3-window": (Qwen3ForCausalLM, Qwen3Config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                                   head_dim=32, use_sliding_window=True, sliding_window=5,
                                                   max_window_layers=1, **COMMON)),
    # NoPE: every second layer without rope (SmolLM3-3B: every fourth)
    "smollm3-nope": (SmolLM3ForCausalLM, SmolLM3Config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                                       no_rope_layer_interval=2, **SMOLLM3_TOKENS, **COMMON)),
    # use_sliding_window: a window on the layers without rope, full attention with it
    "smollm3-window": (SmolLM3ForCausalLM, SmolLM3Config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                                         no_rope_layer_interval=2, use_sliding_window=True,
                                                         sliding_window=5, **SMOLLM3_TOKENS, **COMMON)),
}  # fmt: skip
# Relative tolerance on logits (max |diff| / max |logit|) by dtype.
LOGIT_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


# Relative tolerance on a mean loss, whose logits' rounding errors partly cancel.
def tiny_model(name: str, dtype: torch.dtype = torch.float32):
    cls, config = CONFIGS[name]
    torch.manual_seed(sum(map(ord, name)))
    model = cls(copy.deepcopy(config)).eval()  # tests may edit model.config
    # Random biases and norms (zero biases and unit norms at init would hide fused-bias and norm bugs).
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name:
                param.copy_(torch.randn_like(param) * 0.2 + (1.0 if "norm" in param_name else 0.0))
    return model.to(dtype)


def left_padded_prompts(batch_lengths: list[int], vocab: int, seed: int = 0):
    """A left-padded batch of prompts of the given lengths (odd lengths welcome)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(batch_lengths)
    ids = torch.randint(3, vocab, (len(batch_lengths), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(batch_lengths):
        mask[row, width - length :] = 1
        ids[row, : width - length] = 0
    return ids, mask


def transformers_logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions).logits


def assert_logits_close(actual, expected, dtype):
    relative = (actual.float() - expected.float()).abs().max() / expected.float().abs().max()
    assert relative <= LOGIT_TOLERANCE[dtype], f"relative logit error {relative:.2e}"


def check_prefill_and_decode(model, optimized, lengths, dtype):
    """Prefill logits, then four decode steps' logits, against transformers over the grown sequences."""
    ids, mask = left_padded_prompts(lengths, model.config.vocab_size)
    out = optimized(ids, mask)
    expected = transformers_logits(model, ids, mask)
    for row in range(ids.shape[0]):
        valid = mask[row].bool()
        assert_logits_close(out.logits[row, valid], expected[row, valid], dtype)
    cache = out.cache
    for _ in range(4):
        next_tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        out = optimized(next_tokens, cache=cache)
        ids = torch.cat((ids, next_tokens), dim=1)
        mask = torch.cat((mask, torch.ones_like(next_tokens)), dim=1)
        assert_logits_close(out.logits[:, -1], transformers_logits(model, ids, mask)[:, -1], dtype)


def frequent_token(model, ids, mask) -> int:
    """A token greedy decoding produces early, so that EOS actually ends some beams."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    return int(out[0, -1])


def stories_prompt(tokenizer):
    return torch.tensor([tokenizer.encode("Once upon a time")])


def unequal_stories_prompts(tokenizer):
    """(input_ids, attention_mask): a long prompt and a short one, left-padded by more than a cache block
    (xpu_coopt.cache.BLOCK_SIZE) of padding."""
    long = tokenizer.encode(
        "Once upon a time there was a little girl named Lily. She loved to play in the park"
    )
    short = tokenizer.encode("Once upon a time")
    ids = torch.zeros((2, len(long)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate((long, short)):
        ids[row, len(long) - len(tokens) :] = torch.tensor(tokens)
        mask[row, len(long) - len(tokens) :] = 1
    return ids, mask


def random_tensor(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype)


def nan_cache(shape, kv_dtype, dtype):
    """A cache whose every cell is NaN, so cells a kernel must not touch or read stay recognisable."""
    if fp8.is_fp8(kv_dtype):
        scales = torch.full(shape[:-1], float("nan"), dtype=fp8.SCALE_DTYPE)
        return torch.full(shape, NAN_CODE, dtype=torch.uint8), scales
    return torch.full(shape, float("nan"), dtype=dtype), None


def dequantized(cache, scale, kv_dtype):
    return cache if scale is None else fp8.decode(cache, scale, kv_dtype, torch.float64)


def segment_case(
    dtype, kv_dtype, requests, beams, heads, kv_heads, head_dim, prompt_len, response_len, padded,
    spare=5, keep_spare=False, starts=None, window=None,
):  # fmt: skip
    """Random segment caches with NaN in every cell the op must not read. The prompt segment is a view of
    its first prompt_len columns, or with keep_spare all of them (the lengths then come from segment_lens).
    Each request's prompt starts at starts[r] if given, else at (3 r) % prompt_len when padded. With a
    window, the columns and steps before each sequence's last `window` are never read either."""
    seqs = requests * beams
    capacity = response_len + 3
    if starts is None:
        starts = [(3 * r) % prompt_len if padded else 0 for r in range(requests)]
    prompt_start = torch.tensor(starts, dtype=torch.int32)
    query = random_tensor(seqs, heads, head_dim, dtype=dtype)
    caches = []
    # The prompt segment is passed as a strided view of a longer buffer, as the one-beam cache does.
    shapes = [(requests, kv_heads, prompt_len + spare, head_dim)] * 2 + [
        (seqs, kv_heads, capacity, head_dim)
    ] * 2
    for index, shape in enumerate(shapes):
        values = random_tensor(*shape, dtype=dtype)
        if fp8.is_fp8(kv_dtype):
            scale = fp8.dynamic_scale(values, kv_dtype).to(fp8.SCALE_DTYPE)
            cache = fp8.encode(values, scale, kv_dtype)
        else:
            cache, scale = values, None
        if index < 2:
            cache[:, :, prompt_len:] = NAN_CODE if fp8.is_fp8(kv_dtype) else float("nan")  # never read
            if not keep_spare:
                cache = cache[:, :, :prompt_len]
                scale = None if scale is None else scale[:, :, :prompt_len]
        caches.append((cache, scale))
    # Histories: step t of sequence s lives in a random row of the same request (after beam reorders).
    beam_slots = torch.full((seqs, capacity), -1, dtype=torch.int32)
    generator = torch.Generator().manual_seed(seqs * 31 + response_len)
    for s in range(seqs):
        first = (s // beams) * beams
        beam_slots[s, :response_len] = first + torch.randint(0, beams, (response_len,), generator=generator)
    if response_len:
        beam_slots[:, response_len - 1] = torch.arange(seqs, dtype=torch.int32)  # the newest token is its own
    window_first = prompt_len + response_len - window if window else 0  # of the prompt, then the response
    read = torch.zeros((seqs, capacity), dtype=torch.bool)
    for s in range(seqs):
        for t in range(max(window_first - prompt_len, 0), response_len):
            read[int(beam_slots[s, t]), t] = True
    exact = [dequantized(c, sc, kv_dtype).to(torch.float64) for c, sc in caches]
    # Poison what must never be read: prompt padding and response cells outside every history.
    for index, (cache, _) in enumerate(caches):
        poison = NAN_CODE if fp8.is_fp8(kv_dtype) else float("nan")
        if index < 2:
            for r in range(requests):
                cache[r, :, : max(int(prompt_start[r]), window_first)] = poison
        else:
            cache.permute(0, 2, 1, 3)[~read] = poison
    return query, caches, exact, prompt_start, beam_slots


# ---- 4-bit checkpoints' tensors, packed from random codes as each format packs them


def random_q4_k_blocks(rows: int, columns: int, seed: int = 0):
    """Raw Q4_K blocks: random codes and 6-bit scales and minimums, float16 d and dmin of a spread of sizes."""
    import numpy as np

    generator = np.random.default_rng(seed)
    blocks = generator.integers(0, 256, size=(rows, columns // 256, 144), dtype=np.uint8)
    magnitudes = generator.choice([1e-4, 1e-2, 1.0], size=(rows, columns // 256, 2))
    fields = (np.abs(generator.standard_normal((rows, columns // 256, 2))) * magnitudes).astype(np.float16)
    blocks[..., :4] = fields.view(np.uint8)
    return blocks.reshape(rows, -1)


def random_blocks(rows: int, columns: int, type_name: str, seed: int = 0):
    """Raw GGUF blocks (numpy uint8 [rows, bytes per row]) of a 4-bit type: random codes, float16 scales
    (and minimums) of either sign and a spread of magnitudes, as a quantizer writes them."""
    import numpy as np

    from xpu_coopt.quant.gguf_blocks import INT4_BLOCKS

    generator = np.random.default_rng(seed)
    block_bytes, has_min = INT4_BLOCKS[type_name]
    blocks = generator.integers(0, 256, size=(rows, columns // 32, block_bytes), dtype=np.uint8)
    magnitudes = generator.choice([1e-4, 1e-2, 1.0, 40.0], size=(rows, columns // 32, 2))
    fields = (generator.standard_normal((rows, columns // 32, 2)) * magnitudes).astype(np.float16)
    blocks[..., : 4 if has_min else 2] = fields.view(np.uint8)[..., : 4 if has_min else 2]
    return blocks.reshape(rows, -1)


def _to_int32(values: torch.Tensor) -> torch.Tensor:
    """int64 values of 32 bits -> int32 of the same bits."""
    return (
        (values & 0xFFFFFFFF)
        .to(torch.int64)
        .apply_(lambda v: v - (1 << 32) if v >= 1 << 31 else v)
        .to(torch.int32)
    )


def _pack_along_rows(codes: torch.Tensor) -> torch.Tensor:
    """[R, C] codes -> int32 [R / 8, C]: row 8i + j in bits 4j."""
    rows = codes.to(torch.int64).view(-1, 8, codes.shape[1])
    return _to_int32(sum(rows[:, j] << (4 * j) for j in range(8)))


def _pack_along_columns(codes: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[R, C] codes -> int32 [R, C / 8]: column 8c + order[j] in bits 4j."""
    runs = codes.to(torch.int64).view(codes.shape[0], -1, 8)
    return _to_int32(sum(runs[..., order[j]] << (4 * j) for j in range(8)))


def gptq_tensors(inputs: int, outputs: int, group_size: int, act_order: bool, symmetric: bool, seed: int = 0):
    """Random GPTQ tensors (v1 zero points, stored minus one) of a projection, and its g_idx."""
    generator = torch.Generator().manual_seed(seed)
    groups = inputs // group_size
    codes = torch.randint(0, 16, (inputs, outputs), generator=generator)
    zeros = (
        torch.full((groups, outputs), 8)
        if symmetric
        else torch.randint(1, 16, (groups, outputs), generator=generator)
    )
    scales = (torch.rand(groups, outputs, generator=generator) * 0.01 + 0.002).half()
    g_idx = torch.arange(inputs) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(inputs, generator=generator)]
    return {"qweight": _pack_along_rows(codes), "qzeros": _pack_along_columns(zeros - 1), "scales": scales,
            "g_idx": g_idx.to(torch.int32)}  # fmt: skip


def awq_tensors(inputs: int, outputs: int, group_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (inputs, outputs), generator=generator)
    zeros = torch.randint(0, 16, (inputs // group_size, outputs), generator=generator)
    scales = (torch.rand(inputs // group_size, outputs, generator=generator) * 0.01 + 0.002).half()
    from xpu_coopt.quant.gptq import AWQ_ORDER

    return {"qweight": _pack_along_columns(codes, AWQ_ORDER), "qzeros": _pack_along_columns(zeros, AWQ_ORDER),
            "scales": scales}  # fmt: skip


def quantized_weight(bits: int, out_features: int, in_features: int, group_size: int, seed: int = 0):
    """A random 4-bit (round-to-nearest of a normal weight) or 8-bit (random codes, float16-exact scales of a
    spread of sizes) weight [out_features, in_features] in groups of group_size."""
    from xpu_coopt.quant.int8 import Int8Weight
    from xpu_coopt.quant.rtn import quantize_int4

    generator = torch.Generator().manual_seed(seed)
    if bits == 4:
        return quantize_int4(torch.randn(out_features, in_features, generator=generator), group_size)
    codes = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    groups = (out_features, in_features // group_size)
    magnitudes = torch.tensor([1e-4, 1e-2, 1.0])[torch.randint(0, 3, groups, generator=generator)]
    scales = (torch.randn(groups, generator=generator).abs() * magnitudes).half().float()
    return Int8Weight(codes, scales, group_size)


def random_int8_blocks(rows: int, columns: int, type_name: str, seed: int = 0):
    """Raw GGUF Q8_0 or Q6_K blocks (numpy uint8 [rows, bytes per row]): random codes (and Q6_K's 8-bit
    sub-block scales), float16 d of either sign and a spread of magnitudes (Q6_K's 100x smaller, as its
    d multiplies a sub-block scale of up to 127)."""
    import numpy as np

    generator = np.random.default_rng(seed)
    block, block_bytes, d_at = {"Q8_0": (32, 34, 0), "Q6_K": (256, 210, 208)}[type_name]
    blocks = generator.integers(0, 256, size=(rows, columns // block, block_bytes), dtype=np.uint8)
    magnitudes = generator.choice([1e-4, 1e-2, 1.0], size=(rows, columns // block, 1))
    magnitudes = magnitudes / 100 if type_name == "Q6_K" else magnitudes
    d = (generator.standard_normal((rows, columns // block, 1)) * magnitudes).astype(np.float16)
    blocks[..., d_at : d_at + 2] = d.view(np.uint8)
    return blocks.reshape(rows, -1)


def assert_linear_matches_oracle(out, x, weight, bias, dtype, tolerance: float) -> None:
    """out (a quantized GEMM's x @ W.T + bias in dtype) against the float64 oracle over W's exact values:
    relative error max |diff| / max |expected| at most tolerance."""
    import oracles

    expected = oracles.linear(x, weight.dequantize(torch.float64), bias)
    relative = (out.double() - expected).abs().max() / expected.abs().max()
    assert out.dtype == dtype and relative <= tolerance, f"relative error {relative:.2e}"


def assert_bfloat16_close_to_float32(quantized, dequantized, tolerance: float = 3e-2) -> None:
    """optimize(quantized) in bfloat16 gives logits within `tolerance` (relative to the largest) of
    optimize(dequantized) in float32: a model with quantized projections and the same values in nn.Linear."""
    import xpu_coopt

    ids, mask = left_padded_prompts([5, 11], dequantized.config.vocab_size)
    actual = xpu_coopt.optimize(quantized, dtype=torch.bfloat16)(ids, mask).logits.float()
    expected = xpu_coopt.optimize(dequantized)(ids, mask).logits
    valid = mask.bool()
    relative = (actual[valid] - expected[valid]).abs().max() / expected[valid].abs().max()
    assert relative <= tolerance, f"relative logit error {relative:.2e}"


def assert_act_order_linear_matches_oracle(backend_module, rows: int) -> None:
    """A backend's linear_int4 (backend_module: its linear_int4 and pack_int4) over a GPTQ act-order
    weight, for `rows` float32 rows (past its kernel's rows: torch's GEMM), against the float64 oracle."""
    from xpu_coopt.quant.gptq import int4_from_gptq

    weight = int4_from_gptq(gptq_tensors(128, 48, 32, act_order=True, symmetric=False), 32, True, "proj")
    x = torch.randn(rows, 128)
    out = backend_module.linear_int4(x, backend_module.pack_int4(weight, x.dtype))
    assert_linear_matches_oracle(out, x, weight, None, torch.float32, 1e-6)


def free_port() -> int:
    """A loopback port free now (for a server a test starts)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(url: str, process, seconds: float, what: str) -> None:
    """Waits for the server process `process` to answer GET {url}/health; fails with its output if it exits."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, process.communicate()[0]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what} did not start within {seconds} s"
        time.sleep(0.2)
