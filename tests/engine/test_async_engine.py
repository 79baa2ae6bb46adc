"""AsyncEngine, the server's side of the engine (its core a thread here; the command's process core is
tested through `xpu-coopt serve` in test_server.py): a failing step ends every running request with its
error and the engine serves on; a full queue refuses at once; every block comes back."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from helpers import tiny_model

import xpu_coopt
from xpu_coopt.engine.engine import Engine
from xpu_coopt.engine.request import SamplingParams
from xpu_coopt.serve.async_engine import AsyncEngine, QueueFull

PROMPT = [5, 17, 42, 9]


@pytest.fixture(scope="module")
def model():
    return xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"))


async def _tokens(async_engine: AsyncEngine, max_tokens: int = 4) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [event.token async for event in async_engine.generate(PROMPT, params)]


def test_a_failing_step_ends_the_running_requests_and_the_engine_serves_on(model):
    engine = Engine(model, num_blocks=32, block_size=4)
    async_engine = AsyncEngine(engine, max_waiting=8)
    step = engine.step
    engine.step = lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("no memory for the step"))

    async def run():
        results = await asyncio.gather(_tokens(async_engine), _tokens(async_engine), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "no memory for the step" in str(r) for r in results)
        assert engine.blocks.free_blocks == 32 and not engine.has_work
        engine.step = step
        return await _tokens(async_engine)

    try:
        tokens = asyncio.run(run())
    finally:
        async_engine.stop()
    expected = model.generate(torch.tensor([PROMPT]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert tokens == expected[0, len(PROMPT) :].tolist()


def test_a_full_queue_refuses_at_once_and_the_accepted_requests_finish(model):
    engine = Engine(model, num_blocks=32, block_size=4)
    gate = threading.Event()
    step = engine.step
    engine.step = lambda: gate.wait() and step()
    async_engine = AsyncEngine(engine, max_waiting=2)

    async def run():
        accepted = [asyncio.create_task(_tokens(async_engine)) for _ in range(2)]
        await asyncio.sleep(0.1)  # both posted; no step has run
        with pytest.raises(QueueFull, match="2 requests are waiting"):
            await _tokens(async_engine)
        gate.set()
        return await asyncio.gather(*accepted)

    try:
        results = asyncio.run(run())
    finally:
        gate.set()
        async_engine.stop()
    assert [len(tokens) for tokens in results] == [4, 4]
    assert engine.blocks.free_blocks == 32
