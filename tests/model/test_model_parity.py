"""xpu_coopt against transformers itself on random-weight configs of every supported shape."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    COMMON,
    CONFIGS,
    LLAMA3_ROPE,
    SMOLLM3_TOKENS,
    TRANSFORMERS_MAJOR,
    YARN,
    check_prefill_and_decode,
    left_padded_prompts,
    needs_bfloat16_packing,
    rope_config,
    tiny_model,
    transformers_logits,
)
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

import xpu_coopt
from xpu_coopt.backends.cpu import gemm as cpu_gemm
from xpu_coopt.model.rope import inverse_frequencies
from xpu_coopt.model.spec import model_spec

LOSS_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("lengths", [[7, 3, 11], [9]], ids=["padded-batch", "one-row"])
def test_prefill_and_decode_logits(name, dtype, lengths):
    model = tiny_model(name, dtype)
    check_prefill_and_decode(model, xpu_coopt.optimize(model), lengths, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["llama-gqa-8q2kv-d64", "mistral-window", "qwen3-qk-norm"])
@pytest.mark.parametrize("lengths", [[7, 3, 11], [9]], ids=["padded-batch", "one-row"])
def test_the_loss_of_labels_is_transformers(name, dtype, lengths):
    """forward(labels=...): transformers' causal-LM loss, left padding and a column labelled -100
    (skipped). The labels are the tokens each position's logits favour, one position on (the loss's
    shift): random weights give every other token about the same loss."""
    model = tiny_model(name, dtype)
    ids, mask = left_padded_prompts(lengths, model.config.vocab_size)
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = transformers_logits(model, ids, mask)[:, :-1].argmax(-1)
    labels = labels.masked_fill(mask == 0, -100)
    labels[:, -3] = -100
    ours = xpu_coopt.optimize(model)(ids, mask, labels=labels).loss
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        theirs = model(ids, attention_mask=mask, position_ids=positions, labels=labels).loss
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.float(), rtol=LOSS_TOLERANCE[dtype], atol=0)


@needs_bfloat16_packing
@pytest.mark.parametrize("name", ["llama-gqa-8q2kv-d64", "llama-tied-bias", "qwen2-bias"])
@pytest.mark.parametrize("lengths", [[7, 3, 11], [9]], ids=["padded-batch", "one-row"])
def test_packed_shared_weights_keep_the_logits(name, lengths):
    """pack_shared_weights: o_proj, down_proj and the LM head (tied or biased too) run from packed copies
    on several rows, from the shared plain weights on one."""
    model = tiny_model(name, torch.bfloat16)
    optimized = xpu_coopt.optimize(model, pack_shared_weights=True)
    layer = optimized.decoder.layers[0]
    for linear in (layer.o_proj, layer.down_proj, optimized.decoder.lm_head):
        assert isinstance(linear.weight, cpu_gemm.PackedWeight)
    check_prefill_and_decode(model, optimized, lengths, torch.bfloat16)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        LLAMA3_ROPE,
        YARN,
        {**YARN, "truncate": False, "beta_fast": 16, "beta_slow": 2},
        {**YARN, "factor": None},  # from max_position_embeddings / original_max_position_embeddings
        {**YARN, "mscale": 0.8, "mscale_all_dim": 0.5},
        {**YARN, "attention_factor": 1.5},
        {**YARN, "original_max_position_embeddings": 1000, "rope_theta": 1_000_000.0},  # no interpolated dims
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ],
    ids=["default", "linear", "llama3", "yarn", "yarn-untruncated", "yarn-no-factor", "yarn-mscale",
         "yarn-attention-factor", "yarn-long-context", "dynamic"],
)  # fmt: skip
def test_rope_frequencies_and_scale_match_transformers(rope):
    """Inverse frequencies and the cos/sin scale of each rope type, against transformers' own functions."""
    if rope.get("factor", 1.0) is None and TRANSFORMERS_MAJOR < 5:
        pytest.skip("transformers 4 has no YaRN factor default: its yarn rope needs the factor in the config")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=512, num_attention_heads=4, **rope_config(rope), **COMMON)
    spec = model_spec(config, "LlamaForCausalLM")
    if rope["rope_type"] == "default":
        expected = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128))
        expected_scale = 1.0
    else:
        expected, expected_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    torch.testing.assert_close(inverse_frequencies(spec.rope, spec.head_dim), expected, rtol=1e-6, atol=0)
    assert spec.rope.attention_factor == pytest.approx(expected_scale, rel=1e-12)


SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=32, intermediate_size=32,
             num_hidden_layers=3)  # fmt: skip


SMOLLM3_SMALL = {**SMALL, **SMOLLM3_TOKENS, "no_rope_layer_interval": 3}  # layer 2 without rope
ARCHITECTURES = {
    LlamaConfig: LlamaForCausalLM, MistralConfig: MistralForCausalLM, Qwen2Config: Qwen2ForCausalLM,
    Qwen3Config: Qwen3ForCausalLM, SmolLM3Config: SmolLM3ForCausalLM,
}  # fmt: skip


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (Qwen2Config(**SMALL), (None, None, None)),  # a window size, but no use_sliding_window
        (Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, **SMALL), (None, 8, 8)),
        (Qwen2Config(use_sliding_window=True, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"], **SMALL), (8, None, 8)),
        (MistralConfig(sliding_window=8, **SMALL), (8, 8, 8)),
        (MistralConfig(sliding_window=None, **SMALL), (None, None, None)),
        (LlamaConfig(**SMALL), (None, None, None)),
        (Qwen3Config(use_sliding_window=True, sliding_window=8, max_window_layers=2, **SMALL), (None, None, 8)),
        (SmolLM3Config(sliding_window=8, **SMOLLM3_SMALL), (None, None, None)),
        (SmolLM3Config(use_sliding_window=True, sliding_window=8, **SMOLLM3_SMALL), (None, None, 8)),
        (SmolLM3Config(use_sliding_window=True, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention", "full_attention"], **SMOLLM3_SMALL),
         (8, None, None)),
    ],
    ids=["qwen2-off", "qwen2-max-window-layers", "qwen2-layer-types", "mistral", "mistral-none", "llama",
         "qwen3-max-window-layers", "smollm3-off", "smollm3-nope-layers", "smollm3-layer-types"],
)  # fmt: skip
def test_layer_windows_are_those_transformers_applies(config, expected):
    """Each layer's sliding window as transformers' modeling applies it (Qwen2's and SmolLM3's attention
    modules carry theirs; Mistral's reads the config's on every layer)."""
    cls = ARCHITECTURES[type(config)]
    assert model_spec(config, cls.__name__).layer_windows == expected
    if cls in (Qwen2ForCausalLM, Qwen3ForCausalLM, SmolLM3ForCausalLM):
        layers = cls(config).model.layers
        assert tuple(layer.self_attn.sliding_window for layer in layers) == expected


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (SmolLM3Config(**SMOLLM3_SMALL), (True, True, False)),
        (SmolLM3Config(**{**SMOLLM3_SMALL, "no_rope_layers": [0, 1, 1, 0]}), (False, True, True)),  # longer: allowed
        (LlamaConfig(**SMALL), (True, True, True)),
        (Qwen2Config(**SMALL), (True, True, True)),
    ],
    ids=["smollm3-interval", "smollm3-list", "llama", "qwen2"],
)  # fmt: skip
def test_layer_rope_is_that_transformers_applies(config, expected):
    cls = ARCHITECTURES[type(config)]
    assert model_spec(config, cls.__name__).layer_rope == expected
    if cls is SmolLM3ForCausalLM:
        layers = cls(config).model.layers
        assert tuple(bool(layer.self_attn.use_rope) for layer in layers) == expected


def test_a_layer_type_other_than_sliding_or_full_attention_is_an_error():
    config = Qwen2Config(use_sliding_window=True, sliding_window=8, **SMALL)
    config.layer_types = ["sliding_attention", "chunked_attention", "full_attention"]
    with pytest.raises(ValueError, match="layer_types must name 'sliding_attention' or 'full_attention'"):
        model_spec(config, "Qwen2ForCausalLM")


def test_smollm3_sliding_layers_without_use_sliding_window_are_an_error():
    """transformers' eager and SDPA masks would apply the window there, its flash attention not: ambiguous."""
    config = SmolLM3Config(sliding_window=8, **SMOLLM3_SMALL)
    config.layer_types = ["full_attention", "full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="use_sliding_window is False"):
        model_spec(config, "SmolLM3ForCausalLM")


@pytest.mark.parametrize("flags", [[1, 0], [1, 2, 1]], ids=["too-few", "not-a-flag"])
def test_bad_no_rope_layers_are_an_error(flags):
    config = SmolLM3Config(**SMOLLM3_SMALL)
    config.no_rope_layers = flags
    with pytest.raises(ValueError, match="no_rope_layers must hold a 0 or 1 for each of the 3 layers"):
        model_spec(config, "SmolLM3ForCausalLM")


SEARCHES = [
    dict(do_sample=False),
    dict(num_beams=3, num_return_sequences=2),
    dict(do_sample=True, top_k=0, temperature=0.8),
]
SEARCH_IDS = ["greedy", "beam3", "sampling"]
