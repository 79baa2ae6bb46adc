"""The command line's quantized weights: a .gguf's projections kept 4-bit by `generate`, round-to-nearest
int4 and int8 by `--weight-dtype` (a folder quantized while loading), and `eval-ppl --weight-dtypes`."""

from __future__ import annotations

import json

import torch
from helpers import STORIES_MODEL, STORIES_TOKENIZER, TINYSTORIES_TEXT, require_data

from xpu_coopt.checkpoints import smollm2_location
from xpu_coopt.cli import main

STORIES_ARGS = ["--model", str(STORIES_MODEL), "--tokenizer", str(STORIES_TOKENIZER), "--dtype", "float32"]


def test_generate_keeps_a_gguf_4_bit_with_transformers_tokens(smollm2_fp32, capsys):
    """float32: the 4-bit model's greedy reply is transformers' over the dequantized GGUF (its text)."""
    model, tokenizer = smollm2_fp32
    gguf = smollm2_location()[0] / smollm2_location()[1]
    prompt = "What is the capital of France?"
    args = [
        "generate",
        "--model",
        str(gguf),
        "--prompt",
        prompt,
        "--chat",
        "--max-new-tokens",
        "12",
        "--dtype",
        "float32",
    ]
    assert main(args) == 0
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert capsys.readouterr().out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"


def test_generate_with_int4_weights_runs(capsys):
    require_data(STORIES_MODEL)
    args = ["generate", *STORIES_ARGS, "--prompt", "Once upon a time", "--max-new-tokens", "8", "--weight-dtype", "int4",
            "--group-size", "4"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")
    assert main([*args[:-1], "64"]) == 2
    assert (
        "group_size 64 must be an even integer dividing every projection's input features; intermediate_size is 172: pass group_size=4"
        in capsys.readouterr().err
    )


def test_eval_ppl_scores_each_weight_dtype(tmp_path, capsys):
    out = tmp_path / "ppl.json"
    args = ["eval-ppl", *STORIES_ARGS, "--text", str(require_data(TINYSTORIES_TEXT)), "--context", "64",
            "--max-tokens", "256", "--kv-dtypes", "auto", "--kv-scales", "none", "--weight-dtypes", "auto,int4,int8",
            "--group-size", "4", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    results = {row["name"]: row["perplexity"] for row in json.loads(out.read_text())["results"]}
    assert list(results) == [
        "transformers", "xpu_coopt auto", "xpu_coopt auto, weights int4 g4", "xpu_coopt auto, weights int8"
    ]  # fmt: skip
    assert torch.isclose(
        torch.tensor(results["transformers"]), torch.tensor(results["xpu_coopt auto"]), rtol=1e-4
    )
    assert results["xpu_coopt auto, weights int4 g4"] != results["xpu_coopt auto"]


def test_generate_quantizes_a_folder_while_loading(tmp_path, capsys):
    """--weight-dtype int8 with a 16-bit folder: from_pretrained quantizes it projection by projection; its
    greedy tokens are those of optimize(weight_dtype="int8") over the model transformers loads."""
    from helpers import tiny_model
    from transformers import AutoTokenizer

    import xpu_coopt

    model = tiny_model("llama-gqa-8q2kv-d64")
    model.save_pretrained(tmp_path)
    folder = smollm2_location()[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=smollm2_location()[1])
    tokenizer.save_pretrained(tmp_path)
    prompt = "1 2 3"  # token ids under the tiny model's 256
    args = ["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6", "--dtype",
            "float32", "--weight-dtype", "int8"]  # fmt: skip
    assert main(args) == 0
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = xpu_coopt.optimize(model, weight_dtype="int8").generate(ids, max_new_tokens=6, do_sample=False)
    assert capsys.readouterr().out == tokenizer.decode(expected[0], skip_special_tokens=True) + "\n"


def test_bench_times_int4_weights_against_transformers(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(require_data(STORIES_MODEL)), "--dtype", "float32", "--input-tokens", "24",
            "--output-tokens", "4", "--weight-dtype", "int4", "--group-size", "4", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["weight_dtype"] == "int4 g4"
    assert result["ratios"]["weight_bytes_ratio"] > 1  # the 4-bit copy beside transformers' own weights


def test_bench_keeps_a_gguf_4_bit_where_transformers_dequantizes_it(tmp_path):
    out = tmp_path / "bench.json"
    gguf = smollm2_location()[0] / smollm2_location()[1]
    args = ["bench", "--model", str(gguf), "--input-tokens", "16", "--output-tokens", "3", "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["weight_dtype"] == "auto"
    assert result["ratios"]["weight_bytes_ratio"] < 0.5  # 4-bit projections against transformers' bfloat16
