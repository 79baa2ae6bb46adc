"""Accuracy: the perplexity harness, FP8 KV caches (dynamic and static scales) and MHA->GQA conversion."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import STORIES_MODEL, STORIES_TOKENIZER, TINYSTORIES_TEXT, require_data
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import xpu_coopt
from xpu_coopt.cli import main
from xpu_coopt.cli.perplexity import cached_perplexity, token_windows, tokenize, transformers_perplexity
from xpu_coopt.gqa import convert_to_gqa, similarity_groups
from xpu_coopt.kv_scales import SCALES_FILE, KVScales, calibrate_kv_scales
from xpu_coopt.ops import fp8

# Perplexity increase over the 16-bit (here float32) cache allowed on stories260K, TinyStories, 8 windows
# of 256 tokens. Measured: e4m3 +1.1%, e5m2 +4.4%, static e4m3 +1.7%, static e5m2 +12.1%. This model's
# head_dim is 8, so one outlier sets a whole row's dynamic scale: a harsher case than real models.
PPL_TOLERANCE = {("fp8_e4m3", False): 0.02, ("fp8_e5m2", False): 0.06,
                 ("fp8_e4m3", True): 0.03, ("fp8_e5m2", True): 0.15}  # fmt: skip


@pytest.fixture(scope="module")
def stories_ids(stories_tokenizer):
    return tokenize(stories_tokenizer, require_data(TINYSTORIES_TEXT).read_text(), 3072)


@pytest.fixture(scope="module")
def stories_scales(stories_model, stories_ids):
    calibration = token_windows(stories_ids[2048:], 256)
    return calibrate_kv_scales(xpu_coopt.optimize(stories_model), calibration)


def test_the_cached_harness_matches_transformers_with_a_16_bit_cache(stories_model, stories_ids):
    windows = token_windows(stories_ids, 256, 2048)
    ours = cached_perplexity(xpu_coopt.optimize(stories_model), windows, progress=False)
    theirs = transformers_perplexity(stories_model, windows, 4, progress=False)
    assert ours.tokens == theirs.tokens == 8 * 255
    assert ours.perplexity == pytest.approx(theirs.perplexity, rel=1e-4)
    assert 3.5 < theirs.perplexity < 7  # data README: about 4.5 on TinyStories


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_cache_perplexity_stays_within_tolerance(
    stories_model, stories_ids, stories_scales, kv_dtype, static
):
    windows = token_windows(stories_ids, 256, 2048)
    base = cached_perplexity(xpu_coopt.optimize(stories_model), windows, progress=False)
    model = xpu_coopt.optimize(stories_model, kv_dtype=kv_dtype, kv_scales=stories_scales if static else None)
    result = cached_perplexity(model, windows, progress=False)
    increase = result.perplexity / base.perplexity - 1
    assert 0 <= increase <= PPL_TOLERANCE[(kv_dtype, static)], increase
    spec = model.spec  # float32 16-bit cache: 4 bytes per element; FP8: 1, plus a bfloat16 scale per row
    per_row = spec.head_dim + (0 if static else 2)
    assert result.kv_bytes / base.kv_bytes == pytest.approx(per_row / (4 * spec.head_dim), rel=0.01)


@pytest.mark.parametrize("backend", ["sycl", "triton"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_fp8_perplexity_is_the_same_on_every_backend(
    stories_model, stories_ids, stories_scales, backend, static
):
    windows = token_windows(stories_ids, 20, 40)  # small: the Triton interpreter is slow
    scales = stories_scales if static else None
    reference = xpu_coopt.optimize(stories_model, kv_dtype="fp8_e4m3", kv_scales=scales)
    device = xpu_coopt.optimize(stories_model, kv_dtype="fp8_e4m3", kv_scales=scales, backend=backend)
    expected = cached_perplexity(reference, windows, progress=False).perplexity
    assert cached_perplexity(device, windows, progress=False).perplexity == pytest.approx(expected, rel=1e-4)


def test_calibration_sees_every_column_of_windows_longer_than_the_sliding_window(
    stories_window_model, stories_ids
):
    """Under a sliding window the cache keeps only a prompt's last window - 1 columns, but calibration
    measures every column of its windows. A column's K/V depend only on the tokens up to it, and a prefix
    of window - 1 tokens fits the cache whole, so the prefixes ending every window - 1 columns cover each
    column of the text between them: the maxima over those prefixes are the whole text's."""
    model = xpu_coopt.optimize(stories_window_model)
    kept = stories_window_model.config.sliding_window - 1
    windows = token_windows(stories_ids, 5 * kept)[:2]
    whole = calibrate_kv_scales(model, windows)
    prefixes = [calibrate_kv_scales(model, windows[:, :length]) for length in range(kept, 5 * kept + 1, kept)]
    # Equal up to float32 rounding: a column's attention over a prefix and over the whole text runs with
    # other key counts (and the prefill's other path at the shortest), which may round its last bit otherwise.
    for measured in ("key_amax", "value_amax"):
        expected = tuple(map(max, zip(*(getattr(scales, measured) for scales in prefixes), strict=True)))
        assert getattr(whole, measured) == pytest.approx(expected, rel=1e-6, abs=0), measured


@pytest.mark.parametrize("progress", [True, False])
def test_calibration_shows_its_progress_unless_asked_not_to(stories_model, stories_ids, capsys, progress):
    windows = token_windows(stories_ids, 64)[:3]
    shown = calibrate_kv_scales(xpu_coopt.optimize(stories_model), windows, 2, progress=progress)
    assert ("calibrating KV scales" in capsys.readouterr().err) == progress
    quiet = calibrate_kv_scales(xpu_coopt.optimize(stories_model), windows, 3, progress=False)
    assert shown.key_amax == quiet.key_amax and shown.value_amax == quiet.value_amax


def test_kv_scales_round_trip_through_the_model_folder(tmp_path, stories_scales, stories_model):
    path = stories_scales.save(tmp_path)
    assert path == tmp_path / SCALES_FILE
    loaded = KVScales.load(tmp_path)
    assert loaded == stories_scales
    assert all(value > 0 for value in loaded.key_amax + loaded.value_amax)
    model = xpu_coopt.optimize(stories_model, kv_dtype="fp8_e5m2", kv_scales=tmp_path)
    k_scale, _ = model.static_scales
    expected = fp8.round_up_to_bfloat16(torch.tensor(loaded.key_amax) / fp8.FP8_MAX["fp8_e5m2"])
    assert k_scale.dtype == torch.bfloat16 and torch.equal(k_scale.float(), expected)


def test_kv_scales_bad_input(tmp_path, stories_model, stories_scales):
    with pytest.raises(ValueError, match="kv_scales are for FP8 caches"):
        xpu_coopt.optimize(stories_model, kv_scales=stories_scales)
    with pytest.raises(ValueError, match="calibrated for another model"):
        xpu_coopt.optimize(stories_model, kv_dtype="fp8_e4m3", kv_scales=KVScales((1.0,), (1.0,)))
    with pytest.raises(FileNotFoundError, match="calibrate them first"):
        xpu_coopt.optimize(stories_model, kv_dtype="fp8_e4m3", kv_scales=tmp_path)
    with pytest.raises(ValueError, match="finite"):
        KVScales((float("inf"),), (1.0,))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=64),
    kv_dtype=st.sampled_from(["fp8_e4m3", "fp8_e5m2"]),
)
def test_fp8_round_trip_error_is_within_half_a_step_of_the_row_amax(values, kv_dtype):
    x = torch.tensor(values)[None]
    scale = fp8.dynamic_scale(x, kv_dtype)
    decoded = fp8.decode(fp8.encode(x, scale, kv_dtype), scale, kv_dtype, torch.float32)
    assert torch.isfinite(decoded).all()
    step = {"fp8_e4m3": 2**-4, "fp8_e5m2": 2**-3}[kv_dtype]  # half the relative spacing of each format
    subnormal = {"fp8_e4m3": 2**-9, "fp8_e5m2": 2**-16}[kv_dtype] * float(scale)  # the smallest step
    assert ((decoded - x).abs() <= x.abs() * step + subnormal * 1.0001 + 1e-30).all()


@settings(max_examples=200, deadline=None)
@given(
    codes=st.lists(st.integers(0, 255), min_size=1, max_size=32),
    kv_dtype=st.sampled_from(["fp8_e4m3", "fp8_e5m2"]),
    out_of_range=st.floats(1.01, 1e6),
)
def test_fp8_codes_survive_a_round_trip_and_overflow_saturates(codes, kv_dtype, out_of_range):
    codes = torch.tensor(codes, dtype=torch.uint8)
    finite = torch.isfinite(codes.view(fp8.FP8_DTYPES[kv_dtype]).float())
    codes = codes[finite]
    one = torch.ones(1)
    values = fp8.decode(codes[None], one, kv_dtype, torch.float32)
    assert torch.equal(fp8.encode(values, one, kv_dtype)[0], codes)
    limit = fp8.FP8_MAX[kv_dtype]
    beyond = torch.tensor([[limit * out_of_range, -limit * out_of_range]])
    saturated = fp8.decode(fp8.encode(beyond, one, kv_dtype), one, kv_dtype, torch.float32)
    assert torch.equal(saturated, torch.tensor([[limit, -limit]]))


# ---- Opt-GQA -------------------------------------------------------------------------------------------

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=128)  # fmt: skip


def _tiny(model_class=LlamaForCausalLM, config_class=LlamaConfig, seed=0, **overrides):
    torch.manual_seed(seed)
    return model_class(config_class(**{**TINY, **overrides})).eval()


def _duplicate_kv_heads(model, pairs):
    """Makes K/V head b of every layer a copy of head a, for (a, b) in pairs."""
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                for tensor in (projection.weight, projection.bias):
                    if tensor is not None:
                        rows = tensor.view(-1, head_dim, *tensor.shape[1:])
                        for a, b in pairs:
                            rows[b] = rows[a]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    ("model_class", "config_class", "overrides"),
    [(LlamaForCausalLM, LlamaConfig, {}), (Qwen2ForCausalLM, Qwen2Config, {}),
     (LlamaForCausalLM, LlamaConfig, {"num_key_value_heads": 8, "attention_bias": True})],
    ids=["llama-8q4kv", "qwen2-bias", "llama-mha-bias"],
)  # fmt: skip
def test_conversion_is_exact_when_the_merged_heads_are_identical(model_class, config_class, overrides):
    model = _tiny(model_class, config_class, **overrides)
    kv = model.config.num_key_value_heads
    _duplicate_kv_heads(model, [(a, a + 1) for a in range(0, kv, 2)])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    converted = convert_to_gqa(model, kv // 2)
    ids = torch.randint(0, TINY["vocab_size"], (2, 17))
    assert converted.config.num_key_value_heads == kv // 2
    torch.testing.assert_close(_logits(converted, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # unchanged


def test_similarity_grouping_finds_identical_heads_that_are_not_neighbours():
    model = _tiny()
    _duplicate_kv_heads(model, [(0, 2), (1, 3)])  # heads 0 and 2 are one, 1 and 3 are one
    ids = torch.randint(0, TINY["vocab_size"], (2, 17))
    calibration = torch.randint(0, TINY["vocab_size"], (2, 32))
    similar = convert_to_gqa(model, 2, "similarity", calibration)
    assert similar.config.xpu_coopt_gqa["groups"][0] == [[0, 2], [1, 3]]
    torch.testing.assert_close(_logits(similar, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    mean = convert_to_gqa(model, 2, "mean")  # pools 0 with 1: no longer the same function
    assert (_logits(mean, ids) - _logits(model, ids)).abs().max() > 1e-2


def test_similarity_groups_minimise_the_distance_inside_groups():
    points = torch.tensor([0.0, 10.0, 0.1, 10.2, 5.0, 5.1])
    distance = (points[:, None] - points[None]).abs()
    assert similarity_groups(distance, 2) == [(0, 2), (1, 3), (4, 5)]
    assert similarity_groups(distance, 3) == [(0, 2, 4), (1, 3, 5)]


def test_xpu_coopt_runs_a_converted_model_like_transformers(tmp_path):
    converted = convert_to_gqa(_tiny(), 1)
    converted.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_key_value_heads == 1
    ids = torch.randint(3, TINY["vocab_size"], (1, 9))
    ours = xpu_coopt.optimize(reloaded).generate(ids, max_new_tokens=12)
    theirs = reloaded.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(ours, theirs)


def test_conversion_bad_input():
    model = _tiny()
    with pytest.raises(ValueError, match="must divide the model's 4 K/V heads"):
        convert_to_gqa(model, 3)
    with pytest.raises(ValueError, match="needs calibration token windows"):
        convert_to_gqa(model, 2, "similarity")
    with pytest.raises(ValueError, match="unknown grouping"):
        convert_to_gqa(model, 2, "random")
    with pytest.raises(ValueError, match="has none to convert"):
        convert_to_gqa(torch.nn.Linear(4, 4), 1)


# ---- command line --------------------------------------------------------------------------------------


def test_eval_ppl_and_convert_gqa_command_lines(tmp_path, capsys):
    model, tokenizer = str(require_data(STORIES_MODEL)), str(require_data(STORIES_TOKENIZER))
    text = str(require_data(TINYSTORIES_TEXT))
    out = tmp_path / "ppl.json"
    args = ["eval-ppl", "--model", model, "--tokenizer", tokenizer, "--text", text, "--context", "64",
            "--max-tokens", "256", "--calibration-tokens", "128", "--dtype", "float32", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "| xpu_coopt fp8_e4m3 static |" in capsys.readouterr().out
    names = [row["name"] for row in json.loads(out.read_text())["results"]]
    assert names == ["transformers", "xpu_coopt auto", "xpu_coopt fp8_e4m3", "xpu_coopt fp8_e5m2",
                     "xpu_coopt fp8_e4m3 static", "xpu_coopt fp8_e5m2 static"]  # fmt: skip

    folder = tmp_path / "gqa"
    args = ["convert-gqa", model, str(folder), "--kv-heads", "2", "--grouping", "similarity",
            "--calibration-text", text, "--tokenizer", tokenizer, "--calibration-tokens", "512"]  # fmt: skip
    assert main(args) == 0
    assert LlamaForCausalLM.from_pretrained(folder).config.num_key_value_heads == 2
    assert main(["calibrate-kv", "--model", str(folder), "--tokenizer", tokenizer, "--text", text,
                 "--context", "64", "--max-tokens", "256", "--dtype", "float32"]) == 0  # fmt: skip
    assert KVScales.load(folder).num_layers == 5


def test_command_line_bad_input(tmp_path, capsys):
    model, tokenizer = str(require_data(STORIES_MODEL)), str(require_data(STORIES_TOKENIZER))
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.\n")
    assert main(["eval-ppl", "--model", model, "--tokenizer", tokenizer, "--text", str(short)]) == 2
    assert "too short for one window of 1024 tokens" in capsys.readouterr().err
    assert main(["eval-ppl", "--model", model, "--text", str(short)]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    assert main(["convert-gqa", model, str(tmp_path / "out"), "--kv-heads", "3"]) == 2
    assert "must divide the model's 4 K/V heads" in capsys.readouterr().err
