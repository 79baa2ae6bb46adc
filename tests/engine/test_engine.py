"""The continuous-batching engine end to end: requests of different lengths joining and leaving a running
batch give, greedy, the tokens generate() gives each prompt alone, whatever the pool and token budget
(chunked prefill, preemption); seeded sampling does not depend on the batch; every block comes back."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

import xpu_coopt
from xpu_coopt import LLM, SamplingParams

LENGTHS, MAX_TOKENS = (5, 40, 17, 3, 64, 9), (8, 5, 12, 20, 6, 1)


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 250, (n,), generator=generator).tolist() for n in LENGTHS]


def _alone(model, prompts):
    """Each prompt's greedy tokens from generate(), one prompt at a time."""
    outputs = []
    for prompt, max_tokens in zip(prompts, MAX_TOKENS[: len(prompts)], strict=True):
        ids = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
        )
        outputs.append(ids[0, len(prompt) :].tolist())
    return outputs


def _requests(prompts, **params):
    return [
        (p, SamplingParams(max_tokens=m, ignore_eos=True, **params))
        for p, m in zip(prompts, MAX_TOKENS[: len(prompts)], strict=True)
    ]


@pytest.mark.parametrize("name", ["llama-gqa-8q2kv-d64", "qwen3-qk-norm", "mistral-window"])
@pytest.mark.parametrize(
    ("num_blocks", "budget", "max_num_seqs"),
    [(256, 256, 8), (30, 16, 4), (18, 8, 4)],
    ids=["roomy", "chunked-prefill", "preempting"],
)
def test_greedy_tokens_equal_generate_alone(name, num_blocks, budget, max_num_seqs, prompts):
    model = xpu_coopt.optimize(tiny_model(name))
    llm = LLM(
        model, num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs
    )
    results = llm.engine.run(_requests(prompts))
    assert [r.output_ids for r in results] == _alone(model, prompts)
    assert llm.engine.blocks.free_blocks == num_blocks and not llm.engine.blocks.tables
    if num_blocks == 18:
        assert llm.engine.scheduler.preemptions > 0


@pytest.mark.parametrize("backend", ["sycl", "triton"])
def test_greedy_tokens_equal_generate_on_the_device_backends(backend, prompts):
    model = xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"), backend=backend)
    llm = LLM(model, num_blocks=30, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    assert [r.output_ids for r in llm.engine.run(_requests(prompts[:4]))] == _alone(model, prompts[:4])


def test_fp8_pool_runs_and_stays_close_to_the_16_bit_one(prompts):
    """An FP8 pool (dynamic scales) holds codes the engine decodes for attention: its first tokens match
    the 16-bit pool's on this random model, and every block comes back."""
    model = xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"), kv_dtype="fp8_e4m3")
    llm = LLM(model, num_blocks=64, block_size=4, max_num_batched_tokens=16)
    results = llm.engine.run(_requests(prompts))
    reference = _alone(xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64")), prompts)
    assert [r.output_ids[0] for r in results] == [tokens[0] for tokens in reference]
    assert llm.engine.blocks.free_blocks == 64


def test_a_seeded_request_samples_the_same_tokens_alone_or_in_a_batch(prompts):
    model = xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"))
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = LLM(model, num_blocks=64, block_size=4).engine.run([(prompts[1], params)])
    engine = LLM(model, num_blocks=64, block_size=4, max_num_batched_tokens=8).engine
    batch = engine.run(
        [
            (p, SamplingParams(max_tokens=6, temperature=1.0, seed=i, ignore_eos=True))
            for i, p in enumerate(prompts)
        ]
        + [(prompts[1], params)]
    )
    assert batch[-1].output_ids == alone[0].output_ids and len(set(alone[0].output_ids)) > 1


def test_stop_tokens_and_eos_finish_a_request(prompts):
    model = xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"))
    engine = LLM(model, num_blocks=64, block_size=4).engine
    free_run = engine.run(_requests(prompts[:1]))[0]
    stop = free_run.output_ids[2]
    stopped = engine.run(
        [(prompts[0], SamplingParams(max_tokens=8, stop_token_ids=(stop,), ignore_eos=True))]
    )[0]
    first = free_run.output_ids.index(stop)
    assert stopped.output_ids == free_run.output_ids[: first + 1] and stopped.finish_reason == "stop"
    assert free_run.finish_reason == "length"


def test_an_aborted_request_frees_its_blocks_at_once(prompts):
    model = xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"))
    engine = LLM(model, num_blocks=64, block_size=4).engine
    kept, dropped = (
        engine.add_request(p, SamplingParams(max_tokens=20, ignore_eos=True)) for p in prompts[:2]
    )
    engine.step()
    assert engine.blocks.used_blocks > 0
    engine.abort(dropped)
    finished = []
    while engine.has_work:
        finished += [event.finished for event in engine.step() if event.finished]
    assert [f.request_id for f in finished] == [kept] and engine.blocks.free_blocks == 64


def test_llm_takes_text_and_returns_outputs_in_prompt_order(smollm2_fp32):
    """The embedded SmolLM2 (float32, through transformers' dequantization): text prompts through the
    tokenizer, greedy outputs equal generate()'s for each prompt alone."""
    hf_model, tokenizer = smollm2_fp32
    model = xpu_coopt.optimize(hf_model)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    llm = LLM(model, tokenizer=tokenizer, kv_cache_memory=16 << 20, max_num_batched_tokens=8)
    outputs = llm.generate(texts, SamplingParams(max_tokens=6), progress=False)
    for text, output in zip(texts, outputs, strict=True):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        expected = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
        assert output.token_ids == expected and output.text == tokenizer.decode(
            expected, skip_special_tokens=True
        )


def test_bad_requests_are_errors():
    model = xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"))
    llm = LLM(model, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="at least one prompt token"):
        llm.engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt token ids must lie in \[0, 256\)"):
        llm.engine.add_request([5, 300], SamplingParams())
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        llm.generate("hello")


def test_prompts_sharing_a_prefix_reuse_its_blocks_with_generates_tokens(prompts):
    """A system prompt shared by later requests: they take its cached blocks (not computed again), alone
    in the step or beside others, and still give generate()'s tokens; a preempted one recomputes."""
    model = xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"))
    system = prompts[4][:40]  # 10 blocks of 4
    shared = [system + prompt[:5] for prompt in prompts[:4]]
    engine = LLM(model, num_blocks=64, block_size=4, max_num_batched_tokens=32).engine
    first = engine.run([(shared[0], SamplingParams(max_tokens=6, ignore_eos=True))])
    rest = engine.run([(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in shared[1:]])
    assert engine.scheduler.reused_tokens >= 3 * 40
    expected = [model.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, len(p) :].tolist()
                for p in shared]  # fmt: skip
    assert [r.output_ids for r in first + rest] == expected
    assert engine.blocks.free_blocks == 64


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_gives_generates_tokens(penalty, prompts):
    """Greedy with transformers' repetition penalty (over prompt and output) equals generate()'s."""
    model = xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"))
    engine = LLM(model, num_blocks=128, block_size=4, max_num_batched_tokens=16).engine
    params = SamplingParams(max_tokens=10, repetition_penalty=penalty, ignore_eos=True)
    results = engine.run([(p, params) for p in prompts[:3]])
    for prompt, result in zip(prompts[:3], results, strict=True):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             repetition_penalty=penalty)  # fmt: skip
        assert result.output_ids == out[0, len(prompt) :].tolist()


def test_presence_and_frequency_penalties_change_the_counts_of_generated_tokens():
    """OpenAI's penalties: subtract presence once and frequency per occurrence from generated tokens."""
    from xpu_coopt.engine.request import Sequence
    from xpu_coopt.engine.sampling import next_tokens

    logits = torch.zeros(1, 8)
    logits[0, 3], logits[0, 5] = 2.0, 1.5
    sequence = Sequence(0, [1], SamplingParams(presence_penalty=0.3, frequency_penalty=0.1), frozenset())
    sequence.output_ids = [3, 3, 3]
    assert next_tokens(logits, [sequence]) == [5]  # 2.0 - 0.3 - 0.3 = 1.4 < 1.5
    sequence.output_ids = [3]
    assert next_tokens(logits, [sequence]) == [3]  # 2.0 - 0.3 - 0.1 = 1.6 > 1.5


def test_min_p_drops_unlikely_tokens():
    from xpu_coopt.engine.request import Sequence
    from xpu_coopt.engine.sampling import next_tokens

    logits = torch.full((1, 50), -10.0)
    logits[0, 7] = 5.0
    generator = torch.Generator().manual_seed(0)
    sequence = Sequence(0, [1], SamplingParams(temperature=5.0, min_p=0.5), frozenset(), generator=generator)
    assert all(next_tokens(logits, [sequence]) == [7] for _ in range(20))


@pytest.mark.parametrize(
    ("num_blocks", "count"), [(256, 5), (18, 0), (18, 20)], ids=["roomy-5", "preempting-0", "preempting-20"]
)
def test_logprobs_are_transformers_log_softmax(num_blocks, count, prompts):
    """Each token's log-probability and the likeliest alternatives equal log_softmax of transformers'
    logits at its position (float64), whatever the batch; a request that does not ask gets none."""
    hf_model = tiny_model("llama-gqa-8q2kv-d64")
    llm = LLM(xpu_coopt.optimize(hf_model), num_blocks=num_blocks, block_size=4, max_num_batched_tokens=8)
    requests = [
        (prompt, SamplingParams(max_tokens=m, ignore_eos=True, logprobs=count if i % 3 else None))
        for i, (prompt, m) in enumerate(zip(prompts, MAX_TOKENS, strict=True))
    ]
    for (prompt, params), result in zip(requests, llm.engine.run(requests), strict=True):
        if params.logprobs is None:
            assert result.logprobs is None
            continue
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + result.output_ids])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits.double(), dim=-1)
        assert len(result.logprobs) == len(result.output_ids)
        for position, (token, got) in enumerate(zip(result.output_ids, result.logprobs, strict=True)):
            assert got.logprob == pytest.approx(expected[position, token].item(), abs=1e-4)
            top_values, top_ids = expected[position].topk(count)
            assert [i for i, _ in got.top] == top_ids.tolist()
            assert [v for _, v in got.top] == pytest.approx(top_values.tolist(), abs=1e-4)
            if count:
                assert got.top[0][0] == token  # greedy: the likeliest


def test_logprobs_out_of_range_are_refused():
    with pytest.raises(ValueError, match="logprobs=21"):
        SamplingParams(logprobs=21)


def test_the_pool_takes_a_fraction_of_the_free_memory_or_bytes_never_both(monkeypatch):
    import xpu_coopt.engine.engine as engine_module

    model = xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"))
    monkeypatch.setattr(engine_module, "free_memory", lambda device: 64 << 20)
    llm = LLM(model, kv_cache_fraction=0.25)
    assert llm.engine.blocks.num_blocks == LLM(model, kv_cache_memory=16 << 20).engine.blocks.num_blocks > 0
    for bad in (
        {"kv_cache_fraction": 0.0},
        {"kv_cache_fraction": 1.5},
        {"kv_cache_fraction": 0.5, "kv_cache_memory": 1 << 20},
    ):
        with pytest.raises(ValueError, match="kv_cache"):
            LLM(model, **bad)
