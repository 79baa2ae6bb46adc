"""optimize(): validate the model and the options, build the optimized wrapper, return it."""

from __future__ import annotations

import functools
import warnings
from os import PathLike
from typing import Any

import torch

from xpu_coopt.backends import resolve_backend
from xpu_coopt.backends.cpu import gemm as cpu_gemm
from xpu_coopt.cache import KV_CACHE_KINDS
from xpu_coopt.kv_scales import KVScales
from xpu_coopt.model.decoder import LlamaDecoder
from xpu_coopt.model.linear import Quantize, is_plain_linear, is_quantized_linear, projection_modules
from xpu_coopt.model.optimized import OptimizedModel
from xpu_coopt.model.spec import ModelSpec, model_spec
from xpu_coopt.model.weight_shapes import check_weights_match_config
from xpu_coopt.ops import KV_DTYPES, Ops
from xpu_coopt.parallel.group import TensorParallel, check_size, tensor_parallel_group
from xpu_coopt.parallel.shard import SHARDED, rank_model, rank_spec, release_whole_projections, shard_plan
from xpu_coopt.quant.rtn import quantize_int4, quantize_int8

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
    weight_dtype: str = "auto",
    group_size: int = 128,
    tensor_parallel: int = 1,
) -> OptimizedModel:
    """Returns `model` (a Hugging Face LLaMA, Mistral, Qwen2, Qwen3 or SmolLM3 causal LM) on xpu_coopt's kernels.

    Mirrors `ipex.llm.optimize(model, dtype=..., device=..., inplace=...)`: an IPEX user changes one import.
    docs/usage.md describes every argument; in short:

    Parameters
    ----------
    model : transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM or
            SmolLM3ForCausalLM, its weights on one device. They are shared, not copied (the fused q/k/v and
            gate/up matrices excepted).
    dtype : torch.float32, torch.bfloat16 or torch.float16, optional; default the model's own.
    kv_cache : "segment" or "paged": the KV cache's layout (same outputs).
    kv_dtype : "auto" (the compute dtype), "fp8_e4m3" or "fp8_e5m2".
    backend : "auto" (SYCL on xpu, Triton on cuda, the CPU kernels on cpu), "torch", "sycl" or "triton".
    inplace : False leaves the model unchanged; True may convert it and make its q/k/v and gate/up weights
        views of the fused matrices.
    kv_scales : per-tensor static FP8 scales (a KVScales, or the folder or file they were saved to).
    cuda_graph : replay decode steps as a CUDA graph; default on for CUDA models on the Triton backend.
    pack_shared_weights : bfloat16 on CPU: also pack the weights shared with the model (faster beams and
        batches, more memory).
    device : as in ipex.llm.optimize, the device type the weights are already on.
    weight_dtype : "auto" (the projections as the model holds them), "int4" (each layer's projections
        quantized round-to-nearest to 4 bits in groups of `group_size` input features, with integer zero
        points) or "int8" (8 bits, symmetric, one scale per output feature). The LM head and embeddings
        stay 16-bit; the model itself is left unchanged.
    group_size : int4's group size (default 128).
    tensor_parallel : N > 1 splits the model over the N ranks of torch.distributed's process group (the
        script's, or one initialized from torchrun's environment): each rank passes the same model and
        keeps 1/N of the heads, MLP columns and LM head rows (and of the KV cache); all ranks generate
        the same tokens. With inplace=True the model's own projections are released, so that each rank
        holds its part only.
    """
    if isinstance(model, OptimizedModel):
        raise TypeError("this model is optimized already: optimize() takes the transformers model")
    spec = _model_spec(model)
    _check_cache_options(kv_cache, kv_dtype)
    kv_scales = _static_scales(kv_scales, kv_dtype, spec.num_layers)
    parameter = _weights_on_one_device(model, device)
    dtype = _compute_dtype(dtype, parameter.dtype)
    ops = resolve_backend(backend, parameter.device)
    if inplace and parameter.dtype != dtype:
        model.to(dtype)
    if tensor_parallel != 1 and cuda_graph:
        raise ValueError("tensor_parallel does not run CUDA graphs yet: leave cuda_graph unset")
    use_graph, ops = _decode_graph(False if tensor_parallel != 1 else cuda_graph, ops, parameter.device)
    if pack_shared_weights:
        _check_packable(parameter.device, dtype)
    _check_foreign_projections(model, dtype)
    parallel, local_model, local_spec = _rank_part(model, spec, tensor_parallel, parameter.device)
    quantize, weight_label = _quantizer(model, weight_dtype, group_size, local_spec)
    decoder = LlamaDecoder(
        local_model, local_spec, ops, dtype, inplace, pack_shared_weights, quantize, parallel
    )
    if parallel is not None and inplace:
        release_whole_projections(model)
    optimized = OptimizedModel(model, decoder, kv_dtype, ops.name, kv_scales, use_graph, kv_cache)
    optimized.weight_dtype = weight_label
    return optimized


def _rank_part(
    model: torch.nn.Module, spec: ModelSpec, size: int, device: torch.device
) -> tuple[TensorParallel | None, Any, ModelSpec]:
    """(the tensor-parallel group, the part of the model and its spec this rank runs): the whole model
    without tensor parallelism."""
    check_size(size)
    if size == 1:
        if getattr(model, SHARDED, None) is not None:
            raise ValueError(
                "this model was split to one rank's parts while loading: pass its tensor_parallel"
            )
        return None, model, spec
    parallel = tensor_parallel_group(size, device)
    plan = getattr(model, SHARDED, None) or shard_plan(spec, size, parallel.rank)
    if (plan.size, plan.rank) != (size, parallel.rank):
        raise ValueError(f"the model was split for rank {plan.rank} of {plan.size} while loading, not for rank "
                         f"{parallel.rank} of {size}")  # fmt: skip
    return parallel, rank_model(model, spec, plan), rank_spec(spec, plan)


def _model_spec(model: Any) -> ModelSpec:
    """What the model's config says, for a transformers causal LM whose weights it describes; TypeError for
    anything else."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"optimize() takes a transformers causal LM (a torch.nn.Module with a config), got {type(model)}"
        )
    spec = model_spec(hf_config, type(model).__name__)
    plan = getattr(model, SHARDED, None)  # a model split to a rank's parts while loading
    check_weights_match_config(model, spec if plan is None else rank_spec(spec, plan))
    return spec


WEIGHT_DTYPES = ("auto", "int4", "int8")


def _quantizer(
    model: torch.nn.Module, weight_dtype: str, group_size: int, spec: ModelSpec
) -> tuple[Quantize | None, str]:
    """(how to quantize a projection's weight, None to keep them as they are; the label
    OptimizedModel.weight_dtype shows)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight_dtype {weight_dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
    if weight_dtype == "auto":
        return None, "auto"
    quantized = [name for name, module in projection_modules(model) if is_quantized_linear(module)]
    if quantized:
        raise ValueError(
            f"weight_dtype={weight_dtype!r} quantizes 16-bit weights, but the model's are quantized already "
            f"(e.g. {quantized[0]}): pass weight_dtype='auto'"
        )
    if weight_dtype == "int8":
        return quantize_int8, "int8"
    _check_group_size(group_size, spec)
    return functools.partial(quantize_int4, group_size=group_size), f"int4 g{group_size}"


def _check_group_size(group_size: int, spec: ModelSpec) -> None:
    """ValueError unless group_size is even and divides every projection's input features."""
    widths = {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
              "num_attention_heads * head_dim": spec.num_heads * spec.head_dim}  # fmt: skip
    for name, width in widths.items():
        if not isinstance(group_size, int) or group_size < 2 or group_size % 2 or width % group_size:
            fitting = next(
                (g for g in (128, 64, 32, 16, 8, 4, 2) if not any(w % g for w in widths.values())), None
            )
            raise ValueError(
                f"group_size {group_size!r} must be an even integer dividing every projection's input "
                f"features; {name} is {width}: pass group_size={fitting}"
            )


def _check_cache_options(kv_cache: str, kv_dtype: str) -> None:
    if kv_cache not in KV_CACHE_KINDS:
        raise ValueError(f"unknown kv_cache {kv_cache!r}; choose one of {', '.join(KV_CACHE_KINDS)}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")


def _static_scales(
    kv_scales: KVScales | str | PathLike | None, kv_dtype: str, num_layers: int
) -> KVScales | None:
    """The static FP8 scales, loaded where given as a path; errors where they do not fit the cache or model."""
    if kv_scales is None:
        return None
    if kv_dtype == "auto":
        raise ValueError("kv_scales are for FP8 caches: pass kv_dtype='fp8_e4m3' or 'fp8_e5m2' with them")
    if not isinstance(kv_scales, KVScales):
        kv_scales = KVScales.load(kv_scales)
    if kv_scales.num_layers != num_layers:
        raise ValueError(
            f"kv_scales hold {kv_scales.num_layers} layers, the model has {num_layers}: "
            "they were calibrated for another model"
        )
    return kv_scales


def _weights_on_one_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.nn.Parameter:
    """A parameter of the model, whose weights must all lie in memory on one device (`device`'s type, where
    given): device_map="auto" spreads a model over devices or offloads it (meta placeholders filled by hooks)."""
    devices = sorted({str(p.device) for p in model.parameters()})
    if len(devices) != 1 or devices[0] == "meta":
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
    return parameter


def _compute_dtype(dtype: torch.dtype | None, weights_dtype: torch.dtype) -> torch.dtype:
    dtype = weights_dtype if dtype is None else dtype
    if isinstance(dtype, str):
        raise TypeError(f"dtype takes a torch.dtype (torch.{dtype}, for example), not the string {dtype!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; choose one of {SUPPORTED_DTYPES}")
    return dtype


def _decode_graph(cuda_graph: bool | None, ops: Ops, device: torch.device) -> tuple[bool, Ops]:
    """Whether decode steps replay a CUDA graph (default: where one can), and the Ops to run them with."""
    graph_capable = ops.name == "triton" and device.type == "cuda"
    if cuda_graph and not graph_capable:
        raise ValueError(
            f"cuda_graph=True needs a CUDA model on the Triton backend, not a {device.type} model "
            f"on backend {ops.name!r}"
        )
    use_graph = graph_capable if cuda_graph is None else cuda_graph
    if graph_capable and not use_graph:
        # Eager decode steps on a GPU: a Triton launch costs tens of microseconds of Python more than a
        # cuBLAS call, which a step of 129 GEMMs does not win back (docs/ops.md, "linear").
        ops = ops.with_torch_gemms()
    return use_graph, ops


def _check_packable(device: torch.device, dtype: torch.dtype) -> None:
    unpackable = cpu_gemm.why_not_packable(device, dtype)
    if unpackable:
        raise ValueError(
            f"pack_shared_weights=True packs bfloat16 weights for oneDNN's CPU GEMMs; {unpackable}"
        )


def _check_foreign_projections(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Projections that are not plain nn.Linear (quantized layers, adapters) are called as they are, in
    their own dtype and at their own speed: a warning says so, as their layers then run unfused; and as
    xpu_coopt converts only what it reads, one with weights in another dtype than the compute dtype is an
    error (it would fail at the first generate())."""
    projections = projection_modules(model)
    foreign = [
        (name, module)
        for name, module in projections
        if not is_plain_linear(module) and not is_quantized_linear(module)
    ]
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
