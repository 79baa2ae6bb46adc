"""from_pretrained(): an optimized model straight from a checkpoint on disk, its quantized weights kept as
they are stored (mirrors ipex-llm's and transformers' loading call)."""

from __future__ import annotations

import functools
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from xpu_coopt.api import optimize
from xpu_coopt.model.optimized import OptimizedModel
from xpu_coopt.parallel.group import TensorParallel, check_size, tensor_parallel_group
from xpu_coopt.quant.hf_quantized import load_quantized_folder, quantization_config
from xpu_coopt.quant.quantized_linear import Quantize
from xpu_coopt.quant.rtn import quantize_int4, quantize_int8

WEIGHT_DTYPES = ("auto", "int4", "int8")


def from_pretrained(
    path: str | PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    weight_dtype: str = "auto",
    group_size: int = 128,
    **optimize_kwargs: Any,
) -> tuple[OptimizedModel, Any]:
    """(optimized model, tokenizer) of a checkpoint: a .gguf file or a Hugging Face folder.

    weight_dtype="auto" keeps the weights as stored: a GGUF's Q4_0 / Q4_1 / Q4_K / Q8_0 / Q6_K projections
    and a GPTQ or AWQ folder's 4-bit ones stay quantized (never expanded to 16 bits in memory; run by the
    backend's 4- or 8-bit GEMM), a 16-bit checkpoint stays 16-bit. "int4" (groups of `group_size`) and
    "int8" (per channel) quantize a 16-bit checkpoint's projections round-to-nearest while loading, one at
    a time: loading holds the quantized weights and one 16-bit projection, never the 16-bit model.
    dtype: the activations' (and the 16-bit weights'); default bfloat16 for a quantized checkpoint (the
    fast quantized path on CPUs), the checkpoint's own dtype for a 16-bit folder loaded 16-bit.
    optimize_kwargs go to optimize(). With tensor_parallel=N (under torchrun), the checkpoint is split
    while it loads: each rank keeps only its part of each layer, never holding the whole model.
    """
    quantize = _quantizer(weight_dtype, group_size)
    path = Path(path)
    parallel = _parallel(optimize_kwargs.get("tensor_parallel", 1), device) if path.exists() else None
    if path.suffix == ".gguf" and path.is_file():
        from xpu_coopt.quant.gguf_model import load_gguf

        model, tokenizer = load_gguf(path, dtype or torch.bfloat16, quantize, parallel)
    elif path.is_dir() and (quantize is not None or quantization_config(path) is not None):
        model, tokenizer = load_quantized_folder(path, dtype or torch.bfloat16, quantize, parallel)
    elif path.is_dir() and parallel is not None:  # read by xpu_coopt, each layer split as it comes
        model, tokenizer = load_quantized_folder(path, dtype or _stored_dtype(path), None, parallel)
    elif path.is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    model = model.to(device) if torch.device(device).type != "cpu" else model
    # inplace: the model is ours, so each projection's quantized copy goes as soon as the backend packed its own
    optimized = optimize(model, dtype=dtype or model_dtype(model), inplace=True, **optimize_kwargs)
    if quantize is not None:
        optimized.weight_dtype = "int8" if weight_dtype == "int8" else f"int4 g{group_size}"
    return optimized, tokenizer


def _stored_dtype(folder: Path) -> torch.dtype:
    """The dtype a folder's config says its weights are stored in (float32 where it says none)."""
    import json

    config = json.loads((folder / "config.json").read_text())
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, name)


def _parallel(tensor_parallel: int, device: str | torch.device) -> TensorParallel | None:
    """The rank's group, where a checkpoint is to be split while it loads."""
    check_size(tensor_parallel)
    if tensor_parallel == 1:
        return None
    return tensor_parallel_group(tensor_parallel, torch.device(device))


def _quantizer(weight_dtype: str, group_size: int) -> Quantize | None:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(
            f"weight_dtype {weight_dtype!r} is not supported; choose one of {', '.join(WEIGHT_DTYPES)}"
        )
    if weight_dtype == "int4":
        return functools.partial(quantize_int4, group_size=group_size)
    return quantize_int8 if weight_dtype == "int8" else None


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the 16-bit ones of a quantized model)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
