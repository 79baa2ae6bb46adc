"""Opt-GQA: restructure a model's attention into grouped-query attention with fewer K/V heads.

Each new K/V head is the mean of a group of the original K/V heads' projections (Ainslie et al., 2023,
"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints", without their
uptraining). Two ways to choose the groups:

- "mean": consecutive heads, as the paper does (new head n pools original heads n*r .. n*r + r - 1).
- "similarity": heads whose K and V outputs are closest on a calibration text are pooled together. Query
  heads follow their K/V head: q_proj's rows and o_proj's columns are permuted so each group's query heads
  are consecutive, which leaves the function unchanged before pooling.

The result is a new transformers model built from the edited config and weights (never by poking
transformers' module attributes), so save_pretrained() writes a checkpoint transformers and xpu_coopt load.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn

from xpu_coopt.model.spec import model_spec

GROUPINGS = ("mean", "similarity")
# Exhaustive search over equal-size partitions up to this many; beyond it, a greedy grouping.
MAX_PARTITIONS = 20000


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if layers is None or not all(
        isinstance(getattr(getattr(layer, "self_attn", None), name, None), nn.Linear)
        for layer in layers
        for name in names
    ):
        raise ValueError(
            "convert_to_gqa needs a LLaMA-family model whose layers hold self_attn.q_proj/k_proj/v_proj/o_proj "
            f"nn.Linear weights; {type(model).__name__} has none to convert"
        )
    return [layer.self_attn for layer in layers]


def _partitions(items: tuple[int, ...], size: int):
    """Every split of `items` into groups of `size` (groups and members in increasing order)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        remaining = tuple(i for i in rest if i not in others)
        for tail in _partitions(remaining, size):
            yield [(first, *others), *tail]


def _partition_count(n: int, size: int) -> int:
    count = 1
    while n:
        count *= len(list(itertools.combinations(range(n - 1), size - 1)))
        n -= size
    return count


def similarity_groups(distance: torch.Tensor, size: int) -> list[tuple[int, ...]]:
    """Groups of `size` heads minimising the summed pairwise distance inside groups.

    distance: [n, n] symmetric. Exact for small n (every partition is tried), greedy beyond MAX_PARTITIONS:
    each group starts from the lowest unassigned head and takes its nearest unassigned heads.
    """
    n = distance.shape[0]

    def cost(groups) -> float:
        return sum(float(distance[a, b]) for group in groups for a, b in itertools.combinations(group, 2))

    if _partition_count(n, size) <= MAX_PARTITIONS:
        return min(_partitions(tuple(range(n)), size), key=cost)
    free, groups = list(range(n)), []
    while free:
        seed = free.pop(0)
        nearest = sorted(free, key=lambda j: float(distance[seed, j]))[: size - 1]
        groups.append(tuple(sorted((seed, *nearest))))
        free = [j for j in free if j not in nearest]
    return groups


@torch.inference_mode()
def _head_distances(model: nn.Module, attentions: list[nn.Module], calibration: torch.Tensor, kv_heads: int,
                    head_dim: int) -> list[torch.Tensor]:  # fmt: skip
    """Per layer [kv_heads, kv_heads]: mean squared distance between heads' K outputs plus V outputs, each
    normalised by that projection's mean square so neither dominates."""
    outputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for index, attention in enumerate(attentions):
        for name in ("k_proj", "v_proj"):

            def record(module, inputs, output, key=(index, name)):
                outputs.setdefault(key, []).append(output.detach().float().reshape(-1, kv_heads, head_dim))

            hooks.append(getattr(attention, name).register_forward_hook(record))
    try:
        device = next(model.parameters()).device
        for window in calibration:
            model(input_ids=window[None].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    distances = []
    for index in range(len(attentions)):
        total = torch.zeros(kv_heads, kv_heads)
        for name in ("k_proj", "v_proj"):
            x = torch.cat(outputs[(index, name)]).transpose(0, 1).reshape(kv_heads, -1).cpu()  # [heads, N*D]
            total += torch.cdist(x, x).pow(2) / x.shape[1] / x.pow(2).mean().clamp_min(1e-12)
        distances.append(total)
    return distances


def _rows(weight: torch.Tensor, heads: list[int], head_dim: int) -> torch.Tensor:
    """The rows of `weight` ([heads * head_dim, ...]) of the given heads, in that order."""
    return weight.view(-1, head_dim, *weight.shape[1:])[heads].reshape(-1, *weight.shape[1:])


def _pooled(weight: torch.Tensor, groups: list[tuple[int, ...]], head_dim: int) -> torch.Tensor:
    heads = weight.view(-1, head_dim, *weight.shape[1:]).float()
    merged = [heads[list(group)].mean(dim=0) for group in groups]
    return torch.cat(merged).to(weight.dtype)


def convert_to_gqa(
    model: nn.Module,
    num_key_value_heads: int,
    grouping: str = "mean",
    calibration: torch.Tensor | None = None,
) -> nn.Module:
    """A new model whose attention has `num_key_value_heads` K/V heads, each the mean of a group of the
    original ones; `model` is left unchanged.

    grouping: "mean" pools consecutive heads; "similarity" pools the heads closest on `calibration`
    (token windows [N, P], required for it) and reorders query heads to match.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
    attentions = _attention_modules(model)
    config = getattr(model, "config", None)
    spec = model_spec(config, type(model).__name__)
    heads, old_kv, head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if num_key_value_heads < 1 or old_kv % num_key_value_heads:
        raise ValueError(
            f"num_key_value_heads={num_key_value_heads} must divide the model's {old_kv} K/V heads "
            f"(and so its {heads} query heads): choose one of "
            f"{[n for n in range(1, old_kv + 1) if old_kv % n == 0]}"
        )
    size = old_kv // num_key_value_heads
    consecutive = [tuple(range(n * size, (n + 1) * size)) for n in range(num_key_value_heads)]
    if grouping == "similarity":
        if calibration is None or calibration.dim() != 2 or calibration.numel() == 0:
            raise ValueError("grouping='similarity' needs calibration token windows [N, P]")
        distances = _head_distances(model, attentions, calibration, old_kv, head_dim)
        layer_groups = [similarity_groups(distance, size) for distance in distances]
    else:
        layer_groups = [consecutive] * len(attentions)

    state = _regrouped_state(model, attentions, layer_groups, heads // old_kv, head_dim)
    new_config = copy.deepcopy(config)
    new_config.num_key_value_heads = num_key_value_heads
    new_config.xpu_coopt_gqa = {"from_kv_heads": old_kv, "grouping": grouping,
                                "groups": [[list(g) for g in groups] for groups in layer_groups]}  # fmt: skip
    return _model_like(model, new_config, state)


def _regrouped_state(
    model: nn.Module, attentions: list[nn.Module], layer_groups: list, group: int, head_dim: int
) -> dict[str, torch.Tensor]:
    """The model's weights with each layer's K/V heads pooled by its groups, and its query heads (and the
    o_proj columns they feed) reordered so that each group's stay together; group: query heads per
    original K/V head."""
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    for attention, groups in zip(attentions, layer_groups, strict=True):
        prefix = _module_name(model, attention)
        order = [kv for g in groups for kv in g]  # original K/V heads in their new order
        query_heads = [kv * group + j for kv in order for j in range(group)]
        if order != sorted(order):  # move each group's query heads together; the function is unchanged
            for suffix in ("q_proj.weight", "q_proj.bias"):
                if f"{prefix}.{suffix}" in state:
                    state[f"{prefix}.{suffix}"] = _rows(state[f"{prefix}.{suffix}"], query_heads, head_dim)
            o_proj = state[f"{prefix}.o_proj.weight"]
            state[f"{prefix}.o_proj.weight"] = _rows(o_proj.T, query_heads, head_dim).T.contiguous()
        for suffix in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            if f"{prefix}.{suffix}" in state:
                state[f"{prefix}.{suffix}"] = _pooled(state[f"{prefix}.{suffix}"], groups, head_dim)
    return state


def _model_like(model: nn.Module, config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of `model`'s class, dtype, device and generation_config, built from `config` and `state`."""
    dtype = next(model.parameters()).dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        converted = type(model)(config)
    finally:
        torch.set_default_dtype(previous)
    converted.load_state_dict(state)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        converted.generation_config = copy.deepcopy(generation_config)
    return converted.to(next(model.parameters()).device).eval()


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError("attention module not found in the model")
