"""A GGUF file as a transformers model skeleton whose 4-bit projections stay 4-bit.

The skeleton is built on the meta device from the config transformers reads out of the file; each of its
tensors is then set from the file: Q4_0 / Q4_1 / Q4_K / Q8_0 / Q6_K projections as QuantizedLinear (their
blocks repacked, never expanded to 16 bits), the embeddings and LM head likewise as the file stores them
(QuantizedEmbedding: a Q8_0 token_embd, tied to the head, is one 8-bit table for both), norms and 16-bit
tensors in the compute dtype. With weight_dtype "int4" / "int8" (`quantize`) the embeddings and LM head are
dequantized to the compute dtype instead. Loading so holds the quantized weights, never the 16-bit model. The skeleton is for xpu_coopt to read (optimize()), not to run with
transformers: what xpu_coopt does not read (the rotary tables) stays on the meta device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xpu_coopt.checkpoints import readable_gguf
from xpu_coopt.memory import return_freed_memory
from xpu_coopt.parallel.group import TensorParallel
from xpu_coopt.parallel.shard import LayerSplitter
from xpu_coopt.quant.gguf_blocks import QUANTIZED_TYPES, quantized_from_blocks
from xpu_coopt.quant.quantized_linear import Quantize, QuantizedEmbedding, QuantizedLinear, QuantizedWeight

# GGUF architectures read natively, and whether their q/k rows are permuted in the file (llama.cpp's
# convert_hf_to_gguf interleaves each head's rotary halves for "llama", which also holds Mistral).
GGUF_ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False}
# GGUF tensor names -> transformers module paths (per layer, then the model's own)
LAYER_MODULES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}  # fmt: skip
MODEL_MODULES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
PLAIN_TYPES = ("F32", "F16", "BF16")
# Model-level tensors kept quantized as stored (weight_dtype "auto"): the embeddings and the LM head.
KEPT_TABLES = ("token_embd", "output")


def load_gguf(
    path: Path, dtype: torch.dtype, quantize: Quantize | None = None, parallel: TensorParallel | None = None
):
    """(model skeleton, tokenizer or None) of a GGUF file, its quantized projections as QuantizedLinear;
    `quantize` (weight_dtype="int4" / "int8"): its 16-bit projections too, one at a time. `parallel`: each
    layer's projections are split to this rank's parts as soon as the layer is read (parallel/shard.py),
    so the rank never holds the whole model."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with readable_gguf(path):
        reader = gguf.GGUFReader(path)
        architecture = reader.fields["general.architecture"].contents()
    if architecture not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path} holds a {architecture!r} model; xpu_coopt reads GGUF {', '.join(GGUF_ARCHITECTURES)} models"
        )
    with readable_gguf(path):
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    permuted = GGUF_ARCHITECTURES[architecture]
    splitter = None if parallel is None else LayerSplitter(model, config, parallel)
    for name, tensor in tensors.items():
        _set_tensor(model, config, name, tensor, dtype, permuted, path, quantize)
        if splitter is not None and name.startswith("blk."):
            splitter.layer_read(int(name.split(".")[1]))
        return_freed_memory()  # the tensor's staging copies, before the next is read
    if "output.weight" not in tensors:  # tied: the LM head reads the embeddings
        _tie_head(model)
    _check_complete(model, path)
    if splitter is not None:
        splitter.finish(path)
    model.generation_config = GenerationConfig.from_model_config(config)
    tokenizer = None  # a GGUF without a vocabulary (tests, shape presets) has none
    if "tokenizer.ggml.model" in reader.fields:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def _module_path(name: str) -> tuple[str, str, str]:
    """(transformers module path, GGUF base name, "weight" or "bias") of a GGUF tensor name."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_MODULES:
        return f"model.layers.{parts[1]}.{LAYER_MODULES[parts[2]]}", parts[2], parts[3]
    if len(parts) == 2 and parts[0] in MODEL_MODULES:
        return MODEL_MODULES[parts[0]], parts[0], parts[1]
    raise ValueError(f"the GGUF tensor {name} is not one of a LLaMA-family model's")


def _set_tensor(model: nn.Module, config: Any, name: str, tensor: Any, dtype: torch.dtype,
                permuted: bool, path: Path, quantize: Quantize | None = None) -> None:  # fmt: skip
    """Sets the skeleton's module or parameter that GGUF tensor `name` holds."""
    module_path, base, kind = _module_path(name)
    parent_path, _, child = module_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    module = getattr(parent, child)
    type_name = tensor.tensor_type.name
    rows = _row_order(base, config) if permuted and base in ("attn_q", "attn_k") else None
    projection = base in PROJECTIONS and kind == "weight"
    if projection and type_name in QUANTIZED_TYPES:
        if quantize is not None:
            raise ValueError(
                f"{path}: {name} is quantized already ({type_name}); load it with weight_dtype='auto'"
            )
        weight = quantized_from_blocks(_raw(tensor, path), type_name, int(tensor.shape[0]))
        _set_quantized(parent, child, module, weight if rows is None else weight.rows(rows))
        return
    if base in KEPT_TABLES and kind == "weight" and type_name in QUANTIZED_TYPES and quantize is None:
        weight = quantized_from_blocks(_raw(tensor, path), type_name, int(tensor.shape[0]))
        setattr(
            parent, child, QuantizedEmbedding(weight) if base == "token_embd" else QuantizedLinear(weight)
        )
        return
    if projection and type_name not in PLAIN_TYPES:
        raise ValueError(
            f"{path}: {name} is {type_name}; xpu_coopt runs GGUF projections stored as "
            f"{', '.join(QUANTIZED_TYPES)} (kept as stored) or {', '.join(PLAIN_TYPES)}"
        )
    values = _dequantized(tensor, path)
    if rows is not None:
        values = values[rows]
    if projection and quantize is not None:
        try:
            weight = quantize(values)
        except ValueError as error:
            raise ValueError(f"{path}: {name}: {error}") from None
        _set_quantized(parent, child, module, weight)
        return
    setattr(module, kind, nn.Parameter(values.to(dtype), requires_grad=False))


def _tie_head(model: nn.Module) -> None:
    """The LM head reads the embeddings' table: the same tensors, quantized or not."""
    embeddings = model.model.embed_tokens
    if isinstance(embeddings, QuantizedEmbedding):
        model.lm_head = embeddings.tied_head()
    else:
        model.lm_head.weight = embeddings.weight


def _set_quantized(parent: nn.Module, child: str, module: nn.Module, weight: QuantizedWeight) -> None:
    """Replaces the projection `module` (parent.child) with a QuantizedLinear of `weight`, keeping a bias
    set already."""
    bias = module.bias if module.bias is not None and not module.bias.is_meta else None
    setattr(parent, child, QuantizedLinear(weight, bias))


def _raw(tensor: Any, path: Path) -> np.ndarray:
    """A GGUF tensor's stored bytes (or values), read from the file rather than through the reader's memory
    map: the map's pages would stay in the process's resident memory beside the repacked copy."""
    with open(path, "rb") as handle:
        handle.seek(tensor.data_offset)
        data = handle.read(int(tensor.n_bytes))
    return np.frombuffer(data, dtype=tensor.data.dtype).reshape(tensor.data.shape)


def _dequantized(tensor: Any, path: Path) -> torch.Tensor:
    """A GGUF tensor's values in float32 (the gguf package's dequantizer for quantized types)."""
    from gguf import quants

    values = quants.dequantize(_raw(tensor, path), tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32))


def _row_order(base: str, config: Any) -> torch.Tensor:
    """The rows that undo llama.cpp's q/k permutation (transformers' reverse permute, as an index)."""
    heads = config.num_attention_heads if base == "attn_q" else config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return torch.arange(heads * head_dim).view(heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)


def _check_complete(model: nn.Module, path: Path) -> None:
    """ValueError naming the parameters the file did not hold."""
    missing = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if missing:
        raise ValueError(f"{path} lacks tensors the model needs: {', '.join(missing[:5])}")
