"""Tensor parallelism on CPU over gloo, two processes: each case's greedy and beam-search tokens equal
one process's in float32, sampling stays in step across the ranks, each rank holds half the heads (its
KV cache half the K/V heads, or the one head MQA has), and a rank that fails ends the other with an
error instead of a hang."""

from __future__ import annotations

import json
import multiprocessing
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tp_worker
from helpers import STORIES_MODEL, STORIES_TOKENIZER, require_data

from xpu_coopt.cli import main

RANKS = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_ranks(out: Path, fail_rank: int | None = None, timeout: float = 600) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    port = _free_port()
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
    two = subprocess.run([str(torchrun), "--nproc-per-node", str(RANKS), "--master-port", str(_free_port()), "-m",
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
