"""A GPTQ or AWQ Hugging Face folder as a transformers model skeleton whose projections stay 4-bit, or a
16-bit folder whose projections are quantized while loading (from_pretrained(weight_dtype="int4"/"int8")).

As for GGUF (gguf_model.py): the model is built on the meta device from the folder's config (its
quantization_config read here, not by transformers), then each tensor is set from the safetensors files,
one projection at a time: 4-bit ones as QuantizedLinear (quant/gptq.py), 16-bit ones quantized to one
where asked (so loading never holds more than one 16-bit projection), the rest in the compute dtype.
No GPTQ or AWQ library is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xpu_coopt.memory import return_freed_memory
from xpu_coopt.model.linear import projection_modules
from xpu_coopt.parallel.group import TensorParallel
from xpu_coopt.parallel.shard import LayerSplitter
from xpu_coopt.quant.gptq import int4_from_awq, int4_from_gptq
from xpu_coopt.quant.quantized_linear import Quantize, QuantizedLinear

QUANT_METHODS = ("gptq", "awq")
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_PARTS = ("qweight", "qzeros", "scales")


def quantization_config(folder: Path) -> dict[str, Any] | None:
    """The folder's config.json quantization_config, None where it has none."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("quantization_config")


def check_supported(quant: dict[str, Any], folder: Path) -> None:
    """ValueError naming what a quantization_config asks that xpu_coopt does not read."""
    method = quant.get("quant_method")
    if method not in QUANT_METHODS:
        raise ValueError(
            f"{folder}: quant_method {method!r} is not read; xpu_coopt reads {', '.join(QUANT_METHODS)}"
        )
    bits = quant.get("bits", quant.get("w_bit"))
    if bits != 4:
        raise ValueError(f"{folder}: {method} with {bits} bits is not read; xpu_coopt reads 4-bit {method}")
    if method == "awq" and (
        str(quant.get("version", "gemm")).lower() != "gemm" or not quant.get("zero_point", True)
    ):
        raise ValueError(f"{folder}: AWQ version {quant.get('version')!r} without zero points is not read; "
                         "xpu_coopt reads AWQ's GEMM format with zero points")  # fmt: skip
    if method == "gptq" and quant.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
        raise ValueError(f"{folder}: GPTQ checkpoint_format {quant['checkpoint_format']!r} is not read")


class _Tensors:
    """The folder's safetensors tensors by name, opened once, each read when asked for."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.files = [safe_open(str(path), framework="pt") for path in sorted(folder.glob("*.safetensors"))]
        if not self.files:
            raise ValueError(f"{folder} holds no .safetensors files")
        self.where: dict[str, Any] = {}
        for handle in self.files:
            self.where.update(dict.fromkeys(handle.keys(), handle))

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor | None:
        handle = self.where.get(name)
        return None if handle is None else handle.get_tensor(name)


def load_quantized_folder(
    folder: Path, dtype: torch.dtype, quantize: Quantize | None = None, parallel: TensorParallel | None = None
):
    """(model skeleton, tokenizer or None) of a GPTQ or AWQ folder, or of a 16-bit one whose projections
    `quantize` quantizes while loading (or keeps 16-bit, without it). `parallel`: each layer split to the
    rank's parts as soon as it is read (parallel/shard.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    quant = quantization_config(folder)
    if quant is not None:
        check_supported(quant, folder)
        if quantize is not None:
            raise ValueError(
                f"{folder} is quantized already ({quant.get('quant_method')}); load it with weight_dtype='auto'"
            )
    config = AutoConfig.from_pretrained(folder)
    if quant is not None:
        del config.quantization_config  # read above: transformers' own quantizer is not involved
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = _Tensors(folder)
    splitter = None if parallel is None else LayerSplitter(model, config, parallel)
    for name, _ in projection_modules(model):
        if quant is not None:
            _set_projection(model, name, tensors, quant, dtype)
        elif quantize is not None and name != "lm_head":  # the LM head stays 16-bit
            _quantize_projection(model, name, tensors, quantize, dtype)
        return_freed_memory()  # the projection's staging copies, before the next is read
    _set_the_rest(model, tensors, dtype, folder, splitter)
    if splitter is not None:
        splitter.finish(folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    tokenizer = (
        AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    )
    return model.eval(), tokenizer


def _set_projection(
    model: nn.Module, name: str, tensors: _Tensors, quant: dict[str, Any], dtype: torch.dtype
) -> None:
    """One projection: 4-bit where the folder holds its qweight, else its plain weight (read later)."""
    if f"{name}.qweight" not in tensors:
        return
    method, group_size = quant["quant_method"], int(quant.get("group_size", quant.get("q_group_size", 128)))
    parts = {part: tensors.get(f"{name}.{part}") for part in (GPTQ_PARTS if method == "gptq" else AWQ_PARTS)}
    missing = [part for part, tensor in parts.items() if tensor is None and part != "g_idx"]
    if missing:
        raise ValueError(f"{name} has a qweight but no {', '.join(missing)}")
    parts = {part: tensor for part, tensor in parts.items() if tensor is not None}
    if method == "gptq":
        zero_minus_one = quant.get("checkpoint_format", "gptq") == "gptq"
        weight = int4_from_gptq(parts, group_size, zero_minus_one, name)
    else:
        weight = int4_from_awq(parts, group_size, name)
    bias = tensors.get(f"{name}.bias")
    parent_path, _, child = name.rpartition(".")
    setattr(
        model.get_submodule(parent_path),
        child,
        QuantizedLinear(weight, None if bias is None else bias.to(dtype)),
    )


def _quantize_projection(
    model: nn.Module, name: str, tensors: _Tensors, quantize: Quantize, dtype: torch.dtype
) -> None:
    """One 16-bit projection read and quantized (its 16-bit copy dropped before the next is read)."""
    weight, bias = tensors.get(f"{name}.weight"), tensors.get(f"{name}.bias")
    if weight is None:
        raise ValueError(f"the folder lacks the tensor {name}.weight")
    parent_path, _, child = name.rpartition(".")
    module = model.get_submodule(name)
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(
            f"{name}.weight has shape {tuple(weight.shape)}, the config gives "
            f"{(module.out_features, module.in_features)}"
        )
    try:
        quantized = quantize(weight)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    setattr(
        model.get_submodule(parent_path),
        child,
        QuantizedLinear(quantized, None if bias is None else bias.to(dtype)),
    )


def _set_the_rest(
    model: nn.Module, tensors: _Tensors, dtype: torch.dtype, folder: Path, splitter: LayerSplitter | None
) -> None:
    """Every parameter still on the meta device, from the tensor of its name (the LM head tied where the
    folder has none); each layer handed to the splitter as its tensors come."""
    for name, parameter in list(model.named_parameters()):
        if not parameter.is_meta:  # (a layer is split only once all of its parameters are set)
            continue
        tensor = tensors.get(name)
        if (
            tensor is None
            and name == "lm_head.weight"
            and getattr(model.config, "tie_word_embeddings", False)
        ):
            model.lm_head.weight = model.model.embed_tokens.weight
            continue
        if tensor is None:
            raise ValueError(f"{folder} lacks the tensor {name}")
        if tuple(tensor.shape) != tuple(parameter.shape):
            raise ValueError(
                f"{folder}: {name} has shape {tuple(tensor.shape)}, the config gives {tuple(parameter.shape)}"
            )
        module_path, _, kind = name.rpartition(".")
        setattr(model.get_submodule(module_path), kind, nn.Parameter(tensor.to(dtype), requires_grad=False))
        if splitter is not None and name.startswith("model.layers."):
            splitter.layer_read(int(name.split(".")[2]))
