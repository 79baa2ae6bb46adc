"""The OpenAI-compatible server over loopback, driven by the official openai client: chat and
completions, streamed and not, usage, n > 1, stop strings, errors; 32 concurrent streamed requests each
get the tokens generate() gives its prompt alone; clients that leave mid-stream free their blocks."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers import free_port, wait_until_serving

import xpu_coopt
from xpu_coopt.engine.engine import Engine
from xpu_coopt.serve.app import create_app
from xpu_coopt.serve.async_engine import AsyncEngine

MODEL = "smollm2-test"
API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(smollm2_fp32):
    import uvicorn

    hf_model, tokenizer = smollm2_fp32
    model = xpu_coopt.optimize(hf_model)
    engine = Engine(model, num_blocks=256, block_size=16, max_num_batched_tokens=128, max_num_seqs=64)
    async_engine = AsyncEngine(engine, max_waiting=64)
    app = create_app(async_engine, tokenizer, MODEL, API_KEY)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", model, tokenizer, engine
    uv.should_exit = True
    thread.join(timeout=30)


def _client(url, key=API_KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _greedy(model, tokenizer, ids, max_tokens):
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_completions_and_chat_give_generates_text_with_usage(server):
    url, model, tokenizer, _ = server
    client = _client(url)
    prompt = "The capital of France is"
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    ids = tokenizer(prompt)["input_ids"]
    assert completion.choices[0].text == _greedy(model, tokenizer, ids, 8)
    assert completion.usage.prompt_tokens == len(ids) and completion.usage.completion_tokens <= 8
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == _greedy(model, tokenizer, chat_ids, 10)
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_streamed_chat_has_one_id_the_role_first_a_finish_reason_and_usage(server):
    url, *_ = server
    stream = _client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content and chunks[-1].choices == [] and 1 <= chunks[-1].usage.completion_tokens <= 6


def test_n_choices_stop_strings_and_seeds(server):
    url, *_ = server
    client = _client(url)
    sampled = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=3, seed=5
    )
    again = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=3, seed=5
    )
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded: reproducible
    free = (
        client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stop = free.strip().split()[1]  # a word the free run produces after its first
    stopped = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == free[: free.index(stop)]


def test_a_choice_a_stop_string_ends_stops_its_request_at_once(server):
    """n=2: the choice a stop string ends stops generating then, while the other runs to max_tokens."""
    url, *_ = server
    client = _client(url)
    request = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 1.0, "n": 2, "seed": 3,
               "extra_body": {"ignore_eos": True}}  # fmt: skip
    free = client.completions.create(**request).choices
    words = free[0].text.split()
    stop = next(w for w in words[1:6] if w not in free[1].text)  # early in choice 0, nowhere in choice 1
    before = _metric(url, "xpu_coopt_generated_tokens_total")
    stopped = client.completions.create(**request, stop=[stop])
    assert [c.finish_reason for c in stopped.choices] == ["stop", "length"]
    assert stopped.choices[1].text == free[1].text
    generated = _metric(url, "xpu_coopt_generated_tokens_total") - before
    assert stopped.usage.completion_tokens < 80
    assert generated <= stopped.usage.completion_tokens + 10  # the stopped choice's request did not run on


def test_logprobs_in_completions_and_chat_streamed_or_not(server):
    """Greedy: each token's logprob is the likeliest of its alternatives; the tokens spell the text; a
    streamed chat's entries equal the whole reply's."""
    url, *_ = server
    client = _client(url)
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                           temperature=0, logprobs=3).choices[0]  # fmt: skip
    logprobs = completion.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert "".join(logprobs.tokens) == completion.text
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(8)]
    for value, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) <= 3 and value <= 0 and value == pytest.approx(max(top.values()))
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour"}], "max_tokens": 6,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    whole = client.chat.completions.create(**chat).choices[0].logprobs.content
    assert len(whole) == 6 and all(len(entry.top_logprobs) == 2 for entry in whole)
    assert all(entry.bytes == list(entry.token.encode()) for entry in whole)
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) for entry in whole)
    streamed = [entry for chunk in client.chat.completions.create(**chat, stream=True) if chunk.choices
                for entry in (chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else [])]  # fmt: skip
    assert [(e.token, e.logprob) for e in streamed] == [
        (e.token, pytest.approx(e.logprob, abs=1e-4)) for e in whole
    ]  # prefix reuse: other sums
    plain = client.chat.completions.create(**{**chat, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_concurrent_streams_each_get_their_prompts_own_greedy_tokens(server):
    url, model, tokenizer, engine = server
    prompts = [f"Story {i}: " + "once " * (i % 7) + "there was" for i in range(32)]
    lengths = [4 + i % 9 for i in range(32)]

    async def one(client, prompt, max_tokens):
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )  # fmt: skip
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def all_of_them():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths, strict=True)))

    texts = asyncio.run(all_of_them())
    for prompt, n, text in zip(prompts, lengths, texts, strict=True):
        ids = tokenizer(prompt)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert text == tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


def test_a_client_that_leaves_mid_stream_frees_its_blocks(server):
    url, _, _, engine = server
    with httpx.stream("POST", f"{url}/v1/completions", headers={"authorization": f"Bearer {API_KEY}"},
                      json={"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 2000, "temperature": 0,
                            "stream": True, "ignore_eos": True}, timeout=60) as response:  # fmt: skip
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 30
    while engine.blocks.free_blocks != engine.blocks.num_blocks or engine.has_work:
        assert time.monotonic() < deadline, "the aborted request kept its blocks"
        time.sleep(0.05)


CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", {"model": "other", "prompt": "hi"}, "model"),
        ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, "logprobs"),
        ("completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 1.0}}, "logit_bias"),
        ("completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
        ("completions", {"model": MODEL, "prompt": "hi", "best_of": 2}, "best_of"),
        ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
        ("completions", {"model": MODEL, "prompt": ""}, "prompt"),
        (
            "chat/completions",
            {"model": MODEL, "messages": CHAT, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ("chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 2}, None),
    ],
)
def test_bad_requests_answer_400_with_openais_error_object(server, route, body, param):
    url, *_ = server
    response = httpx.post(f"{url}/v1/{route}", json=body, headers={"authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_bad_json_a_missing_key_health_models_and_metrics(server):
    url, *_ = server
    auth = {"authorization": f"Bearer {API_KEY}"}
    bad = httpx.post(
        f"{url}/v1/completions", content=b"not json", headers={**auth, "content-type": "application/json"}
    )
    assert bad.status_code == 400 and "error" in bad.json()
    assert httpx.get(f"{url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong").models.list()
    assert [m.id for m in _client(url).models.list()] == [MODEL]
    assert httpx.get(f"{url}/health").status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("xpu_coopt_requests_running", "xpu_coopt_kv_blocks_used", "xpu_coopt_time_to_first_token_seconds_bucket",
                 "xpu_coopt_inter_token_latency_seconds_bucket", "xpu_coopt_generated_tokens_total",
                 "xpu_coopt_prefix_cache_reused_tokens_total"):  # fmt: skip
        assert name in metrics


def _metric(url, name) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    return float(next(line.split()[1] for line in metrics.splitlines() if line.startswith(name + " ")))


def test_xpu_coopt_serve_answers_then_exits_0_on_sigterm(smollm2_fp32):
    """The command, its engine in a process of its own: it gives generate()'s greedy text, frees the
    blocks of a client that leaves, then stops on SIGTERM with status 0."""
    import signal
    import subprocess
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "xpu_coopt.cli", "serve", "--port", str(port), "--kv-cache-memory", "16M", "--dtype", "float32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_until_serving(url, process, 120, "xpu-coopt serve")
        hf_model, tokenizer = smollm2_fp32
        reply = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 6, "temperature": 0})  # fmt: skip
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 6
        expected = _greedy(xpu_coopt.optimize(hf_model), tokenizer, tokenizer("Hello")["input_ids"], 6)
        assert reply.json()["choices"][0]["text"] == expected
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"model": "smollm2-135m", "prompt": "Tell me a story", "max_tokens": 300,
                                "stream": True, "ignore_eos": True}) as response:  # fmt: skip
            assert next(response.iter_lines()).startswith("data: ")
        deadline = time.monotonic() + 30
        while _metric(url, "xpu_coopt_kv_blocks_used") or _metric(url, "xpu_coopt_requests_running"):
            assert time.monotonic() < deadline, "the engine process kept the blocks of a client that left"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
