"""from_pretrained(): an optimized model straight from a checkpoint on disk, its quantized weights kept as
they are stored (mirrors ipex-llm's and transformers' loading call)."""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import torch

from xpu_coopt.api import optimize
from xpu_coopt.model.optimized import OptimizedModel
from xpu_coopt.quant.hf_quantized import load_quantized_folder, quantization_config

WEIGHT_DTYPES = ("auto",)  # "int4" and "int8" (quantizing a 16-bit checkpoint while loading) come next


def from_pretrained(
    path: str | PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    weight_dtype: str = "auto",
    **optimize_kwargs: Any,
) -> tuple[OptimizedModel, Any]:
    """(optimized model, tokenizer) of a checkpoint: a .gguf file or a Hugging Face folder.

    weight_dtype="auto" keeps the weights as stored: a GGUF's Q4_0 / Q4_1 projections and a GPTQ or AWQ
    folder's 4-bit ones stay 4-bit (never expanded to 16 bits in memory; run by the backend's 4-bit GEMM),
    a 16-bit checkpoint stays 16-bit. dtype: the activations' (and the 16-bit weights'); default bfloat16
    for a quantized checkpoint (the fast 4-bit path on CPUs), the checkpoint's own dtype for a 16-bit
    folder. optimize_kwargs go to optimize().
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(
            f"weight_dtype {weight_dtype!r} is not supported yet; choose one of {', '.join(WEIGHT_DTYPES)}"
        )
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        from xpu_coopt.quant.gguf_model import load_gguf_int4

        model, tokenizer = load_gguf_int4(path, dtype or torch.bfloat16)
    elif path.is_dir() and quantization_config(path) is not None:
        model, tokenizer = load_quantized_folder(path, dtype or torch.bfloat16)
    elif path.is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    model = model.to(device) if torch.device(device).type != "cpu" else model
    # inplace: the model is ours, so each projection's 4-bit copy goes as soon as the backend packed its own
    return optimize(model, dtype=dtype or model_dtype(model), inplace=True, **optimize_kwargs), tokenizer


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the 16-bit ones of a quantized model)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
