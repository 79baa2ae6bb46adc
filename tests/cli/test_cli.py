"""The xpu-coopt command line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import STORIES_MODEL, STORIES_TOKENIZER, require_data

from xpu_coopt.checkpoints import SHAPE_PRESETS, random_model
from xpu_coopt.cli import main
from xpu_coopt.cli.prompts import chat_ids
from xpu_coopt.model.spec import model_spec


def test_bench_runs_both_sides_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(require_data(STORIES_MODEL)), "--dtype", "float32", "--input-tokens", "40",
            "--output-tokens", "5", "--num-beams", "2", "--repeats", "2", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "next token mean (ms)" in printed and "KV cache (MiB)" in printed
    assert "largest KV allocation (MiB)" in printed
    result = json.loads(out.read_text())
    for side in ("transformers", "xpu_coopt"):
        assert result[side]["first_token_ms"] > 0 and result[side]["next_token_ms_mean"] > 0
        assert 0 < result[side]["largest_kv_allocation"] < result[side]["kv_cache_bytes"]
        assert result[side]["decode_graph_captures"] == 0  # no CUDA graph on the CPU
        # every repeat is recorded; the best of them (by mean next token) is the side's result
        runs = result["runs"][side]
        assert len(runs) == 2 and min(runs, key=lambda run: run["next_token_ms_mean"]) == result[side]
    ratios = result["ratios"]
    assert (
        ratios["kv_bytes_ratio"]
        == result["xpu_coopt"]["kv_cache_bytes"] / result["transformers"]["kv_cache_bytes"]
    )
    assert ratios["kv_bytes_ratio"] < 1  # two beams share one prompt segment
    # float32, inplace: transformers' q/k/v and gate/up weights become views of the fused matrices.
    assert "weights (MiB)" in printed and ratios["weight_bytes_ratio"] == 1


def test_bench_samples_several_sequences_per_prompt(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(require_data(STORIES_MODEL)), "--dtype", "float32", "--input-tokens", "60",
            "--output-tokens", "4", "--num-return-sequences", "3", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["num_return_sequences"] == 3
    # transformers holds the 60-token prompt three times, xpu_coopt once (plus three response segments)
    assert result["ratios"]["kv_bytes_ratio"] < 0.6


def test_bench_with_unequal_prompts_in_the_paged_cache(tmp_path):
    """--min-input-tokens spreads the prompts' lengths over the batch (left-padded, on both sides); the
    paged cache stores none of the padding's whole blocks, where transformers stores every column."""
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(require_data(STORIES_MODEL)), "--dtype", "float32", "--batch-size", "4",
            "--input-tokens", "120", "--min-input-tokens", "8", "--output-tokens", "4", "--kv-cache", "paged",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["kv_cache"] == "paged" and result["settings"]["min_input_tokens"] == 8
    # prompts of 8, 45, 82 and 120 tokens, each with room for 16 new tokens: 2, 5, 7 and 9 blocks of 16
    # and the sink, 384 columns where transformers holds 4 x 124 (the segment cache 4 x 136)
    assert 0.77 < result["ratios"]["kv_bytes_ratio"] < 0.79


def test_bench_rejects_a_shortest_prompt_beyond_the_longest(capsys):
    model = str(require_data(STORIES_MODEL))
    assert main(["bench", "--model", model, "--input-tokens", "8", "--min-input-tokens", "9"]) == 2
    assert "min_input_tokens must lie in 1..input_tokens (8), got 9" in capsys.readouterr().err


def test_bench_rejects_samples_with_beams(capsys):
    model = str(require_data(STORIES_MODEL))
    assert main(["bench", "--model", model, "--num-beams", "2", "--num-return-sequences", "2"]) == 2
    assert "needs num_beams=1" in capsys.readouterr().err


def test_bench_with_an_unknown_model_is_a_clear_error(capsys):
    assert main(["bench", "--model", "no-such-model"]) == 2
    assert "neither 'smollm2-135m', a shape preset" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--device", "xpu"], "argument --device: xpu is not available: this torch"),
        (["bench", "--device", "no-such-device"], "argument --device: 'no-such-device' is not a device"),
        (["eval-ppl", "--text", "no-such-file.txt"], "argument --text: no such file: no-such-file.txt"),
        (["calibrate-kv", "--text", "no-such-file.txt"], "argument --text: no such file"),
        (["convert-gqa", "m", "out", "--kv-heads", "1", "--calibration-text", "no-such-file.txt"],
         "argument --calibration-text: no such file"),
        (["eval-ppl", "--text", __file__, "--tokenizer", "no-such-tokenizer.bin"],
         "argument --tokenizer: no such file"),
        (["generate", "--prompt-file", "no-such-prompt.txt"], "argument --prompt-file: no such file"),
        (["serve", "--kv-cache-fraction", "1.5"], "argument --kv-cache-fraction: '1.5' is not a fraction in (0, 1]"),
        (["serve", "--kv-cache-fraction", "0.5", "--kv-cache-memory", "1G"],
         "argument --kv-cache-memory: not allowed with argument --kv-cache-fraction"),
    ],
)  # fmt: skip
def test_a_device_or_file_that_cannot_be_used_is_an_error_before_loading(monkeypatch, capsys, args, message):
    import xpu_coopt.checkpoints

    if "xpu" in args and hasattr(torch, "xpu") and torch.xpu.is_available():
        pytest.skip("this machine has an XPU: --device xpu is available")  # never on CI's CPU machines
    monkeypatch.setattr(
        xpu_coopt.checkpoints, "load_model", lambda *a, **k: pytest.fail("the model was loaded")
    )
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("keep", [False, True])
def test_bench_frees_the_kept_decode_graph_after_each_run_unless_asked(monkeypatch, keep, capsys):
    """transformers must not run beside xpu_coopt's kept cache (a batch-64 llama-2-7b cache is 37 GB)."""
    from xpu_coopt.model.optimized import OptimizedModel

    released = []
    monkeypatch.setattr(OptimizedModel, "release_cache", lambda self: released.append(self))
    args = ["bench", "--model", str(require_data(STORIES_MODEL)), "--dtype", "float32", "--input-tokens", "8",
            "--output-tokens", "3", "--repeats", "2", *(["--keep-decode-graph"] if keep else [])]  # fmt: skip
    assert main(args) == 0
    assert len(released) == (0 if keep else 3)  # after the warm-up and each of the 2 timed runs
    assert f"keep_decode_graph={keep}" in capsys.readouterr().out


@pytest.mark.parametrize("preset", sorted(SHAPE_PRESETS))
def test_shape_presets_are_models_optimize_reads_as_transformers_builds_them(preset):
    """Every preset is a model of its architecture's class whose shapes (read as optimize() reads them)
    are those transformers builds; built on the meta device, it takes no memory."""
    model = random_model(preset, torch.bfloat16, "meta")
    spec = model_spec(model.config, type(model).__name__)
    attention = model.model.layers[0].self_attn
    assert model.dtype == torch.bfloat16 and len(model.model.layers) == spec.num_layers
    assert attention.q_proj.out_features == spec.num_heads * spec.head_dim
    assert attention.k_proj.out_features == spec.num_kv_heads * spec.head_dim
    assert spec.query_key_norm == hasattr(attention, "q_norm")
    # Mistral-7B's window on every layer; SmolLM3-3B without rope on every fourth of 36 layers
    assert set(spec.layer_windows) == {4096 if preset == "mistral-7b" else None}
    assert spec.layer_rope.count(False) == (9 if preset == "smollm3-3b" else 0)


STORIES_ARGS = ["--model", str(STORIES_MODEL), "--tokenizer", str(STORIES_TOKENIZER), "--dtype", "float32"]


def _transformers_text(stories_model, stories_tokenizer, prompt: str, **settings) -> str:
    """The oracle: transformers' generate on the prompt alone (no padding), decoded whole."""
    ids = torch.tensor([stories_tokenizer.encode(prompt, bos=True)])
    return stories_tokenizer.decode(stories_model.generate(ids, **settings)[0].tolist())


def test_generate_streams_transformers_text(stories_model, stories_tokenizer, capsys):
    require_data(STORIES_MODEL)
    prompt = "Once upon a time"
    # 24 new tokens: past the stream's flush of its decoded tokens (16)
    assert main(["generate", *STORIES_ARGS, "--prompt", prompt, "--max-new-tokens", "24"]) == 0
    captured = capsys.readouterr()
    expected = _transformers_text(
        stories_model, stories_tokenizer, prompt, max_new_tokens=24, do_sample=False
    )
    assert captured.out == expected + "\n" and len(expected) > len(prompt) + 24
    assert "1 sequence, 24 steps in" in captured.err and "next token" in captured.err


def test_generate_with_prompt_lookup_streams_transformers_text(stories_model, stories_tokenizer, capsys):
    prompt = "Tom had a big red ball. He liked to play with the ball. Tom had a big"
    args = ["generate", *STORIES_ARGS, "--prompt", prompt, "--max-new-tokens", "24",
            "--prompt-lookup-num-tokens", "5", "--compare"]  # fmt: skip
    assert main(args) == 0
    captured = capsys.readouterr()
    expected = _transformers_text(
        stories_model, stories_tokenizer, prompt, max_new_tokens=24, do_sample=False
    )
    assert captured.out == expected + "\n"
    assert re.search(r"prompt lookup: [1-9]\d* drafts kept in \d+ decode steps", captured.err)
    assert "transformers generated the same tokens" in captured.err


def test_generate_batches_unequal_prompts_with_beams(stories_model, stories_tokenizer, capsys):
    """Two prompts of unequal lengths run as one left-padded batch; each sequence is transformers' beam
    search on its prompt alone."""
    prompts = ["Once upon a time", "Tom had a big red ball. He liked to"]
    args = ["generate", *STORIES_ARGS, "--prompt", prompts[0], "--prompt", prompts[1], "--num-beams", "3",
            "--num-return-sequences", "2", "--max-new-tokens", "10"]  # fmt: skip
    assert main(args) == 0
    expected = []
    for number, prompt in enumerate(prompts, 1):
        ids = torch.tensor([stories_tokenizer.encode(prompt, bos=True)])
        sequences = stories_model.generate(ids, max_new_tokens=10, num_beams=3, num_return_sequences=2)
        for row, sequence in enumerate(sequences.tolist(), 1):
            expected += [f"[prompt {number}, sequence {row}]", stories_tokenizer.decode(sequence)]
    assert capsys.readouterr().out.splitlines() == expected


def test_generate_samples_from_its_seed_as_transformers(capsys):
    args = ["generate", *STORIES_ARGS, "--prompt", "The cat", "--do-sample", "--top-k", "30", "--seed", "7",
            "--max-new-tokens", "16", "--compare"]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr()
    assert "transformers generated the same tokens" in first.err
    assert main(args[:-1]) == 0  # the same seed draws the same text
    assert capsys.readouterr().out == first.out
    assert main([*args[:-2], "8", "--compare"]) == 0  # another seed, still transformers' draws
    assert capsys.readouterr().out != first.out


def test_generate_compare_reports_where_transformers_parts(monkeypatch, capsys):
    from transformers import LlamaForCausalLM

    transformers_generate = LlamaForCausalLM.generate

    def altered(self, *args, **kwargs):  # transformers choosing another 5th new token
        sequences = transformers_generate(self, *args, **kwargs)
        sequences[0, -4] = (sequences[0, -4] + 1) % self.config.vocab_size
        return sequences

    monkeypatch.setattr(LlamaForCausalLM, "generate", altered)
    args = ["generate", *STORIES_ARGS, "--prompt", "Once", "--max-new-tokens", "8", "--compare"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "transformers' sequence 1 parts from xpu_coopt's at new token 5: in float32 with a float32" in err


@pytest.mark.parametrize(
    ("dtype", "kv_dtype", "reasons"),
    [
        ("float32", "auto", ["should not part: please report it as a bug"]),
        ("bfloat16", "auto", ["in bfloat16 the fused kernels round"]),
        ("float32", "fp8_e5m2", ["the fp8_e5m2 KV cache holds K/V rounded to 8 bits"]),
        ("float16", "fp8_e4m3", ["in float16 the fused kernels", "fp8_e4m3 KV cache"]),
    ],
)
def test_compare_names_why_tokens_can_part(dtype, kv_dtype, reasons):
    from xpu_coopt.cli import DTYPES
    from xpu_coopt.cli.text_generation import why_tokens_can_part

    why = why_tokens_can_part(DTYPES[dtype], kv_dtype)
    assert all(reason in why for reason in reasons)
    assert ("bug" in why) == (reasons == ["should not part: please report it as a bug"])


@pytest.mark.parametrize(
    ("ours", "theirs", "difference"),
    [
        ([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]], None),
        ([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 7, 6]], (1, 1)),
        ([[1, 2, 3], [4, 5, 6]], [[1, 2], [4, 5]], (0, 2)),  # transformers stopped a step earlier
        ([[1, 2], [4, 5]], [[1, 2, 3], [4, 5, 6]], (0, 2)),
    ],
)
def test_first_difference_of_two_generations(ours, theirs, difference):
    from xpu_coopt.cli.text_generation import first_difference

    assert first_difference(torch.tensor(ours), torch.tensor(theirs)) == difference


def test_generate_chat_prints_the_reply_of_transformers(smollm2_fp32, monkeypatch, capsys):
    import xpu_coopt.checkpoints

    model, tokenizer = smollm2_fp32
    monkeypatch.setattr(xpu_coopt.checkpoints, "load_model", lambda *args, **kwargs: (model, tokenizer))
    question = "What is the capital of France?"
    args = ["generate", "--prompt", question, "--chat", "--dtype", "float32", "--max-new-tokens", "8"]
    assert main(args) == 0
    reply = _reply(model, tokenizer, [{"role": "user", "content": question}], 8)
    assert capsys.readouterr().out == reply + "\n" and "Paris" in reply


def _reply(model, tokenizer, messages: list[dict[str, str]], new_tokens: int) -> str:
    """The oracle: transformers' greedy reply to a conversation through the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new_ids = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1] :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def test_generate_interactive_chats_over_the_whole_conversation(smollm2_fp32, monkeypatch, capsys):
    """Each stdin line is a turn, answered after every earlier turn and reply (a blank line is none)."""
    import io

    import xpu_coopt.checkpoints

    model, tokenizer = smollm2_fp32
    monkeypatch.setattr(xpu_coopt.checkpoints, "load_model", lambda *args, **kwargs: (model, tokenizer))
    turns = ["What is the capital of France?", "And the capital of Italy?"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{turns[0]}\n\n{turns[1]}\n"))
    args = ["generate", "--interactive", "--dtype", "float32", "--max-new-tokens", "8"]
    assert main(args) == 0
    messages: list[dict[str, str]] = []
    replies = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        replies.append(_reply(model, tokenizer, messages, 8))
        messages.append({"role": "assistant", "content": replies[-1]})
    captured = capsys.readouterr()
    assert captured.out == "".join(reply + "\n" for reply in replies)
    assert captured.err.count("1 sequence, ") == 2 and "Rome" in replies[1]
    # The second turn prefilled only what follows the first turn's prompt and reply (as the template
    # writes it again), from the conversation's K/V kept between the turns.
    reused = [int(n) for n in re.findall(r"(\d+) of \d+ prompt tokens reused", captured.err)]
    first_prompt = len(chat_ids(tokenizer, messages[:1]))
    assert reused[0] == 0 and reused[1] > first_prompt


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*STORIES_ARGS], "no prompt: pass --prompt TEXT or --prompt-file FILE, or --interactive"),
        ([*STORIES_ARGS[:2], *STORIES_ARGS[4:], "--prompt", "Hi"], "comes without a tokenizer: pass --tokenizer"),
        ([*STORIES_ARGS, "--prompt", "Hi", "--chat"], "a chat needs a tokenizer with a chat template"),
        ([*STORIES_ARGS, "--interactive"], "a chat needs a tokenizer with a chat template"),
        ([*STORIES_ARGS, "--interactive", "--prompt", "Hi"], "--interactive reads its turns from stdin"),
        ([*STORIES_ARGS, "--interactive", "--compare"], "it takes no --prompt, --prompt-file or --compare"),
        ([*STORIES_ARGS, "--prompt", "Hi", "--num-beams", "2", "--do-sample", "--top-p", "1.5"], "top_p"),
    ],
)  # fmt: skip
def test_generate_with_bad_input_is_a_clear_error(args, message, capsys):
    require_data(STORIES_MODEL)
    assert main(["generate", *args]) == 2
    assert message in capsys.readouterr().err


def test_the_command_runs_as_a_module():
    """`python -m xpu_coopt.cli`, as scripts/gpu_bench.sh runs it where the xpu-coopt script is not on the PATH."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "xpu_coopt.cli", "bench", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--input-tokens" in result.stdout


def test_verbose_prints_the_model_files_sha256(capsys):
    """GGUF carries no checksum: --verbose prints the file's SHA-256 to compare with the published one."""
    import hashlib

    digest = hashlib.sha256(require_data(STORIES_MODEL).read_bytes()).hexdigest()
    assert main(["generate", *STORIES_ARGS, "--prompt", "Once", "--max-new-tokens", "2", "--verbose"]) == 0
    assert f"{STORIES_MODEL}: SHA-256 {digest}" in capsys.readouterr().err
