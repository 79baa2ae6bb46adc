"""What xpu_coopt reads from a Hugging Face config: one frozen dataclass, built from config fields only.

Reading plain fields (not transformers' module classes or call signatures) is what keeps xpu_coopt
working across transformers releases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "SmolLM3ForCausalLM",
)
# Architectures whose attention RMS-normalizes each head's query and key (weights [head_dim]) before rope.
QUERY_KEY_NORM_ARCHITECTURES = ("Qwen3ForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 and yarn: the context the model was pretrained for
    original_max_position_embeddings: int = 8192
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn only: the ramp between extrapolated and interpolated frequencies, and the factor cos and sin
    # are scaled by (transformers' attention_scaling)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    tie_word_embeddings: bool
    # Each layer's sliding window (its queries attend to their last `window` keys), None for full attention.
    layer_windows: tuple[int | None, ...]
    # Whether each layer rotates its queries and keys (SmolLM3 leaves every fourth layer without positions).
    layer_rope: tuple[bool, ...]
    # Qwen3: each head's query and key RMS-normalized (over head_dim, with the layer's q_norm and k_norm
    # weights) before rope.
    query_key_norm: bool

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def kv_bytes_per_token(self, element_bytes: float) -> float:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_bytes


def _rope(config: Any) -> RopeSpec:
    # transformers 5 keeps rope settings in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`.
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; xpu_coopt supports {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    # As transformers standardises rope parameters: a config-level field first, else the model's context.
    original_context = int(
        getattr(config, "original_max_position_embeddings", None)
        or params.get("original_max_position_embeddings")
        or config.max_position_embeddings
    )
    factor = params.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original_context if rope_type == "yarn" else 1.0
    factor = float(factor)
    return RopeSpec(
        theta=float(theta),
        rope_type=rope_type,
        factor=factor,
        original_max_position_embeddings=original_context,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)),
        attention_factor=_yarn_attention_factor(params, factor) if rope_type == "yarn" else 1.0,
    )


def _yarn_attention_factor(params: dict[str, Any], factor: float) -> float:
    """YaRN's scale of cos and sin (its "mscale"): given, or 0.1 ln(factor) + 1 (as the paper suggests), or
    DeepSeek's ratio of two such scales where mscale and mscale_all_dim are given."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    return mscale(factor)


def _layer_windows(config: Any, architecture: str, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), where transformers' modeling of the
    architecture applies one: Mistral on every layer; Qwen2, Qwen3 and SmolLM3 only with
    use_sliding_window, on the layers their layer_types name (Qwen2's and Qwen3's by default from
    max_window_layers on, SmolLM3's its layers without rope); Llama never."""
    window = getattr(config, "sliding_window", None)
    if architecture == "LlamaForCausalLM" or window is None:
        return (None,) * num_layers
    if int(window) < 1:
        raise ValueError(f"sliding_window must be at least 1 (or None), not {window}")
    if architecture == "MistralForCausalLM":  # its modeling ignores layer_types
        return (int(window),) * num_layers
    layer_types = getattr(config, "layer_types", None) or [
        "sliding_attention" if layer >= config.max_window_layers else "full_attention"
        for layer in range(num_layers)
    ]
    if len(layer_types) != num_layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(
            f"layer_types must name 'sliding_attention' or 'full_attention' for each of the {num_layers} "
            f"layers, not {layer_types}"
        )
    if not getattr(config, "use_sliding_window", False):
        # Qwen2's config drops the window then; SmolLM3's keeps it, and transformers' attention functions
        # disagree on it (the eager and SDPA masks apply it to the sliding layers, flash attention not).
        if "sliding_attention" in layer_types and architecture == "SmolLM3ForCausalLM":
            raise ValueError(
                "layer_types names sliding_attention layers while use_sliding_window is False: set "
                "use_sliding_window=True to apply the window, or sliding_window=None"
            )
        return (None,) * num_layers
    return tuple(int(window) if kind == "sliding_attention" else None for kind in layer_types)


def _layer_rope(config: Any, architecture: str, num_layers: int) -> tuple[bool, ...]:
    """SmolLM3's no_rope_layers (1: the layer rotates, 0: it does not); every layer elsewhere."""
    flags = getattr(config, "no_rope_layers", None)
    if architecture != "SmolLM3ForCausalLM" or flags is None:
        return (True,) * num_layers
    if len(flags) < num_layers or not set(flags) <= {0, 1}:
        raise ValueError(
            f"no_rope_layers must hold a 0 or 1 for each of the {num_layers} layers, not {flags}"
        )
    return tuple(bool(flag) for flag in flags[:num_layers])


def model_spec(config: Any, architecture: str) -> ModelSpec:
    """Reads a ModelSpec from a transformers config; ValueError naming what is unsupported.

    architecture: the model's class name (configs built in code carry no `architectures` list).
    """
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {architecture} is not supported; xpu_coopt supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; the LLaMA family uses 'silu'")
    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
        )
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    num_layers = int(config.num_hidden_layers)
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even for rotary embeddings")
    return ModelSpec(
        architecture=architecture,
        vocab_size=int(config.vocab_size),
        hidden_size=int(config.hidden_size),
        intermediate_size=int(config.intermediate_size),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.rms_norm_eps),
        max_position_embeddings=int(config.max_position_embeddings),
        rope=_rope(config),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        layer_windows=_layer_windows(config, architecture, num_layers),
        layer_rope=_layer_rope(config, architecture, num_layers),
        query_key_norm=architecture in QUERY_KEY_NORM_ARCHITECTURES,
    )
