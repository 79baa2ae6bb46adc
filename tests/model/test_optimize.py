"""optimize() and generate(): bad input gets a clear error; the user's model stays unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import left_padded_prompts, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

import xpu_coopt
from xpu_coopt.backends.cpu import gemm as cpu_gemm


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama-gqa-8q2kv-d64")


@pytest.fixture(scope="module")
def optimized(model):
    return xpu_coopt.optimize(model)


def test_unsupported_architecture_names_what_is_supported():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        xpu_coopt.optimize(gpt2)


def test_not_a_model():
    with pytest.raises(TypeError, match="transformers causal LM"):
        xpu_coopt.optimize("meta-llama/Llama-2-7b-hf")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kv_dtype="int4"), "unknown kv_dtype 'int4'"),
        (dict(backend="cudnn"), "unknown backend 'cudnn'"),
        (dict(kv_cache="blocks"), "unknown kv_cache 'blocks'; choose one of segment, paged"),
        (dict(dtype=torch.int8), "dtype torch.int8 is not supported"),
    ],
)
def test_bad_options(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        xpu_coopt.optimize(model, **kwargs)


def test_a_dtype_given_by_name_is_an_error_naming_the_torch_dtype(model):
    with pytest.raises(TypeError, match=r"dtype takes a torch.dtype \(torch.bfloat16, for example\)"):
        xpu_coopt.optimize(model, dtype="bfloat16")


@pytest.mark.parametrize(
    ("offload", "devices"),
    [(lambda m: m.model.layers[1].to("meta"), "cpu, meta"), (lambda m: m.to("meta"), "meta")],
)
def test_a_model_offloaded_or_split_over_devices_is_an_error(offload, devices):
    """As device_map="auto" can leave a model: layers offloaded (meta placeholders), weights on several
    devices."""
    model = tiny_model("llama-mha-d64")
    offload(model)
    with pytest.raises(ValueError, match=f"in memory on one device; this model's are on {devices}: load it"):
        xpu_coopt.optimize(model)


def test_device_is_checked_as_ipex_llm_optimize_takes_it():
    model = tiny_model("llama-mha-d64")
    assert xpu_coopt.optimize(model, device="cpu").device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"optimize\(device='xpu'\) but the model's weights are on cpu"):
        xpu_coopt.optimize(model, device="xpu")


@pytest.mark.parametrize(
    ("name", "field", "value", "message"),
    [
        ("llama-mha-d64", "num_attention_heads", 8, r"[qk]_proj.weight has shape \(256, 256\), but the config gives \(\d+, 256\)"),
        ("llama-mha-d64", "num_hidden_layers", 1, "num_hidden_layers is 1, but the model holds 2 layers"),
        ("llama-mha-d64", "num_hidden_layers", 3, "num_hidden_layers is 3, but the model holds 2 layers"),
        ("llama-mha-d64", "hidden_size", 128, r"embed_tokens.weight has shape \(256, 256\).*hidden_size \(128\)"),
        ("llama-mha-d64", "vocab_size", 300, r"embed_tokens.weight has shape \(256, 256\).*vocab_size \(300\)"),
        ("llama-mha-d64", "intermediate_size", 100, r"gate_proj.weight has shape \(160, 256\)"),
        ("llama-gqa-8q2kv-d64", "num_key_value_heads", 4, r"k_proj.weight.*num_key_value_heads \* head_dim \(256\)"),
        ("qwen3-qk-norm", "head_dim", 32, r"q_norm.weight has shape \(64,\), but the config gives \(32,\)"),
    ],
)  # fmt: skip
def test_a_config_that_does_not_describe_the_weights_is_an_error(name, field, value, message):
    model = tiny_model(name)
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=message):
        xpu_coopt.optimize(model)


def test_unsupported_rope_type():
    model = tiny_model("llama-mha-d64")
    model.config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="rope type 'longrope' is not supported"):
        xpu_coopt.optimize(model)


def test_optimize_leaves_the_model_unchanged(model):
    before = {name: (p.data_ptr(), p.dtype, p.clone()) for name, p in model.state_dict().items()}
    xpu_coopt.optimize(model, dtype=torch.bfloat16)
    after = model.state_dict()
    for name, (pointer, dtype, values) in before.items():
        assert after[name].data_ptr() == pointer and after[name].dtype == dtype
        assert torch.equal(after[name], values)


def test_optimize_shares_weights_without_copying(model):
    optimized = xpu_coopt.optimize(model)
    layer = model.model.layers[0]
    assert optimized.decoder.embed_tokens.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert optimized.decoder.layers[0].o_proj.weight.data_ptr() == layer.self_attn.o_proj.weight.data_ptr()
    assert optimized.decoder.layers[0].down_proj.weight.data_ptr() == layer.mlp.down_proj.weight.data_ptr()


def test_weight_bytes_count_the_shared_weights_once_and_the_packed_copies_in_full():
    model = tiny_model("llama-gqa-8q2kv-d64", torch.bfloat16)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = model.model.layers
    fused = sum(  # the q/k/v and gate/up matrices: always xpu_coopt's own (packed) copies
        m.weight.numel() * 2
        for layer in layers
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                  layer.mlp.up_proj)
    )  # fmt: skip
    shared = model.lm_head.weight.numel() * 2 + sum(
        (layer.self_attn.o_proj.weight.numel() + layer.mlp.down_proj.weight.numel()) * 2 for layer in layers
    )
    assert xpu_coopt.optimize(model).weight_bytes() == model_bytes + fused
    unpackable = cpu_gemm.why_not_packable(torch.device("cpu"), torch.bfloat16)
    if unpackable:
        pytest.skip(f"the packed copies' bytes: pack_shared_weights=True cannot run here: {unpackable}")
    packed = xpu_coopt.optimize(model, pack_shared_weights=True)
    assert packed.weight_bytes() == model_bytes + fused + shared
    for name, values in model.state_dict().items():  # the packed copies leave transformers' weights alone
        assert torch.equal(values, before[name])


def test_pack_shared_weights_needs_a_bfloat16_cpu_model(model):
    with pytest.raises(
        ValueError, match=r"packs bfloat16 weights for oneDNN.s CPU GEMMs; this model runs in torch\.float32"
    ):
        xpu_coopt.optimize(model, pack_shared_weights=True)


def test_pack_shared_weights_needs_a_cpu_with_bfloat16_gemms(monkeypatch):
    """An AVX2-only CPU: pack_shared_weights=True is an error naming it, and the default leaves every
    weight plain, so generation still matches transformers."""
    monkeypatch.setattr(cpu_gemm, "_cpu_has_bfloat16_gemms", lambda: False)
    model = tiny_model("llama-gqa-8q2kv-d64", torch.bfloat16)
    with pytest.raises(ValueError, match="oneDNN has no bfloat16 GEMMs on this CPU"):
        xpu_coopt.optimize(model, pack_shared_weights=True)
    optimized = xpu_coopt.optimize(model)
    layer = optimized.decoder.layers[0]
    assert not any(isinstance(linear.weight, cpu_gemm.PackedWeight) for linear in (layer.qkv, layer.o_proj))
    ids, mask = left_padded_prompts([3, 6], model.config.vocab_size)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(
        optimized.generate(ids, mask, **kwargs), model.generate(ids, attention_mask=mask, **kwargs)
    )


def test_inplace_makes_projection_weights_views_of_the_fused_matrices():
    model = tiny_model("llama-mha-d64")
    ids, _ = left_padded_prompts([5], model.config.vocab_size)
    reference = model(ids).logits
    optimized = xpu_coopt.optimize(model, inplace=True)
    fused = optimized.decoder.layers[1].qkv.weight
    k_proj = model.model.layers[1].self_attn.k_proj.weight
    assert k_proj.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    torch.testing.assert_close(model(ids).logits, reference, atol=0, rtol=0)  # transformers still works


class ScaledLinear(torch.nn.Linear):  # stands in for a quantized Linear: a subclass with its own math
    def forward(self, x):
        return super().forward(x) * 0.5


def _with_scaled_q_proj(model):
    attention = model.model.layers[0].self_attn
    replacement = ScaledLinear(attention.q_proj.in_features, attention.q_proj.out_features, bias=False)
    replacement.weight = attention.q_proj.weight
    attention.q_proj = replacement
    return model


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_non_plain_linear_modules_are_called_not_fused(backend):
    model = _with_scaled_q_proj(tiny_model("llama-mha-d64"))
    ids, _ = left_padded_prompts([6], model.config.vocab_size)
    with pytest.warns(
        UserWarning,
        match=r"1 of the model's \d+ projections are not plain torch.nn.Linear \(ScaledLinear; "
        r"e.g. model.layers.0.self_attn.q_proj\): .*run unfused",
    ):
        optimized = xpu_coopt.optimize(model, backend=backend)
    assert optimized.decoder.layers[0].qkv.modules is not None
    assert optimized.decoder.fusions is None  # Triton's fused GEMMs take plain weights: every layer unfused
    torch.testing.assert_close(optimized(ids).logits, model(ids).logits, atol=2e-5, rtol=2e-5)


def test_plain_linear_modules_give_no_warning():
    model = tiny_model("llama-mha-d64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xpu_coopt.optimize(model)


def test_non_plain_modules_in_another_dtype_than_the_compute_dtype_are_an_error_unless_inplace():
    """xpu_coopt converts the weights it reads, not those of modules it calls as they are: such a module
    in float32 under optimize(dtype=bfloat16) would fail at the first generate()."""
    model = _with_scaled_q_proj(tiny_model("llama-mha-d64"))
    message = r"q_proj \(ScaledLinear, torch.float32\).*model.to\(torch.bfloat16\)\) or pass inplace=True"
    with pytest.raises(ValueError, match=message):
        xpu_coopt.optimize(model, dtype=torch.bfloat16)
    ids, _ = left_padded_prompts([6], model.config.vocab_size)
    with pytest.warns(UserWarning, match="not plain torch.nn.Linear"):
        optimized = xpu_coopt.optimize(model, dtype=torch.bfloat16, inplace=True)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(optimized(ids).logits, model(ids).logits, atol=2e-2, rtol=2e-2)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert optimized.generate(ids, **kwargs).shape == (1, ids.shape[1] + 4)


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda: (torch.zeros((1, 0), dtype=torch.long), None), "empty prompt"),
        (
            lambda: (torch.ones((2, 3), dtype=torch.long), torch.ones((2, 4))),
            "does not match input_ids shape",
        ),
        (lambda: (torch.ones((1, 3), dtype=torch.long), torch.tensor([[1, 1, 0]])), "left-padded"),
        (lambda: (torch.ones((1, 3), dtype=torch.long), torch.tensor([[0, 0, 0]])), "empty prompt"),
        (lambda: (torch.ones(3, dtype=torch.long), None), "2-D tensor"),
        (lambda: (torch.full((1, 3), 10_000), None), "outside the vocabulary"),
    ],
)
def test_bad_prompts(optimized, make_input, message):
    ids, mask = make_input()
    with pytest.raises(ValueError, match=message):
        optimized.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_labels_of_another_shape_or_with_a_cache_are_an_error(optimized):
    ids, _ = left_padded_prompts([6], 256)
    with pytest.raises(ValueError, match=r"labels must have input_ids' shape \(1, 6\), got \(1, 5\)"):
        optimized(ids, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="labels are scored over the whole prompt"):
        optimized(ids, labels=ids, logits_to_keep=1)
    cache = optimized(ids).cache
    with pytest.raises(ValueError, match="labels are scored over the whole prompt"):
        optimized(ids[:, :1], cache=cache, labels=ids[:, :1])


def test_eval_is_a_no_op_and_moving_an_optimized_model_is_a_clear_error(optimized):
    assert optimized.eval() is optimized and not optimized.training
    for move in (
        lambda: optimized.to("cpu"),
        optimized.cuda,
        optimized.half,
        optimized.double,
        lambda: optimized.type(torch.float16),
        lambda: optimized.to(torch.float16),
    ):
        with pytest.raises(ValueError, match="move or convert the transformers model"):
            move()
    with pytest.raises(ValueError, match="an optimized model only infers"):
        optimized.train()


def test_an_optimized_model_is_a_module_over_the_model_it_leaves_alone():
    """An nn.Module (code written for a transformers model's object takes it), whose submodule is the
    model it was made of; its eval() does not reach into that model, whose mode stays the caller's."""
    model = tiny_model("llama-mha-d64").train()
    optimized = xpu_coopt.optimize(model)
    assert isinstance(optimized, torch.nn.Module) and optimized.hf_model is model
    assert list(optimized.parameters()) == list(model.parameters())
    assert optimized.eval() is optimized and model.training
    assert optimized.can_generate()
    with pytest.raises(TypeError, match=r"optimized already: optimize\(\) takes the transformers model"):
        xpu_coopt.optimize(optimized)


def test_decode_with_the_wrong_shape_is_an_error(optimized):
    ids, _ = left_padded_prompts([4, 4], 256)
    out = optimized(ids)
    with pytest.raises(ValueError, match=r"decode takes input_ids of shape \(2, 1\)"):
        optimized(torch.ones((3, 1), dtype=torch.long), cache=out.cache)


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_kv_cache_stays_close_to_the_16_bit_cache(model, kv_dtype):
    ids, mask = left_padded_prompts([9, 6], 256, seed=5)
    full = xpu_coopt.optimize(model)
    quantized = xpu_coopt.optimize(model, kv_dtype=kv_dtype)
    logits_full, cache_full = full.prefill(ids, mask, max_new_tokens=4)
    _, cache_q = quantized.prefill(ids, mask, max_new_tokens=4)
    tokens = logits_full.argmax(-1)
    for _ in range(3):
        step_full, step_q = full.decode(tokens, cache_full), quantized.decode(tokens, cache_q)
        relative = (step_full - step_q).abs().max() / step_full.abs().max()
        assert relative < (0.05 if kv_dtype == "fp8_e4m3" else 0.1)
        tokens = step_full.argmax(-1)
    assert cache_q.nbytes() < 0.6 * cache_full.nbytes()


class DropoutAdapter(torch.nn.Module):
    """A LoRA-style wrapper: the base projection plus a low-rank update behind dropout."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dropout = torch.nn.Dropout(0.5)
        self.down = torch.nn.Linear(base.in_features, 4, bias=False)
        self.up = torch.nn.Linear(4, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(self.dropout(x)))


def test_wrapped_layers_infer_in_eval_mode_and_keep_the_users_mode():
    """A model left in train mode: xpu_coopt's calls run the adapters' dropout as eval() would (not at
    all), as an inference library must, and hand the model back in train mode."""
    model = tiny_model("llama-mha-d64")
    for layer in model.model.layers:
        layer.self_attn.v_proj = DropoutAdapter(layer.self_attn.v_proj)
    ids, _ = left_padded_prompts([6], model.config.vocab_size)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.eval().generate(ids, **kwargs)
    model.train()
    with pytest.warns(UserWarning, match="not plain torch.nn.Linear"):
        optimized = xpu_coopt.optimize(model)
    for _ in range(3):
        assert torch.equal(optimized.generate(ids, **kwargs), expected)
    assert all(module.training for module in model.modules())
