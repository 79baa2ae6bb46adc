"""optimize(): validate the model and the options, build the optimized wrapper, return it."""

from __future__ import annotations

import warnings
from os import PathLike
from typing import Any

import torch

from xpu_coopt.backends import resolve_backend
from xpu_coopt.backends.cpu import gemm as cpu_gemm
from xpu_coopt.cache import KV_CACHE_KINDS
from xpu_coopt.kv_scales import KVScales
from xpu_coopt.model.decoder import LlamaDecoder
from xpu_coopt.model.linear import is_plain_linear, projection_modules
from xpu_coopt.model.optimized import OptimizedModel
from xpu_coopt.model.spec import model_spec
from xpu_coopt.ops import KV_DTYPES

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def optimize(
    model: Any,
    dtype: torch.dtype | None = None,
    kv_cache: str = "segment",
    kv_dtype: str = "auto",
    backend: str = "auto",
    inplace: bool = False,
    kv_scales: KVScales | str | PathLike | None = None,
    cuda_graph: bool | None = None,
    pack_shared_weights: bool = False,
    device: str | torch.device | None = None,
) -> OptimizedModel:
    """Returns `model` (a Hugging Face LLaMA, Mistral, Qwen2, Qwen3 or SmolLM3 causal LM) on xpu_coopt's kernels.

    Mirrors `ipex.llm.optimize(model, dtype=..., device=..., inplace=...)`: an IPEX user changes one import.

    Parameters
    ----------
    model : transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM or
            SmolLM3ForCausalLM
        Its weights are shared, not copied (the fused q/k/v and gate/up matrices excepted, see inplace).
    dtype : torch.float32, torch.bfloat16 or torch.float16, optional
        Compute dtype; default the model's own.
    kv_cache : "segment" or "paged"
        KV cache layout. "segment": prompt K/V once per request, response K/V per beam, each request's
        prompt segment as long as the batch's longest prompt (left padding included) and, with one beam,
        room for all max_new_tokens, allocated up front. "paged" (Opt-Pa): the same segments, the prompt
        segment (with one beam, the prompt and its response) in blocks of 16 tokens allocated as they fill,
        so left padding takes no memory and a generation that stops early never allocates the rest; its
        pool grows by copying when it runs out (xpu_coopt/cache/paged.py). Same outputs as "segment".
    kv_dtype : "auto", "fp8_e4m3" or "fp8_e5m2"
        "auto" stores K/V in the compute dtype; FP8 stores uint8 codes with per-token-per-head scales.
    backend : "auto", "torch", "sycl" or "triton"
        "auto": SYCL for xpu tensors, Triton for cuda, the PyTorch reference for cpu.
        "torch" runs the reference kernels on any device.
    inplace : bool
        False (default): the model passed in is left unchanged. True: it may be converted to `dtype`
        and its q/k/v and gate/up weights become views of the fused matrices, so no weight is held twice.
    kv_scales : KVScales, or a path to a model folder or file holding them, optional
        FP8 caches only: per-tensor static scales (one K and one V scale per layer, calibrated with
        xpu_coopt.calibrate_kv_scales) instead of the default dynamic per-token-per-head scales.
    cuda_graph : bool, optional
        Capture each generation's decode step as a CUDA graph at its first step and replay it for the
        rest, so a step costs GPU work rather than Python launch overhead. generate() keeps its KV cache
        and graph for the next generate() with as many prompts and beams whose prompt length and
        max_new_tokens fit in it, which then replays the graph without capturing one (the memory stays
        held until then, or until OptimizedModel.release_cache()). Default: on for CUDA models on
        the Triton backend (the only backend whose kernels read the cache lengths on the device). With
        the graph, decode steps run Triton's few-row GEMMs, fused with the RMSNorm before them, the
        residual add or SiLU after them; False runs them through torch (cuBLAS), unfused, whose eager
        launches cost less.
    pack_shared_weights : bool
        bfloat16 models on CPU only. xpu_coopt always packs the fused q/k/v and gate/up matrices (its own
        copies) into oneDNN's blocked layout. True packs the weights it shares with the model too (o_proj,
        down_proj, LM head): a second copy of them, which makes beam search and batches faster (multi-row
        GEMMs over them ~1.6-2.5x faster; single rows keep using the shared plain weights). Weights held on
        SmolLM2-135M: 1.52x the model's own by default, 2.00x with this (OptimizedModel.weight_bytes()).
        See docs/benchmarks.md.
    device : "cpu", "xpu", "cuda" (or a torch.device), optional
        As in ipex.llm.optimize: the device the model runs on, which must be where its weights already
        are (move it with model.to(device) first); None: wherever they are.
    """
    if isinstance(model, OptimizedModel):
        raise TypeError("this model is optimized already: optimize() takes the transformers model")
    hf_config = getattr(model, "config", None)
    if hf_config is None or not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"optimize() takes a transformers causal LM (a torch.nn.Module with a config), got {type(model)}"
        )
    spec = model_spec(hf_config, type(model).__name__)
    if kv_cache not in KV_CACHE_KINDS:
        raise ValueError(f"unknown kv_cache {kv_cache!r}; choose one of {', '.join(KV_CACHE_KINDS)}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    if kv_scales is not None:
        if kv_dtype == "auto":
            raise ValueError("kv_scales are for FP8 caches: pass kv_dtype='fp8_e4m3' or 'fp8_e5m2' with them")
        if not isinstance(kv_scales, KVScales):
            kv_scales = KVScales.load(kv_scales)
        if kv_scales.num_layers != spec.num_layers:
            raise ValueError(
                f"kv_scales hold {kv_scales.num_layers} layers, the model has {spec.num_layers}: "
                "they were calibrated for another model"
            )
    devices = sorted({str(p.device) for p in model.parameters()})
    if len(devices) != 1 or devices[0] == "meta":
        # device_map="auto" spreads a model over devices or offloads it (meta placeholders filled by hooks).
        raise ValueError(
            f"optimize() needs every weight of the model in memory on one device; this model's are on "
            f"{', '.join(devices)}: load it without a device_map that splits or offloads it, then move it with "
            ".to(device)"
        )
    parameter = next(model.parameters())
    if device is not None and torch.device(device).type != parameter.device.type:
        raise ValueError(
            f"optimize(device={str(device)!r}) but the model's weights are on {parameter.device}: move the model "
            f"with model.to({str(device)!r}) first"
        )
    dtype = parameter.dtype if dtype is None else dtype
    if isinstance(dtype, str):
        raise TypeError(f"dtype takes a torch.dtype (torch.{dtype}, for example), not the string {dtype!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; choose one of {SUPPORTED_DTYPES}")
    ops = resolve_backend(backend, parameter.device)
    if inplace and parameter.dtype != dtype:
        model.to(dtype)
    graph_capable = ops.name == "triton" and parameter.device.type == "cuda"
    if cuda_graph and not graph_capable:
        raise ValueError(
            f"cuda_graph=True needs a CUDA model on the Triton backend, not a {parameter.device.type} model "
            f"on backend {ops.name!r}"
        )
    unpackable = cpu_gemm.why_not_packable(parameter.device, dtype) if pack_shared_weights else None
    if unpackable:
        raise ValueError(
            f"pack_shared_weights=True packs bfloat16 weights for oneDNN's CPU GEMMs; {unpackable}"
        )
    use_graph = graph_capable if cuda_graph is None else cuda_graph
    if graph_capable and not use_graph:
        # Eager decode steps on a GPU: a Triton launch costs tens of microseconds of Python more than a
        # cuBLAS call, which a step of 129 GEMMs does not win back (docs/ops.md, "linear").
        ops = ops.with_torch_gemms()
    _check_foreign_projections(model, dtype)
    decoder = LlamaDecoder(model, spec, ops, dtype, inplace, pack_shared_weights)
    return OptimizedModel(model, decoder, kv_dtype, ops.name, kv_scales, use_graph, kv_cache)


def _check_foreign_projections(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Projections that are not plain nn.Linear (quantized layers, adapters) are called as they are, in
    their own dtype and at their own speed: a warning says so, as their layers then run unfused; and as
    xpu_coopt converts only what it reads, one with weights in another dtype than the compute dtype is an
    error (it would fail at the first generate())."""
    projections = projection_modules(model)
    foreign = [(name, module) for name, module in projections if not is_plain_linear(module)]
    if not foreign:
        return
    mismatched = sorted(
        {
            f"{name} ({type(module).__name__}, {parameter.dtype})"
            for name, module in foreign
            for parameter in module.parameters()
            if parameter.is_floating_point() and parameter.dtype != dtype
        }
    )
    if mismatched:
        raise ValueError(
            f"optimize(dtype={dtype}): {len(mismatched)} projection(s) are not plain torch.nn.Linear and hold "
            f"weights in another dtype, e.g. {mismatched[0]}; xpu_coopt calls such modules as they are and "
            f"cannot convert them: convert the model first (model.to({dtype})) or pass inplace=True"
        )
    kinds = sorted({type(module).__name__ for _, module in foreign})
    warnings.warn(
        f"{len(foreign)} of the model's {len(projections)} projections are not plain "
        f"torch.nn.Linear ({', '.join(kinds)}; e.g. {foreign[0][0]}): xpu_coopt calls them as they are, so "
        "their layers run unfused (no fused q/k/v, gate/up or norm GEMMs) at those modules' own speed; "
        "merge adapters or dequantize the weights for xpu_coopt's fused path",
        stacklevel=3,
    )
