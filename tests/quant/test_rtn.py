"""optimize(weight_dtype="int4"): round-to-nearest 4-bit projections with integer zero points."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import left_padded_prompts, tiny_model

import xpu_coopt
from xpu_coopt.model.linear import projection_modules
from xpu_coopt.quant.rtn import quantize_int4


@pytest.mark.parametrize("group_size", [32, 128])
def test_round_to_nearest_keeps_each_weight_within_half_a_step(group_size):
    weight = torch.randn(48, 256) * torch.logspace(-3, 1, 48)[:, None]
    weight[3, :group_size] = 0.0  # an all-zero group
    quantized = quantize_int4(weight, group_size)
    scales = quantized.scales.repeat_interleave(group_size, dim=1)
    assert torch.equal(quantized.scales, quantized.scales.half().float())  # float16 scales, as GPTQ's
    zeros = -quantized.offsets / quantized.scales
    assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 15  # integer zero points
    error = (quantized.dequantize() - weight).abs()
    assert (error <= scales / 2 * (1 + 1e-3) + 1e-7).all()
    assert torch.equal(quantized.dequantize()[3, :group_size], torch.zeros(group_size))


def _dequantized_copy(model, group_size):
    """The model with each layer's projections replaced by their int4 values (the LM head as it was)."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in projection_modules(copied):
            if name != "lm_head":
                module.weight.copy_(quantize_int4(module.weight, group_size).dequantize())
    return copied


@pytest.mark.parametrize("name", ["llama-gqa-8q2kv-d64", "qwen2-bias", "qwen3-qk-norm"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_int4_gives_transformers_tokens_over_the_quantized_values(name, num_beams):
    model = tiny_model(name)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimized = xpu_coopt.optimize(model, weight_dtype="int4", group_size=32)
    assert all(key in before and torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert optimized.decoder.layers[0].qkv.quantized and not optimized.decoder.lm_head.quantized
    ids, mask = left_padded_prompts([5, 11], model.config.vocab_size)
    kwargs = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False, pad_token_id=0)
    expected = _dequantized_copy(model, 32).generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(optimized.generate(ids, attention_mask=mask, **kwargs), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(weight_dtype="int3"), "unknown weight_dtype 'int3'; choose one of auto, int4, int8"),
        (
            dict(weight_dtype="int4", group_size=96),
            "group_size 96 must be an even integer dividing .* is 512",
        ),
        (dict(weight_dtype="int4", group_size=0), "group_size 0 must be an even integer"),
    ],
)
def test_bad_weight_options_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"), **kwargs)


def test_int4_of_a_model_quantized_already_is_an_error():
    from xpu_coopt.quant.quantized_linear import QuantizedLinear

    model = tiny_model("llama-gqa-8q2kv-d64")
    attention = model.model.layers[0].self_attn
    attention.q_proj = QuantizedLinear(quantize_int4(attention.q_proj.weight, 32))
    with pytest.raises(
        ValueError, match=r"the model's are quantized already \(e\.g\. model\.layers\.0\.self_attn\.q_proj\)"
    ):
        xpu_coopt.optimize(model, weight_dtype="int4")


def test_converting_a_model_with_4_bit_projections_keeps_their_values():
    """model.to(dtype) (as optimize(inplace=True) does) converts floating-point tensors: a
    QuantizedLinear's scales and offsets stay exact."""
    from xpu_coopt.quant.quantized_linear import QuantizedLinear

    weight = quantize_int4(torch.randn(32, 64), 32)
    module = QuantizedLinear(weight).to(torch.bfloat16)
    assert torch.equal(module.quantized_weight.dequantize(), weight.dequantize())
