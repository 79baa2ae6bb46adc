"""Tensor parallelism on CPU over gloo, two processes: each case's greedy and beam-search tokens equal
one process's in float32, sampling stays in step across the ranks, each rank holds half the heads (its
KV cache half the K/V heads, or the one head MQA has), and a rank that fails ends the other with an
error instead of a hang."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tp_worker
from helpers import STORIES_MODEL, STORIES_TOKENIZER, free_port, require_data, wait_until_serving

from xpu_coopt.cli import main

RANKS = 2


def _run_ranks(out: Path, fail_rank: int | None = None, timeout: float = 600) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=tp_worker.run, args=(rank, RANKS, port, str(out), fail_rank))
                 for rank in range(RANKS)]  # fmt: skip
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=timeout)
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        process.kill()
    assert not hung, f"ranks {hung} did not finish within {timeout} s"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(RANKS)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tensor-parallel")
    tp_worker.write_checkpoints(folder)
    results = _run_ranks(folder)
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
    return results


@pytest.mark.parametrize("case", tp_worker.CASES, ids=[tp_worker.case_id(*case) for case in tp_worker.CASES])
def test_two_ranks_generate_one_processs_tokens(ranks, case):
    one = tp_worker.generations(*case, tensor_parallel=1)
    key = tp_worker.case_id(*case)
    for result in (r[key] for r in ranks):
        assert result["greedy"] == one["greedy"]
        assert result["beams"] == one["beams"]
        assert result["lookup"] == one["lookup"]
        assert result["heads"] == one["heads"] // RANKS
        assert result["kv_heads"] == max(1, one["kv_heads"] // RANKS)
    assert ranks[0][key]["sampled"] == ranks[1][key]["sampled"]
    if case[2] == "inplace":  # each rank holds its part of the projections (the embeddings and norms whole)
        assert all(r[key]["weight_bytes"] < 0.7 * one["weight_bytes"] for r in ranks)


def test_llm_on_two_ranks_batches_one_processs_tokens(ranks):
    """The continuous-batching engine on each rank: greedy and seeded requests give one process's tokens;
    unseeded ones draw the same tokens on both ranks (rank 0's seed)."""
    one = tp_worker.served("llama-gqa-8q2kv-d64", tensor_parallel=1)
    for result in (r["LLM"] for r in ranks):
        assert result["greedy"] == one["greedy"] and result["seeded"] == one["seeded"]
    assert ranks[0]["LLM"]["unseeded"] == ranks[1]["LLM"]["unseeded"]


@pytest.mark.parametrize(("name", "weight_dtype"), tp_worker.CHECKPOINTS)
def test_a_checkpoint_split_while_loading_gives_one_processs_tokens(ranks, tmp_path, name, weight_dtype):
    """from_pretrained(path, tensor_parallel=2): each rank keeps its part of each layer as it is read."""
    tp_worker.write_checkpoints(tmp_path)
    one = tp_worker.from_checkpoint(tmp_path / name, weight_dtype, tensor_parallel=1)
    assert not one["split"]
    for result in (r[f"{name}/{weight_dtype}"] for r in ranks):
        assert result["split"] and result["greedy"] == one["greedy"]
        assert result["kv_heads"] == one["kv_heads"] // RANKS
        assert result["weight_bytes"] < 0.75 * one["weight_bytes"]


def test_a_rank_that_fails_ends_the_other_with_an_error(tmp_path):
    results = _run_ranks(tmp_path, fail_rank=1, timeout=180)
    assert results[1]["error"] == "RuntimeError: rank 1 fails on purpose"
    assert "error" in results[0], "the rank left alone finished its collective"


STORIES_ARGS = ["--tokenizer", str(STORIES_TOKENIZER), "--dtype", "float32", "--prompt", "Once upon a time",
                "--max-new-tokens", "24"]  # fmt: skip


def test_generate_under_torchrun_prints_the_one_process_text_once(tmp_path):
    """xpu-coopt generate --tensor-parallel 2 under torchrun: rank 0 prints what one process prints."""
    model = ["--model", str(require_data(STORIES_MODEL))]
    one = subprocess.run([sys.executable, "-m", "xpu_coopt.cli", "generate", *model, *STORIES_ARGS],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc-per-node", str(RANKS), "--master-port", str(free_port()), "-m",
                          "xpu_coopt.cli", "generate", *model, *STORIES_ARGS, "--tensor-parallel", str(RANKS)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.startswith("Once upon a time")


def test_tensor_parallel_outside_torchrun_is_one_line_naming_it(capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    model = ["--model", str(require_data(STORIES_MODEL))]
    assert main(["generate", *model, *STORIES_ARGS, "--tensor-parallel", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "torchrun --nproc-per-node 2" in error


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_fp32):
    """A 2-layer random Llama (4 heads, 2 K/V heads) with SmolLM2's tokenizer, saved as a folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_fp32[1]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_serve_under_torchrun_answers_with_one_processs_tokens_and_stops_cleanly(tiny_folder):
    """xpu-coopt serve --tensor-parallel 2: rank 0 serves HTTP, both ranks step the engine; the greedy
    completion is one process's; SIGTERM stops rank 0, which stops the other, and torchrun exits 0."""
    import signal

    import httpx
    import torch
    from transformers import AutoTokenizer

    import xpu_coopt

    port = free_port()
    torchrun = Path(sys.executable).with_name("torchrun")
    process = subprocess.Popen(
        [str(torchrun), "--nproc-per-node", str(RANKS), "--master-port", str(free_port()), "-m", "xpu_coopt.cli",
         "serve", "--model", str(tiny_folder), "--dtype", "float32", "--tensor-parallel", str(RANKS), "--port",
         str(port), "--kv-cache-memory", "8M"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process, 180, "the ranks")
        prompts = ["Once upon a time", "The capital of France is"]
        replies = [httpx.post(f"{url}/v1/completions", timeout=120,
                              json={"model": tiny_folder.name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                                    "ignore_eos": True}).json()["choices"][0]["text"] for prompt in prompts]  # fmt: skip
        for child in _children(process.pid):
            os.kill(child, signal.SIGTERM)  # rank 0 stops gracefully; the other ignores it and follows rank 0
        assert process.wait(timeout=120) == 0, process.stdout.read()
    finally:
        process.kill()
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    model, _ = xpu_coopt.from_pretrained(tiny_folder, dtype=torch.float32)
    for prompt, reply in zip(prompts, replies, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert reply == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_bench_under_torchrun_times_the_split_model_and_rank_0_reports(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    report = tmp_path / "bench.json"
    run = subprocess.run([str(torchrun), "--nproc-per-node", str(RANKS), "--master-port", str(free_port()), "-m",
                          "xpu_coopt.cli", "bench", "--model", str(require_data(STORIES_MODEL)), "--dtype", "float32",
                          "--tensor-parallel", str(RANKS), "--input-tokens", "8", "--output-tokens", "4", "--json",
                          str(report)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(report.read_text())
    assert result["settings"]["tensor_parallel"] == RANKS and run.stdout.count("next token mean") == 1
