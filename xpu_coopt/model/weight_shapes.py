"""The weights' shapes against the config: xpu_coopt sizes every kernel and the KV cache from the config,
so a config that does not describe the weights (an edited field, a mismatched checkpoint) is refused at
optimize(), naming the tensor, rather than failing or silently computing something else at generate()."""

from __future__ import annotations

from torch import nn

from xpu_coopt.model.spec import ModelSpec

# (module path within a layer, config fields of its [out, in] shape)
LAYER_PROJECTIONS = (
    ("self_attn.q_proj", "num_attention_heads * head_dim", "hidden_size"),
    ("self_attn.k_proj", "num_key_value_heads * head_dim", "hidden_size"),
    ("self_attn.v_proj", "num_key_value_heads * head_dim", "hidden_size"),
    ("self_attn.o_proj", "hidden_size", "num_attention_heads * head_dim"),
    ("mlp.gate_proj", "intermediate_size", "hidden_size"),
    ("mlp.up_proj", "intermediate_size", "hidden_size"),
    ("mlp.down_proj", "hidden_size", "intermediate_size"),
)


def _field_values(spec: ModelSpec) -> dict[str, int]:
    return {
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads * head_dim": spec.num_heads * spec.head_dim,
        "num_key_value_heads * head_dim": spec.num_kv_heads * spec.head_dim,
        "vocab_size": spec.vocab_size,
        "head_dim": spec.head_dim,
    }


def check_weights_match_config(model: nn.Module, spec: ModelSpec) -> None:
    """ValueError naming the first weight whose shape the config does not give, or a layer count that
    differs from num_hidden_layers."""
    layers = model.model.layers
    if len(layers) != spec.num_layers:
        raise ValueError(
            f"config.num_hidden_layers is {spec.num_layers}, but the model holds {len(layers)} layers "
            "(model.layers): the config does not describe these weights"
        )
    for name, actual, fields in _shapes(model, spec):
        values = _field_values(spec)
        expected = tuple(values[field] for field in fields)
        if actual != expected:
            described = " x ".join(f"{field} ({values[field]})" for field in fields)
            raise ValueError(
                f"{name} has shape {actual}, but the config gives {expected}: {described}; the config "
                f"does not describe these weights (spec: {spec.num_heads} heads, {spec.num_kv_heads} K/V "
                f"heads of head_dim {spec.head_dim})"
            )


def _shapes(model: nn.Module, spec: ModelSpec):
    """(name, shape, the config fields that give it) of every weight the decoder reads."""
    backbone = model.model
    embeddings = backbone.embed_tokens
    shape = tuple(embeddings.weight.shape) if hasattr(embeddings, "weight") else _projection_shape(embeddings)
    yield "model.embed_tokens.weight", shape, ("vocab_size", "hidden_size")
    for index, layer in enumerate(backbone.layers):
        prefix = f"model.layers.{index}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{prefix}.{norm}.weight", tuple(getattr(layer, norm).weight.shape), ("hidden_size",)
        if spec.query_key_norm:
            for norm in ("q_norm", "k_norm"):
                yield f"{prefix}.self_attn.{norm}.weight", tuple(getattr(layer.self_attn, norm).weight.shape), ("head_dim",)  # fmt: skip
        for path, rows, columns in LAYER_PROJECTIONS:
            shape = _projection_shape(layer.get_submodule(path))
            if shape is not None:
                yield f"{prefix}.{path}.weight", shape, (rows, columns)
    yield "model.norm.weight", tuple(backbone.norm.weight.shape), ("hidden_size",)
    shape = _projection_shape(model.lm_head)
    if shape is not None:
        yield "lm_head.weight", shape, ("vocab_size", "hidden_size")


def _projection_shape(module: nn.Module) -> tuple[int, int] | None:
    """[out, in] of a projection: a Linear's weight, or the out/in features a wrapper (an adapter, a
    quantized layer) declares; None where it declares neither."""
    out_features = getattr(module, "out_features", None)
    in_features = getattr(module, "in_features", None)
    if isinstance(out_features, int) and isinstance(in_features, int):
        return out_features, in_features
    return None
