"""A rank's part of the model, as vLLM and Megatron split a LLaMA-family layer:
- q/k/v and gate/up column-parallel: the rank's attention heads (its queries' K/V heads with them) and its
  slice of the MLP's intermediate columns, still one fused GEMM each;
- o_proj and down_proj row-parallel: the matching input columns; each rank's output is a partial sum that
  one all-reduce per projection completes (a bias added by rank 0 only);
- the LM head vocabulary-parallel: a slice of the vocabulary's rows (padded to equal slices), the logits
  gathered; embeddings and norms replicated.
K/V heads are split evenly where the ranks divide them, else (fewer K/V heads than ranks) each rank holds
the one its queries read, as vLLM replicates them. Each rank's KV cache then holds its own heads only."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from xpu_coopt.memory import return_freed_memory
from xpu_coopt.model.linear import is_plain_linear, is_quantized_linear, projection_modules
from xpu_coopt.model.spec import ModelSpec, model_spec
from xpu_coopt.parallel.group import TensorParallel
from xpu_coopt.quant.quantized_linear import QuantizedLinear


@dataclass(frozen=True)
class ShardPlan:
    size: int
    rank: int
    heads: slice  # the rank's query heads
    kv_heads: slice  # the K/V heads its queries read
    columns: slice  # its slice of the MLP's intermediate features
    vocab: slice  # its LM head rows
    vocab_rows: int  # rows every rank's LM head holds (the vocabulary padded to a multiple of the ranks)


def shard_plan(spec: ModelSpec, size: int, rank: int) -> ShardPlan:
    """Which heads, columns and vocabulary rows rank `rank` of `size` holds; ValueError where the model's
    shapes do not split that way."""
    heads, kv_heads = spec.num_heads, spec.num_kv_heads
    if heads % size or spec.intermediate_size % size:
        raise ValueError(
            f"tensor_parallel={size} must divide the attention heads ({heads}) and intermediate_size "
            f"({spec.intermediate_size})"
        )
    if kv_heads % size and size % kv_heads:
        raise ValueError(
            f"tensor_parallel={size} must divide the K/V heads ({kv_heads}) or be a multiple of them (each rank "
            "then holds the K/V head its queries read)"
        )
    local_heads = heads // size
    if kv_heads % size == 0:
        local_kv = kv_heads // size
        kv_start = rank * local_kv
    else:  # one K/V head per rank, the one its queries' group reads
        local_kv = 1
        kv_start = rank * local_heads // (heads // kv_heads)
    columns = spec.intermediate_size // size
    vocab_rows = -(-spec.vocab_size // size)
    return ShardPlan(
        size, rank, slice(rank * local_heads, (rank + 1) * local_heads), slice(kv_start, kv_start + local_kv),
        slice(rank * columns, (rank + 1) * columns),
        slice(rank * vocab_rows, min((rank + 1) * vocab_rows, spec.vocab_size)), vocab_rows,
    )  # fmt: skip


def rank_spec(spec: ModelSpec, plan: ShardPlan) -> ModelSpec:
    """The spec of the rank's part: its heads and intermediate columns (the decoder and caches size from it)."""
    return dataclasses.replace(
        spec, num_heads=plan.heads.stop - plan.heads.start, num_kv_heads=plan.kv_heads.stop - plan.kv_heads.start,
        intermediate_size=plan.columns.stop - plan.columns.start,
    )  # fmt: skip


# Set on a model whose layers a loader split already (from_pretrained with tensor_parallel): its plan.
SHARDED = "xpu_coopt_shard"


def rank_model(hf_model: nn.Module, spec: ModelSpec, plan: ShardPlan) -> Any:
    """The attributes LlamaDecoder reads from a transformers model (model.layers[i].self_attn.q_proj, ...),
    holding the rank's parts of the projections; the model itself is left as it is. A model whose layers
    were split while loading (SHARDED) gives its own."""
    backbone = hf_model.model
    presplit = getattr(hf_model, SHARDED, None) is not None
    layers = []
    for layer in backbone.layers:
        parts = _own_parts(layer) if presplit else layer_parts(layer, spec, plan)
        attention = SimpleNamespace(**{name: parts[f"self_attn.{name}"] for name in ATTENTION},
                                    q_norm=getattr(layer.self_attn, "q_norm", None),
                                    k_norm=getattr(layer.self_attn, "k_norm", None))  # fmt: skip
        feed_forward = SimpleNamespace(**{name: parts[f"mlp.{name}"] for name in MLP})
        layers.append(SimpleNamespace(self_attn=attention, mlp=feed_forward, input_layernorm=layer.input_layernorm,
                                      post_attention_layernorm=layer.post_attention_layernorm))  # fmt: skip
    local = SimpleNamespace(embed_tokens=backbone.embed_tokens, layers=layers, norm=backbone.norm)
    return SimpleNamespace(model=local, lm_head=_vocabulary_rows(hf_model.lm_head, plan))


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def layer_parts(layer: nn.Module, spec: ModelSpec, plan: ShardPlan) -> dict[str, nn.Module]:
    """The rank's part of each projection of a decoder layer, by its path in the layer."""
    attn, mlp, dim = layer.self_attn, layer.mlp, spec.head_dim
    heads = slice(plan.heads.start * dim, plan.heads.stop * dim)
    kv = slice(plan.kv_heads.start * dim, plan.kv_heads.stop * dim)
    return {
        "self_attn.q_proj": _rows(attn.q_proj, heads), "self_attn.k_proj": _rows(attn.k_proj, kv),
        "self_attn.v_proj": _rows(attn.v_proj, kv), "self_attn.o_proj": _columns(attn.o_proj, heads, plan.rank),
        "mlp.gate_proj": _rows(mlp.gate_proj, plan.columns), "mlp.up_proj": _rows(mlp.up_proj, plan.columns),
        "mlp.down_proj": _columns(mlp.down_proj, plan.columns, plan.rank),
    }  # fmt: skip


def split_layer(layer: nn.Module, spec: ModelSpec, plan: ShardPlan) -> None:
    """While loading: the layer's projections replaced by the rank's parts, the whole ones let go."""
    for path, part in layer_parts(layer, spec, plan).items():
        parent, _, child = path.rpartition(".")
        setattr(layer.get_submodule(parent), child, part)
    return_freed_memory()


class LayerSplitter:
    """For a loader: splits each layer to the rank's parts once all its tensors are read, so that the
    rank holds the whole of at most one projection at a time; the model is then marked SHARDED."""

    def __init__(self, model: nn.Module, config: Any, parallel: TensorParallel) -> None:
        self.model = model
        self.spec = model_spec(config, type(model).__name__)
        self.plan = shard_plan(self.spec, parallel.size, parallel.rank)
        self.split: set[int] = set()

    def layer_read(self, index: int) -> None:
        """A tensor of layer `index` was set: the layer is split if it is complete."""
        layer = self.model.model.layers[index]
        if index not in self.split and not any(p.is_meta for p in layer.parameters()):
            split_layer(layer, self.spec, self.plan)
            self.split.add(index)

    def finish(self, source: Any) -> None:
        unsplit = sorted(set(range(self.spec.num_layers)) - self.split)
        if unsplit:
            raise ValueError(f"{source}: layers {unsplit} were not read whole")
        setattr(self.model, SHARDED, self.plan)


def _own_parts(layer: nn.Module) -> dict[str, nn.Module]:
    return {f"self_attn.{n}": getattr(layer.self_attn, n) for n in ATTENTION} | {
        f"mlp.{n}": getattr(layer.mlp, n) for n in MLP
    }


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _split(module: nn.Module) -> None:
    if not (is_plain_linear(module) or is_quantized_linear(module)):
        raise ValueError(
            f"tensor_parallel splits nn.Linear projections and xpu_coopt's quantized ones, not "
            f"{type(module).__name__}"
        )


def _rows(module: nn.Module, rows: slice) -> nn.Module:
    """Column-parallel: the output features `rows`, copied (a backend may keep them beside its packed
    weight: a view would keep the whole matrix alive)."""
    _split(module)
    bias = None if module.bias is None else module.bias.detach()[rows].clone()
    if is_quantized_linear(module):
        return QuantizedLinear(module.quantized_weight.rows(rows).clone(), bias)
    return _linear(module.weight.detach()[rows].clone(), bias)


def _columns(module: nn.Module, columns: slice, rank: int) -> nn.Module:
    """Row-parallel: the input features `columns` (copied: a column slice is not contiguous); rank 0 adds
    the bias, once."""
    _split(module)
    bias = module.bias.detach() if module.bias is not None and rank == 0 else None
    if is_quantized_linear(module):
        return QuantizedLinear(
            module.quantized_weight.columns(columns.start, columns.stop).contiguous(), bias
        )
    return _linear(module.weight.detach()[:, columns].contiguous(), bias)


def _vocabulary_rows(module: nn.Module, plan: ShardPlan) -> nn.Module:
    """The LM head's rows of the rank's vocabulary slice, zero rows appended up to plan.vocab_rows."""
    _split(module)
    missing = plan.vocab_rows - (plan.vocab.stop - plan.vocab.start)
    bias = None
    if module.bias is not None:
        bias = torch.cat([module.bias.detach()[plan.vocab], module.bias.new_zeros(missing)])
    if is_quantized_linear(module):
        if missing:
            raise ValueError(f"a quantized LM head splits only where the ranks divide its vocabulary "
                             f"({module.out_features})")  # fmt: skip
        return QuantizedLinear(module.quantized_weight.rows(plan.vocab).clone(), bias)
    weight = module.weight.detach()[plan.vocab].clone()  # its own rows: the whole head may go (inplace)
    if missing:
        weight = torch.cat([weight, weight.new_zeros(missing, weight.shape[1])])
    return _linear(weight, bias)


def release_whole_projections(hf_model: nn.Module) -> None:
    """inplace=True: the model's own projections go (meta tensors, shapes kept), so a rank holds its part
    only. Embeddings and norms stay: every rank reads them whole (an LM head tied to the embeddings too)."""
    embeddings = getattr(hf_model.model.embed_tokens, "weight", None)  # none where it is quantized
    for _, module in projection_modules(hf_model):
        if is_quantized_linear(module):
            module.release()
        elif module.weight is not embeddings:
            module.weight = nn.Parameter(module.weight.detach().to("meta"), requires_grad=False)
    return_freed_memory()
