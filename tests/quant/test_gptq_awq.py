"""GPTQ and AWQ checkpoints: their 4-bit tensors repacked into Int4Weight hold exactly the format's values
(against dequantizers written element by element from the formats, tests/oracles.py), and a folder of
either runs 4-bit with transformers' tokens over those values."""

from __future__ import annotations

import json

import oracles
import pytest
import torch
from helpers import awq_tensors, gptq_tensors, left_padded_prompts, tiny_model
from safetensors.torch import save_file

import xpu_coopt
from xpu_coopt.model.linear import projection_modules
from xpu_coopt.quant.gptq import int4_from_awq, int4_from_gptq


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_repacks_to_its_values_bit_for_bit(group_size, act_order, symmetric):
    tensors = gptq_tensors(128, 48, group_size, act_order, symmetric)
    weight = int4_from_gptq(tensors, group_size, zero_minus_one=True, name="proj")
    expected = oracles.gptq_dequantize(
        tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], True
    )
    assert torch.equal(weight.dequantize(), expected.float())
    assert (weight.input_order is not None) == act_order


def test_gptq_v2_zero_points_are_stored_as_they_are():
    tensors = gptq_tensors(64, 16, 32, act_order=False, symmetric=False)
    weight = int4_from_gptq(tensors, 32, zero_minus_one=False, name="proj")
    expected = oracles.gptq_dequantize(
        tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], False
    )
    assert torch.equal(weight.dequantize(), expected.float())


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_repacks_to_its_values_bit_for_bit(group_size):
    tensors = awq_tensors(128, 48, group_size)
    weight = int4_from_awq(tensors, group_size, name="proj")
    expected = oracles.awq_dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size)
    assert torch.equal(weight.dequantize(), expected.float())


def test_mismatched_tensors_are_errors_naming_them():
    tensors = gptq_tensors(64, 16, 32, act_order=False, symmetric=False)
    with pytest.raises(
        ValueError, match=r"proj\.qzeros has shape \(2, 2\), not \(4, 2\) as its qweight implies"
    ):
        int4_from_gptq(tensors, 16, zero_minus_one=True, name="proj")
    uneven = dict(tensors, g_idx=torch.zeros(64, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"proj\.g_idx does not put 32 input features in each group"):
        int4_from_gptq(uneven, 32, zero_minus_one=True, name="proj")


def _write_folder(folder, model, method: str, group_size: int, act_order: bool = False):
    """`model` as a GPTQ or AWQ folder (random 4-bit projections, its other tensors as they are); returns the
    same model with those projections dequantized by the oracle, in nn.Linear layers."""
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    dequantized = {}
    inputs_order: dict[tuple[str, int], torch.Tensor] = {}
    for index, (name, module) in enumerate(projection_modules(model)):
        if name == "lm_head":
            continue
        del state[f"{name}.weight"]
        if method == "gptq":
            tensors = gptq_tensors(
                module.in_features, module.out_features, group_size, act_order, False, seed=index
            )
            key = (name.rsplit(".", 2)[0], module.in_features)  # one act order per layer input, as GPTQ's
            tensors["g_idx"] = inputs_order.setdefault(key, tensors["g_idx"]).clone()
            dequantized[name] = oracles.gptq_dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                                        tensors["g_idx"], True)  # fmt: skip
        else:
            tensors = awq_tensors(module.in_features, module.out_features, group_size, seed=index)
            dequantized[name] = oracles.awq_dequantize(
                tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size
            )
        state.update({f"{name}.{part}": tensor for part, tensor in tensors.items()})
    save_file(state, str(folder / "model.safetensors"))
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": group_size, "desc_act": act_order,
                                     "sym": False, **({"version": "gemm", "zero_point": True} if method == "awq" else {})}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        for name, weight in dequantized.items():
            model.get_submodule(name).weight.copy_(weight.float())
    return model


@pytest.mark.parametrize(("method", "act_order"), [("gptq", False), ("gptq", True), ("awq", False)])
@pytest.mark.parametrize("name", ["llama-gqa-8q2kv-d64", "qwen2-bias"])
def test_a_quantized_folder_runs_4_bit_with_transformers_tokens(tmp_path, method, act_order, name):
    reference = _write_folder(tmp_path, tiny_model(name), method, 32, act_order)
    model, tokenizer = xpu_coopt.from_pretrained(tmp_path, dtype=torch.float32)
    assert tokenizer is None and all(
        layer.qkv.quantized and layer.gate_up.quantized for layer in model.decoder.layers
    )
    ids, mask = left_padded_prompts([5, 11], reference.config.vocab_size)
    kwargs = dict(max_new_tokens=8, num_beams=2, do_sample=False, pad_token_id=0)
    expected = reference.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(model.generate(ids, attention_mask=mask, **kwargs), expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bits": 3}, "gptq with 3 bits is not read; xpu_coopt reads 4-bit gptq"),
        (
            {"quant_method": "bitsandbytes"},
            "quant_method 'bitsandbytes' is not read; xpu_coopt reads gptq, awq",
        ),
        ({"checkpoint_format": "marlin"}, "GPTQ checkpoint_format 'marlin' is not read"),
    ],
)
def test_an_unsupported_quantization_config_is_an_error(tmp_path, change, message):
    _write_folder(tmp_path, tiny_model("llama-gqa-8q2kv-d64"), "gptq", 32)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        xpu_coopt.from_pretrained(tmp_path)
