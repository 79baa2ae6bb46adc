"""The OpenAI-compatible routes over an AsyncEngine (FastAPI).

POST /v1/completions and /v1/chat/completions, streamed as server-sent events (`data: {chunk}` lines,
one id across a response's chunks, the role in a chat's first delta, finish_reason in each choice's
last, usage at the end with stream_options.include_usage, then `data: [DONE]`) or not; GET /v1/models,
/health and /metrics. Bad requests answer 400 with OpenAI's error object, a full queue 503, a missing
or wrong API key 401.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from xpu_coopt.serve.async_engine import AsyncEngine, QueueFull
from xpu_coopt.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body
from xpu_coopt.serve.text import StopText

DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default


@dataclass
class _Choice:
    """One of a response's n choices as it streams: its text so far (stop strings cut), tokens, end."""

    index: int
    stops: StopText
    tokens: int = 0
    finish_reason: str | None = None


@dataclass
class _Response:
    id: str
    kind: str  # "text_completion" or "chat.completion"
    model: str
    prompt_tokens: int
    choices: list[_Choice] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def usage(self) -> dict[str, int]:
        completion = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip


def create_app(engine: AsyncEngine, tokenizer: Any, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="xpu_coopt", on_shutdown=[engine.stop])
    max_context = engine.engine.model.spec.max_position_embeddings
    blocks = engine.engine.blocks
    room = min(max_context, blocks.num_blocks * blocks.block_size)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"msg": str(error), "loc": ()}
        param = ".".join(str(part) for part in first.get("loc", ())[1:] if isinstance(part, str)) or None
        return JSONResponse(
            error_body(f"{first['msg']} ({param})" if param else first["msg"], param=param), 400
        )

    @app.middleware("http")
    async def _authorize(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("a valid API key is required", "authentication_error"), 401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "xpu_coopt"}],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        prompt_ids = body.prompt if isinstance(body.prompt, list) else tokenizer(body.prompt)["input_ids"]
        return await _respond(body, prompt_ids, body.max_tokens or DEFAULT_MAX_TOKENS, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        messages = [message.model_dump(exclude_none=True) for message in body.messages]
        # the template's text, then its tokens: apply_chat_template's tokenized return type varies by release
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        # by default a reply may run to the end of the context, or of what the KV pool holds alone
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, room - len(prompt_ids))
        return await _respond(body, prompt_ids, max_tokens, "chat.completion")

    async def _respond(body, prompt_ids: list[int], max_tokens: int, kind: str) -> Response:
        problem = _check(body, prompt_ids, max_tokens, model_name, max_context)
        if problem is not None:
            return JSONResponse(error_body(*problem), 400)
        response = _Response(f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}", kind,
                             model_name, len(prompt_ids))  # fmt: skip
        streams = []
        try:
            for index in range(body.n):
                response.choices.append(_Choice(index, StopText(tokenizer, body.stops())))
                streams.append(engine.generate(prompt_ids, body.sampling_params(max_tokens, index)))
            merged = _merged(streams)
            first = await anext(merged)  # errors in admission (a full queue, a prompt too long) surface here
        except QueueFull as error:
            return JSONResponse(error_body(str(error), "server_error", code="queue_full"), 503)
        except ValueError as error:
            return JSONResponse(error_body(str(error)), 400)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                _sse(response, first, merged, include_usage), media_type="text/event-stream"
            )
        async for _ in _chunks(response, first, merged):
            pass
        return JSONResponse(_final(response))

    return app


def _check(
    body, prompt_ids: list[int], max_tokens: int, model_name: str, max_context: int
) -> tuple[str, ...] | None:
    """(message, type, param) of a request xpu_coopt refuses, or None."""
    if body.model != model_name:
        return (f"the model {body.model!r} is not served here; this server serves {model_name!r}",
                "invalid_request_error", "model")  # fmt: skip
    unsupported = body.unsupported()
    if unsupported is not None:
        return f"{unsupported} is not supported yet", "invalid_request_error", unsupported
    if not prompt_ids:
        return "the prompt is empty", "invalid_request_error", "prompt"
    if len(prompt_ids) + max_tokens > max_context:
        return (f"the prompt's {len(prompt_ids)} tokens and max_tokens={max_tokens} exceed the model's context of "
                f"{max_context} tokens", "invalid_request_error", "max_tokens")  # fmt: skip
    return None


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, event) from n request streams as they come."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        except BaseException as error:  # surfaced to the reader
            await queue.put((index, error))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()  # a client gone: each request's stream aborts its request


async def _chunks(response: _Response, first, merged) -> AsyncIterator[tuple[_Choice, str]]:
    """(choice, new text) for each event, the first one given."""

    async def events():
        yield first
        async for item in merged:
            yield item

    async for index, event in events():
        choice = response.choices[index]
        if choice.finish_reason is not None:
            continue  # a stop string ended it; its request runs on until every choice has ended
        choice.tokens += 1
        text, stopped = choice.stops.add(event.token, final=event.finished is not None)
        if stopped:
            choice.finish_reason = "stop"
        elif event.finished is not None:
            choice.finish_reason = event.finished.finish_reason
        yield choice, text
        if all(c.finish_reason is not None for c in response.choices):
            await merged.aclose()
            return


async def _sse(response: _Response, first, merged, include_usage: bool) -> AsyncIterator[str]:
    started = set()
    # A client that leaves makes Starlette cancel this generator: _merged's cleanup then aborts the requests.
    async for choice, text in _chunks(response, first, merged):
        delta: dict[str, Any]
        if response.chat:
            delta = {"content": text}
            if choice.index not in started:
                delta["role"] = "assistant"
                started.add(choice.index)
            entry = {"index": choice.index, "delta": delta, "finish_reason": choice.finish_reason}
        else:
            entry = {"index": choice.index, "text": text, "finish_reason": choice.finish_reason}
        yield _event(response, [entry], usage=None, include_usage=include_usage)
    if include_usage:
        yield _event(response, [], usage=response.usage(), include_usage=True)
    yield "data: [DONE]\n\n"


def _event(response: _Response, choices: list, usage, include_usage: bool) -> str:
    chunk = {"id": response.id, "object": f"{response.kind}.chunk" if response.chat else response.kind,
             "created": response.created, "model": response.model, "choices": choices}  # fmt: skip
    if include_usage:
        chunk["usage"] = usage
    return f"data: {json.dumps(chunk)}\n\n"


def _final(response: _Response) -> dict[str, Any]:
    choices = []
    for choice in response.choices:
        if response.chat:
            choices.append({"index": choice.index, "message": {"role": "assistant", "content": choice.stops.text},
                            "finish_reason": choice.finish_reason})  # fmt: skip
        else:
            choices.append(
                {"index": choice.index, "text": choice.stops.text, "finish_reason": choice.finish_reason}
            )
    return {"id": response.id, "object": response.kind, "created": response.created, "model": response.model,
            "choices": choices, "usage": response.usage()}  # fmt: skip
