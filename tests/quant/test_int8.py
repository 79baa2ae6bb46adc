"""8-bit weights end to end: optimize(weight_dtype="int8"), GGUF Q8_0 / Q6_K projections (Q6_K beside Q4_K
in one fused q/k/v, as a Q4_K_M file holds them) and from_pretrained quantizing a 16-bit folder while
loading, each against transformers running the same values dequantized (float32)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from helpers import (
    assert_bfloat16_close_to_float32,
    left_padded_prompts,
    random_int8_blocks,
    random_q4_k_blocks,
    tiny_model,
)

import xpu_coopt
from xpu_coopt.model.linear import projection_modules
from xpu_coopt.pretrained import from_pretrained
from xpu_coopt.quant.gguf_blocks import quantized_from_blocks
from xpu_coopt.quant.quantized_linear import QuantizedLinear
from xpu_coopt.quant.rtn import quantize_int4, quantize_int8

GENERATE = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def test_int8_round_to_nearest_is_per_channel_within_half_a_step():
    weight = torch.randn(48, 256) * torch.logspace(-3, 1, 48)[:, None]
    weight[5] = 0.0  # an all-zero row
    quantized = quantize_int8(weight)
    assert quantized.group_size == 256 and torch.equal(quantized.scales, quantized.scales.half().float())
    error = (quantized.dequantize() - weight).abs()
    assert (error <= quantized.scales / 2 * (1 + 1e-3) + 1e-7).all()
    assert torch.equal(quantized.dequantize()[5], torch.zeros(256))


def _with_weights(model, weights: dict):
    """(model whose projections `weights` names are QuantizedLinear of them, the same model with them
    dequantized in nn.Linear)."""
    quantized, dequantized = copy.deepcopy(model), copy.deepcopy(model)
    for name, weight in weights.items():
        parent_path, _, child = name.rpartition(".")
        bias = quantized.get_submodule(name).bias
        setattr(quantized.get_submodule(parent_path), child, QuantizedLinear(weight, bias))
        with torch.no_grad():
            dequantized.get_submodule(name).weight.copy_(weight.dequantize())
    return quantized, dequantized


@pytest.mark.parametrize("name", ["llama-gqa-8q2kv-d64", "qwen2-bias"])
@pytest.mark.parametrize("backend", ["auto", "sycl", "triton"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_int8_gives_transformers_tokens_over_the_quantized_values(name, backend, num_beams):
    model = tiny_model(name)
    weights = {n: quantize_int8(m.weight) for n, m in projection_modules(model) if n != "lm_head"}
    _, dequantized = _with_weights(model, weights)
    optimized = xpu_coopt.optimize(model, weight_dtype="int8", backend=backend)
    assert optimized.weight_dtype == "int8" and optimized.decoder.layers[0].gate_up.quantized
    ids, mask = left_padded_prompts([5, 11], model.config.vocab_size)
    kwargs = dict(GENERATE, num_beams=num_beams)
    assert torch.equal(optimized.generate(ids, attention_mask=mask, **kwargs),
                       dequantized.generate(ids, attention_mask=mask, **kwargs))  # fmt: skip


def _q4_k_m_like(model):
    """Q4_K q/k, gate/up and o_proj; Q6_K v_proj and down_proj (Q4_K_M's choice for half the layers); Q8_0
    where a width does not fit 256-column blocks."""
    weights = {}
    for index, (name, linear) in enumerate(projection_modules(model)):
        if name == "lm_head":
            continue
        rows, columns = linear.out_features, linear.in_features
        if columns % 256:
            raw = quants.quantize(linear.weight.detach().numpy(), GGMLQuantizationType.Q8_0)
            weights[name] = quantized_from_blocks(raw, "Q8_0", columns)
        elif name.endswith(("v_proj", "down_proj")):
            weights[name] = quantized_from_blocks(
                random_int8_blocks(rows, columns, "Q6_K", index), "Q6_K", columns
            )
        else:
            raw = random_q4_k_blocks(rows, columns, seed=index)
            raw.reshape(rows, -1, 144)[..., :4] = np.array([2e-5, 2e-5], dtype=np.float16).view(np.uint8)
            weights[name] = quantized_from_blocks(raw, "Q4_K", columns)
    return weights


@pytest.mark.parametrize("backend", ["auto", "sycl", "triton"])
def test_mixed_4_and_8_bit_projections_give_transformers_tokens(backend):
    """A fused q/k/v of Q4_K q and k and a Q6_K v runs as one 4-bit and one 8-bit GEMM."""
    model = tiny_model("llama-gqa-8q2kv-d64")
    quantized, dequantized = _with_weights(model, _q4_k_m_like(model))
    optimized = xpu_coopt.optimize(quantized, backend=backend)
    qkv = optimized.decoder.layers[0].qkv
    assert [part.weight.__class__.__name__ for part in qkv.parts][-1] != qkv.parts[
        0
    ].weight.__class__.__name__
    ids, mask = left_padded_prompts([5, 11], model.config.vocab_size)
    assert torch.equal(optimized.generate(ids, attention_mask=mask, **GENERATE),
                       dequantized.generate(ids, attention_mask=mask, **GENERATE))  # fmt: skip


def test_8_bit_projections_in_bfloat16_stay_close_to_their_values():
    model = tiny_model("llama-gqa-8q2kv-d64")
    assert_bfloat16_close_to_float32(*_with_weights(model, _q4_k_m_like(model)))


@pytest.mark.parametrize(("weight_dtype", "quantize"), [("int8", quantize_int8), ("int4", None)])
def test_from_pretrained_quantizes_a_16_bit_folder_while_loading(tmp_path, weight_dtype, quantize):
    model = tiny_model("qwen2-bias")
    model.save_pretrained(tmp_path)
    loaded, tokenizer = from_pretrained(
        tmp_path, dtype=torch.float32, weight_dtype=weight_dtype, group_size=32
    )
    assert tokenizer is None and loaded.weight_dtype == {"int8": "int8", "int4": "int4 g32"}[weight_dtype]
    hf = loaded.hf_model
    assert all(type(m) is QuantizedLinear for n, m in projection_modules(hf) if n != "lm_head")
    quantize = quantize or (lambda weight: quantize_int4(weight, 32))
    weights = {n: quantize(m.weight) for n, m in projection_modules(model) if n != "lm_head"}
    _, dequantized = _with_weights(model, weights)
    ids, mask = left_padded_prompts([5, 11], model.config.vocab_size)
    assert torch.equal(loaded.generate(ids, attention_mask=mask, **GENERATE),
                       dequantized.generate(ids, attention_mask=mask, **GENERATE))  # fmt: skip


def test_weight_dtype_of_a_quantized_checkpoint_is_an_error(tmp_path):
    model = tiny_model("llama-gqa-8q2kv-d64")
    attention = model.model.layers[0].self_attn
    attention.q_proj = QuantizedLinear(quantize_int8(attention.q_proj.weight))
    with pytest.raises(ValueError, match=r"quantized already \(e.g. model.layers.0.self_attn.q_proj\)"):
        xpu_coopt.optimize(model, weight_dtype="int8")
