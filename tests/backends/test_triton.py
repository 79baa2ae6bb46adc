"""The Triton backend end to end under Triton's interpreter (its kernels against the oracles are in
ops/test_op_kernels.py), its compilation for real NVIDIA targets, and its errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import oracles
import pytest
import torch
from helpers import STORIES_VARIANTS, assert_close, segment_case, stories_prompt, unequal_stories_prompts

import xpu_coopt
from xpu_coopt import backends
from xpu_coopt.backends.triton import linear
from xpu_coopt.backends.triton.kernels import triton_kernels
from xpu_coopt.cache import BLOCK_SIZE, RESPONSE_STEP

CPU = torch.device("cpu")


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_stories260k_triton_tokens_match_reference(stories_model, stories_tokenizer, num_beams, kv_dtype):
    ids = stories_prompt(stories_tokenizer)
    kwargs = dict(max_new_tokens=16, num_beams=num_beams, do_sample=False, eos_token_id=2, pad_token_id=0)
    reference = xpu_coopt.optimize(stories_model, backend="torch", kv_dtype=kv_dtype).generate(ids, **kwargs)
    triton = xpu_coopt.optimize(stories_model, backend="triton", kv_dtype=kv_dtype).generate(ids, **kwargs)
    assert torch.equal(triton, reference)


def test_stories260k_triton_paged_cache_tokens_match_reference(stories_model, stories_tokenizer):
    """Unequal prompts in the paged cache, one beam: the Triton decode kernel reads the prompt segment
    through the block table, a new block every 16 generated tokens."""
    ids, mask = unequal_stories_prompts(stories_tokenizer)
    kwargs = dict(max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=0)
    reference = xpu_coopt.optimize(stories_model, backend="torch").generate(
        ids, attention_mask=mask, **kwargs
    )
    paged = xpu_coopt.optimize(stories_model, backend="triton", kv_cache="paged")
    assert torch.equal(paged.generate(ids, attention_mask=mask, **kwargs), reference)


@pytest.mark.parametrize("architecture", sorted(STORIES_VARIANTS))
def test_stories260k_triton_tokens_of_other_attention_variants_match_reference(
    request, stories_tokenizer, architecture
):
    """SmolLM3's layers without rope, Qwen3's query and key norms (test_real_models: the reference's
    tokens are transformers')."""
    model = request.getfixturevalue(STORIES_VARIANTS[architecture])
    ids, mask = unequal_stories_prompts(stories_tokenizer)
    kwargs = dict(max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)
    reference = xpu_coopt.optimize(model, backend="torch").generate(ids, mask, **kwargs)
    triton = xpu_coopt.optimize(model, backend="triton").generate(ids, mask, **kwargs)
    assert torch.equal(triton, reference)


def test_stories260k_triton_shares_out_more_rows_than_a_program_serves(stories_model, stories_tokenizer):
    """One more beam than a decode program's rows hold (x 2 query heads per KV head): two programs share
    each (request, KV head)'s rows out, each with its own beams' response rows, and the tokens are the
    reference's."""
    from xpu_coopt.backends.triton.kernels import MAX_DECODE_ROWS
    from xpu_coopt.ops import decode_split

    config = stories_model.config
    group = config.num_attention_heads // config.num_key_value_heads
    beams = MAX_DECODE_ROWS // group + 1
    assert decode_split.chunk_rows(beams, group, MAX_DECODE_ROWS).chunks == 2
    ids = stories_prompt(stories_tokenizer)
    kwargs = dict(max_new_tokens=8, num_beams=beams, do_sample=False, eos_token_id=2, pad_token_id=0)
    reference = xpu_coopt.optimize(stories_model, backend="torch").generate(ids, **kwargs)
    triton = xpu_coopt.optimize(stories_model, backend="triton").generate(ids, **kwargs)
    assert torch.equal(triton, reference)


def test_decode_steps_run_the_fused_gemms_and_long_prompts_prefill_unfused(
    stories_model, stories_tokenizer, monkeypatch
):
    """The fused GEMMs (norm before, residual add or SiLU after) serve up to MAX_ROWS tokens: here every
    decode step of two sequences, and no prefill of these prompts, which are longer."""
    calls = Counter()

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return call

    fusions = linear.FUSIONS
    monkeypatch.setattr(
        linear,
        "FUSIONS",
        dataclasses.replace(
            fusions,
            norm_linear=counted("norm_linear", fusions.norm_linear),
            linear_add=counted("linear_add", fusions.linear_add),
        ),
    )
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    ids = torch.tensor([stories_tokenizer.encode(text)] * 2)
    assert ids.shape[1] > linear.MAX_ROWS
    kwargs = dict(max_new_tokens=6, do_sample=False)
    reference = xpu_coopt.optimize(stories_model, backend="torch").generate(ids, **kwargs)
    triton = xpu_coopt.optimize(stories_model, backend="triton").generate(ids, **kwargs)
    assert torch.equal(triton, reference)
    layers, decode_steps = stories_model.config.num_hidden_layers, kwargs["max_new_tokens"] - 1
    # per step and layer: the q/k/v and gate/up GEMMs after a norm, o_proj and down_proj into the residual
    assert calls == {"norm_linear": decode_steps * (2 * layers + 1), "linear_add": decode_steps * 2 * layers}


def _compile_without_the_interpreter(script: Path, *arguments: str) -> subprocess.CompletedProcess:
    """Runs a script that compiles for NVIDIA targets (xpu_coopt.backends.triton.offline), in a process without
    TRITON_INTERPRET; asserts that it succeeded."""
    environment = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    command = [sys.executable, str(script), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_kernels_compile_for_ampere_and_hopper():
    """The interpreter is lenient; the real compiler must accept every launch the wrappers make."""
    result = _compile_without_the_interpreter(Path(__file__).with_name("triton_compile.py"))
    # 52: every op's kernels in each dtype and KV format, the paged and the ring decode (and their
    # combines) and the engine's paged_attention among them
    assert "compiled 52 launches for [80, 90]" in result.stdout, result.stdout
    assert "'PAGED': False, 'RING': True" in result.stdout


def test_linear_kernel_resources_compile_plain_and_fused_launches():
    """scripts/linear_kernel_resources.py compiles each projection's plain and fused GEMM for sm_90."""
    script = Path(__file__).parents[2] / "scripts" / "linear_kernel_resources.py"
    result = _compile_without_the_interpreter(script, "--model", "smollm2-135m-shape", "--rows", "1", "4")
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [tuple(row[:3]) for row in rows[:4]] == [
        ("qkv", "1", "plain"), ("qkv", "1", "norm"), ("o_proj", "1", "plain"), ("o_proj", "1", "residual")
    ]  # fmt: skip
    # every projection at both row counts, plain and fused, none spilling registers to the stack
    assert len(rows) == 20 and all(row[5] == "0" for row in rows)
    # the gated gate/up launch gives a program half the columns of the plain one
    gate_up = [int(row[3]) for row in rows if row[0] == "gate_up"]
    assert gate_up == [
        linear.ONE_ROW.block_n,
        linear.ONE_ROW.block_n // 2,
        linear.TILED.block_n,
        linear.TILED.block_n // 2,
    ]


def test_decode_kernel_resources_report_registers_without_a_gpu(tmp_path):
    """scripts/decode_kernel_resources.py compiles the decode kernel for sm_90 and reads its cubin."""
    script = Path(__file__).parents[2] / "scripts" / "decode_kernel_resources.py"
    report = tmp_path / "resources.json"
    _compile_without_the_interpreter(
        script, "--context", "4096", "--beams", "4", "--block-t", "4", "--json", str(report)
    )
    rows = {row["kv_dtype"]: row for row in json.loads(report.read_text())["rows"]}
    assert sorted(rows) == ["auto", "fp8_e4m3"]
    for row in rows.values():
        assert row["BLOCK_T"] == 4 and 16 <= row["registers"] <= 255 and row["stack_bytes"] >= 0
        assert row["num_warps"] == 4 and row["shared_bytes"] > 0
        # 132 SMs x 2 programs wanted over 32 KV heads: 9 splits of 4096 columns, whole blocks of 64 or 128
        # keys: chunks of 512, so 8 splits a head
        assert row["programs"] == 32 * 8


def test_fp8_upcast_in_registers_keeps_byte_loads_out_of_the_prompt_loop(tmp_path):
    """DecodeLaunch.fp8_upcast_in_registers: the prompt loop's FP8 tiles convert before Triton moves them
    into tl.dot's operand layout. Without it V's codes are read from shared memory a byte at a time."""
    script = Path(__file__).parents[2] / "scripts" / "decode_kernel_resources.py"
    loops = {}
    for name, options in (("default", ()), ("upcast", ("--fp8-upcast-in-registers",))):
        report = tmp_path / f"{name}.json"
        _compile_without_the_interpreter(script, "--kv-dtype", "fp8_e4m3", "--json", str(report), *options)
        (loops[name],) = json.loads(report.read_text())["rows"]
    assert loops["default"]["shared_byte_loads"] > 0
    assert loops["upcast"]["shared_byte_loads"] == 0
    assert loops["upcast"]["prompt_loop_instructions"] < 0.8 * loops["default"]["prompt_loop_instructions"]


@pytest.mark.parametrize(
    "registers, shared, blocks",
    # Nsight Compute's block limits for the decode kernel on an H100 (docs/results/h100-ncu-*-8k.txt)
    [(156, 71680, {"registers": 3, "shared": 3}), (255, 73728, {"registers": 2, "shared": 3})],
)
def test_blocks_per_sm_match_nsight_compute(registers, shared, blocks):
    from xpu_coopt.backends.triton import offline

    usage = offline.Resources(registers=registers, stack_bytes=0, shared_bytes=shared, num_warps=4)
    assert usage.blocks_per_sm(90) == blocks
    with pytest.raises(ValueError, match="shared memory per SM of sm_75 unknown"):
        usage.blocks_per_sm(75)


def test_compile_for_refuses_the_interpreter():
    from xpu_coopt.backends.triton import offline

    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET=1"), offline.compile_for(90):
        pass


def test_decode_launch_overrides(monkeypatch):
    import argparse
    import dataclasses

    from xpu_coopt.backends.triton import kernels, tuning

    monkeypatch.setattr(kernels, "DECODE_LAUNCH", kernels.DecodeLaunch())
    parser = argparse.ArgumentParser()
    tuning.add_decode_launch_arguments(parser)
    arguments = ["--block-n", "32", "--programs-per-sm", "3", "--min-chunk", "128"]
    launch = tuning.apply_decode_launch(parser.parse_args(arguments))
    assert launch is kernels.DECODE_LAUNCH
    assert (launch.block_n("auto"), launch.block_n("fp8_e5m2"), launch.programs_per_sm) == (32, 32, 3)
    # 16 programs wanted under the interpreter, 8 splits for 2 (request, KV head) pairs: 600 columns of
    # at least 128 allow 4; 64 columns allow 8, of which 5 hold whole 64-column blocks (chunks of 128).
    cpu = torch.device("cpu")
    assert kernels.decode_splits(2, 600, cpu, 64) == 4
    monkeypatch.setattr(kernels, "DECODE_LAUNCH", dataclasses.replace(launch, min_chunk=64))
    assert kernels.decode_splits(2, 600, cpu, 64) == 5
    assert (launch.block_t, launch.num_stages, launch.max_registers) == (16, 3, None)  # the defaults kept


def test_response_blocks_hold_16_to_64_columns():
    from xpu_coopt.backends.triton import kernels

    steps = {beams: kernels.response_steps(kernels.DECODE_LAUNCH, beams) for beams in (1, 2, 3, 4, 8, 16, 64)}
    assert steps == {1: 16, 2: 16, 3: 16, 4: 16, 8: 8, 16: 4, 64: 1}  # 3 beams: blocks of 4 (a power of 2)


def test_fp8_upcast_in_registers_is_refused_by_the_interpreter(monkeypatch):
    import dataclasses

    from xpu_coopt.backends.triton import kernels

    monkeypatch.setattr(
        kernels, "DECODE_LAUNCH", dataclasses.replace(kernels.DECODE_LAUNCH, fp8_upcast_in_registers=True)
    )
    query = torch.zeros(1, 2, 16)
    cache = torch.zeros(1, 2, 4, 16)
    with pytest.raises(ValueError, match="fp8_upcast_in_registers needs compiled GPU code"):
        kernels.ENTRIES.segment_attention_decode(
            torch.empty_like(query), query, cache, cache, None, None, torch.zeros(1, dtype=torch.int32), cache,
            cache, None, None, torch.zeros(1, 4, dtype=torch.int32), 0, 0.25, "auto",
        )  # fmt: skip


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(xpu_coopt.BackendUnavailableError, match=r"only under Triton's interpreter"):
        backends.resolve_backend("triton", CPU)


def test_missing_triton_is_a_clear_error(monkeypatch):
    real_find_spec = backends.importlib.util.find_spec
    monkeypatch.setattr(
        backends.importlib.util, "find_spec", lambda name: None if name == "triton" else real_find_spec(name)
    )
    with pytest.raises(xpu_coopt.BackendUnavailableError, match=r"pip install 'xpu_coopt\[triton\]'"):
        backends.resolve_backend("triton", CPU)


def test_triton_backend_refuses_other_devices():
    with pytest.raises(xpu_coopt.BackendUnavailableError, match="not meta"):
        backends.resolve_backend("triton", torch.device("meta"))


def test_unsupported_head_dim_is_a_clear_error():
    from xpu_coopt.backends.triton import kernels

    q = torch.randn(1, 3, 2, 512)
    with pytest.raises(ValueError, match="head_dim up to 256, not 512"):
        kernels.ENTRIES.attention_prefill(
            torch.empty_like(q), q, q, q, torch.zeros(1, dtype=torch.int32), 0.1
        )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_graph_decode_bookkeeping_gives_the_same_tokens(
    stories_model, stories_tokenizer, monkeypatch, backend, kv_dtype, num_beams
):
    """The CUDA-graph decode path without a GPU: the cache at full capacity with its write column,
    positions and segment lengths in device tensors updated in place, and the decode graph's fixed input
    and output buffers, each step run eagerly where a GPU would replay the captured graph. The expected
    tokens are the reference kernels' without graphs (Triton's eager tokens equal them: the test above)."""
    replays = _replay_decode_graphs_eagerly(monkeypatch)
    ids = torch.cat([stories_prompt(stories_tokenizer)] * 2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    kwargs = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False, eos_token_id=2, pad_token_id=0)
    expected = xpu_coopt.optimize(stories_model, kv_dtype=kv_dtype).generate(ids, mask, **kwargs)
    graphed = xpu_coopt.optimize(stories_model, backend=backend, kv_dtype=kv_dtype)
    graphed.cuda_graph = True  # what optimize() chooses for a CUDA model on the Triton backend
    assert torch.equal(graphed.generate(ids, mask, **kwargs), expected)
    prompt = ids.shape[1]
    first = [prompt + 1, 0] if num_beams == 1 else [prompt, 1]
    assert replays[0][1] == first and len(replays) == expected.shape[1] - prompt - 1


@pytest.mark.parametrize(
    ("backend", "num_beams", "kv_cache"),
    [("torch", 1, "segment"), ("triton", 1, "segment"), ("torch", 3, "segment"), ("triton", 3, "segment"),
     ("torch", 1, "paged")],
)  # fmt: skip
def test_graph_decode_with_a_sliding_window_gives_the_same_tokens(
    stories_window_model, stories_tokenizer, monkeypatch, backend, num_beams, kv_cache
):
    """The window counted from the device-side lengths a replayed graph reads, the segments at full
    capacity (test_real_models: the eager reference's tokens are transformers'); with one beam the segment
    cache a ring of the window's columns, which the 20 new tokens go round; paged, the blocks the window
    has passed reused by the table a graph reads in place."""
    replays = _replay_decode_graphs_eagerly(monkeypatch)
    ids, mask = unequal_stories_prompts(stories_tokenizer)
    kwargs = dict(max_new_tokens=20, num_beams=num_beams, do_sample=False, eos_token_id=2, pad_token_id=0)
    expected = xpu_coopt.optimize(stories_window_model).generate(ids, mask, **kwargs)
    graphed = xpu_coopt.optimize(stories_window_model, backend=backend, kv_cache=kv_cache)
    graphed.cuda_graph = True
    assert torch.equal(graphed.generate(ids, mask, **kwargs), expected)
    assert len(replays) == expected.shape[1] - ids.shape[1] - 1


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_paged_pool_under_a_decode_graph_never_moves(
    stories_model, stories_tokenizer, monkeypatch, num_beams
):
    """A decode graph over a paged cache: the pool, sized at the prefill for every block the generation
    can come to use (no block of left padding alone), holds as many blocks as without a graph and never
    moves, so the graph is captured once for the whole generation. Tokens and scores are those of the
    cache without a graph."""
    replays = _replay_decode_graphs_eagerly(monkeypatch)
    ids, mask = unequal_stories_prompts(stories_tokenizer)
    new_tokens = 60
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=num_beams, do_sample=False,
                  eos_token_id=2, pad_token_id=0, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    eager = xpu_coopt.optimize(stories_model, kv_cache="paged")
    graphed = xpu_coopt.optimize(stories_model, kv_cache="paged")
    graphed.cuda_graph = True
    expected, out = (model.generate(ids, mask, **kwargs) for model in (eager, graphed))
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(out.scores, expected.scores, atol=0, rtol=0)
    kept = graphed._kept.session
    eager_pool = eager.prefill(ids, mask, num_beams, new_tokens)[1].cache.prompt.pool_blocks()
    assert kept.cache.prompt.pool_blocks() == eager_pool
    assert kept.graph.captures == out.decode_graph_captures == 1
    assert len(replays) == new_tokens - 1
    # Less than the table can map: the short prompt's first block is padding alone, never given.
    assert eager_pool < 1 + kept.cache.prompt.block_table.numel()


def _replay_decode_graphs_eagerly(monkeypatch) -> list[tuple[int, list[int]]]:
    """DecodeGraph without a GPU: its capture runs the step once eagerly, as the capture's warm-up runs do,
    for the shape of the output buffer, and each replay runs the step eagerly where a GPU replays the
    captured graph, returning it in that one buffer as the graph does. DecodeGraph's own __call__ decides
    when to capture. Returns the replays: (the graph's id, the segment lengths it read)."""
    from xpu_coopt.model.decode_graph import DecodeGraph

    replays = []

    def eager_capture(self, cache):
        self.graph = lambda: self._forward(cache)  # what a replay runs
        self.logits = torch.empty_like(self._forward(cache))
        self.captured_segment_lens = cache.lengths.segment_lens

    def eager_replay(self):
        self.logits.copy_(self.graph())
        replays.append((id(self), self.captured_segment_lens.tolist()))

    monkeypatch.setattr(DecodeGraph, "_capture", eager_capture)
    monkeypatch.setattr(DecodeGraph, "_replay", eager_replay)
    return replays


@pytest.mark.parametrize(
    ("backend", "kv_dtype", "num_beams", "kv_cache"),
    # the Triton interpreter takes minutes a case: one, whose kernels then read segments far longer than
    # their lengths (the kernels' own tests cover every format, and a paged segment with device lengths),
    # over the generations that reuse a graph
    [("torch", "auto", 1, "segment"), ("torch", "auto", 3, "segment"), ("torch", "fp8_e4m3", 1, "segment"),
     ("torch", "fp8_e4m3", 3, "segment"), ("triton", "fp8_e4m3", 3, "segment"), ("torch", "auto", 1, "paged"),
     ("torch", "fp8_e4m3", 3, "paged")],
)  # fmt: skip
def test_generate_reuses_the_kept_decode_graph_when_it_fits(
    stories_model, stories_tokenizer, monkeypatch, backend, kv_dtype, num_beams, kv_cache
):
    """generate() keeps its cache and decode graph for the next generate() that fits them: same batch and
    beams, a prompt and max_new_tokens within the cache's room. Each generation gives the tokens (and
    scores) of a model without graphs, whatever the last one left in the cache; one that does not fit
    gets a cache and graph of its own. The expected tokens and scores are the reference kernels' without
    graphs (Triton's eager tokens equal them: test_stories260k_triton_tokens_match_reference; their scores
    differ by the order of the kernels' sums). A paged cache fits where its pool holds the blocks the new
    generation plans, which it then lays out anew in the same table."""
    replays = _replay_decode_graphs_eagerly(monkeypatch)
    prompt = torch.tensor([stories_tokenizer.encode("Once upon a time there was a little girl named Lily")])
    kwargs = dict(num_beams=num_beams, do_sample=False, eos_token_id=2, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)  # fmt: skip
    eager = xpu_coopt.optimize(stories_model, kv_dtype=kv_dtype)
    graphed = xpu_coopt.optimize(stories_model, backend=backend, kv_dtype=kv_dtype, kv_cache=kv_cache)
    graphed.cuda_graph = True  # what optimize() chooses for a CUDA model on the Triton backend
    long_batch = torch.cat((prompt, prompt.flip(1)))
    short_batch = long_batch[:, 3:]
    short_mask = torch.ones_like(short_batch)
    short_mask[1, :4] = 0  # a left-padded row
    # (input_ids, attention_mask, max_new_tokens, reuses the last graph); the first makes room for 16 new
    # tokens (cache.RESPONSE_STEP), and a paged one-beam cache for as many as its blocks then hold
    too_long = torch.cat((long_batch, short_batch[:, :11]), dim=1)
    room = long_batch.shape[1] + RESPONSE_STEP
    if kv_cache == "paged" and num_beams == 1:
        room = -(-room // BLOCK_SIZE) * BLOCK_SIZE
    generations = [
        (long_batch, None, 6, False),
        (short_batch, short_mask, 5, True),  # a shorter prompt: fits
        (long_batch, None, 3, True),
        (too_long, None, room + 1 - too_long.shape[1], False),  # one column too many
        (long_batch[:1], None, 4, False),  # another batch size
    ]
    if backend == "triton":  # the kernels read a kept cache in the first three; the rest is bookkeeping
        generations = generations[:3]
    tolerance = dict(atol=1e-4, rtol=1e-5) if backend == "triton" else {}
    graphs = []
    for ids, mask, new_tokens, reuses in generations:
        expected = eager.generate(ids, mask, max_new_tokens=new_tokens, **kwargs)
        out = graphed.generate(ids, mask, max_new_tokens=new_tokens, **kwargs)
        assert torch.equal(out.sequences, expected.sequences)
        for step, (got, want) in enumerate(zip(out.scores, expected.scores, strict=True)):
            torch.testing.assert_close(
                got, want, **tolerance, msg=lambda m, step=step: f"scores of step {step}: {m}"
            )
        graph = graphed._kept.session.graph
        assert (graphs[-1] is graph if graphs else False) == reuses
        assert expected.decode_graph_captures == 0  # no graph
        assert out.decode_graph_captures == (
            0 if reuses else 1
        )  # a new graph captures once, a reused one not
        graphs.append(graph)
    # Every replay went through the graph of its generation's cache; without graphs nothing is kept.
    assert {graph_id for graph_id, _ in replays} == {id(graph) for graph in graphs}
    assert eager._kept.session is None
    graphed.release_cache()
    assert graphed._kept.session is None


def test_a_decode_graph_is_captured_again_when_its_inputs_moved(
    stories_model, stories_tokenizer, monkeypatch
):
    """A replay reads every tensor at the address it was captured with: a kept cache whose tensor moved
    (a clone stands in), or a rotary table extended since, gets its graph captured again before the next
    replay, which then reads the new storage (the tokens are those of a model without graphs)."""
    _replay_decode_graphs_eagerly(monkeypatch)
    model = xpu_coopt.optimize(stories_model)
    model.cuda_graph = True
    prompt = stories_prompt(stories_tokenizer)
    expected = xpu_coopt.optimize(stories_model).generate(prompt, max_new_tokens=4)
    assert torch.equal(model.generate(prompt, max_new_tokens=4), expected)
    session = model._kept.session
    graph = session.graph
    assert graph.captures == 1
    storage = session.cache.prompt.storage
    old_address = storage[0].k.data_ptr()
    storage.layers[0] = storage[0]._replace(k=storage[0].k.clone())
    assert torch.equal(model.generate(prompt, max_new_tokens=4), expected)
    assert model._kept.session.graph is graph and graph.captures == 2
    assert graph.input_addresses["kv0"] == storage[0].k.data_ptr() != old_address
    # The rotary table moves too where a generation runs past it (past max_position_embeddings).
    model.decoder.cover_positions(model.decoder.cos_sin_cache.shape[0] + 1)
    assert torch.equal(model.generate(prompt, max_new_tokens=4), expected)
    assert model._kept.session.graph is graph and graph.captures == 3
    assert graph.input_addresses["cos_sin_cache"] == model.decoder.cos_sin_cache.data_ptr()


def test_cuda_graph_needs_cuda_and_triton(stories_model):
    with pytest.raises(
        ValueError, match="cuda_graph=True needs a CUDA model on the Triton backend, not a cpu"
    ):
        xpu_coopt.optimize(stories_model, backend="triton", cuda_graph=True)
    assert xpu_coopt.optimize(stories_model, backend="triton").cuda_graph is False  # off on CPU by default


def test_device_lengths_do_not_grow(stories_model, stories_tokenizer):
    model = xpu_coopt.optimize(stories_model)
    logits, session = model.prefill(stories_prompt(stories_tokenizer), max_new_tokens=1)
    session.cache.use_device_lengths()
    token = logits.argmax(-1)
    for _ in range(session.cache.capacity):
        token = session.decode(token).argmax(-1)
    with pytest.raises(RuntimeError, match="ask for max_new_tokens up front"):
        session.decode(token)


@pytest.mark.parametrize("device_lengths", [False, True])
@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
def test_decode_microbenchmark_cases_are_valid_calls(kv_dtype, device_lengths, monkeypatch):
    """scripts/bench_decode_attention.py's inputs (run on a GPU only): with --beams and --response, one
    call per cached layer of a valid op call, on which the Triton kernel and the reference agree, and the
    bytes count each distinct response row once."""
    import argparse

    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "scripts"))
    import bench_decode_attention

    from xpu_coopt.backends.cpu import cpu_kernels
    from xpu_coopt.backends.triton.kernels import triton_kernels

    args = argparse.Namespace(device="cpu", batch=2, beams=4, heads=4, kv_heads=2, head_dim=64, response=9,
                              min_cycle_bytes=1, device_lengths=device_lengths)  # fmt: skip
    calls, layers, moved = bench_decode_attention.make_case(args, 64, kv_dtype)
    assert layers == 2 and len(calls) == 2
    assert (calls[0][15].tolist() == [64, 9]) if device_lengths else len(calls[0]) == 15
    slots = calls[0][11]
    assert slots.shape == (8, 9) and torch.equal(slots[:, -1], torch.arange(8, dtype=torch.int32))
    assert bool(((slots // 4) == (torch.arange(8) // 4)[:, None]).all())  # histories stay in their request
    row_bytes = 64 + 2 if kv_dtype != "auto" else 128
    distinct = sum(len(torch.unique(slots.view(2, 4, 9)[r, :, t])) for r in range(2) for t in range(9))
    assert 2 * 9 <= distinct <= 8 * 9
    assert moved == 2 * 2 * row_bytes * (2 * 64 + distinct) + 2 * 8 * 4 * 64 * 2
    triton_out, reference_out = torch.empty_like(calls[0][0]), torch.empty_like(calls[0][0])
    triton_kernels().segment_attention_decode(triton_out, *calls[0][1:])
    cpu_kernels().segment_attention_decode(reference_out, *calls[0][1:])
    torch.testing.assert_close(triton_out, reference_out, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_decode_in_float16_keeps_small_softmax_weights(kv_dtype):
    """float16 activations, an FP8 cache and 600 keys whose softmax weights span orders of magnitude: the
    weights times V's scales (weight x amax / FP8_MAX) are then often float16 subnormals, where the Triton
    kernel once lost their bits (errors of 2.8e-3 beyond the relative tolerance at e5m2, 1.3e-5 now that
    it scales them up before rounding), hence a quarter of float16's absolute tolerance here. (The CPU
    reference, which rounds q.k to float16 before its float32 softmax, errs more at such scores.)"""
    torch.manual_seed(0)  # the data this tolerance was set on
    query, caches, dequantized, prompt_start, beam_slots = segment_case(
        torch.float16, kv_dtype, 1, 2, 4, 2, 64, 600, 4, False
    )
    query = query * 4  # scores spread over several units
    (pk, pk_s), (pv, pv_s), (rk, rk_s), (rv, rv_s) = caches
    out = torch.full_like(query, float("nan"))
    triton_kernels().segment_attention_decode(out, query, pk, pv, pk_s, pv_s, prompt_start, rk, rv, rk_s,
                                              rv_s, beam_slots, 4, 0.125, kv_dtype)  # fmt: skip
    expected = oracles.segment_attention_decode(query, *dequantized[:2], prompt_start, *dequantized[2:], beam_slots,
                                                4, 0.125)  # fmt: skip
    assert_close(out, expected, torch.float16, scale=0.25)
