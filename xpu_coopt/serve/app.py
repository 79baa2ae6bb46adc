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

from xpu_coopt.engine.engine import TokenEvent
from xpu_coopt.serve.async_engine import AsyncEngine, QueueFull
from xpu_coopt.serve.logprobs import LogprobsFormat
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
    logprobs: list[dict[str, Any]] | None = None  # each token's entry, where the request asked
    token_chars: int = 0  # characters of the tokens' own texts so far (the completions logprobs' offsets)


@dataclass
class _Response:
    id: str
    kind: str  # "text_completion" or "chat.completion"
    model: str
    prompt_tokens: int
    logprobs: LogprobsFormat | None = None
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
    max_context, room = engine.limits.max_context, engine.limits.room

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
        chat = kind == "chat.completion"
        logprobs = None if body.logprob_count() is None else LogprobsFormat(tokenizer, chat)
        response = _Response(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", kind, model_name,
                             len(prompt_ids), logprobs)  # fmt: skip
        streams = []
        try:
            for index in range(body.n):
                choice = _Choice(
                    index, StopText(tokenizer, body.stops()), logprobs=None if logprobs is None else []
                )
                response.choices.append(choice)
                streams.append(engine.generate(prompt_ids, body.sampling_params(max_tokens, index)))
            merged = _Merged(streams)
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
        try:
            async for _ in _chunks(response, first, merged):
                pass  # the choices gather their text and logprobs
        finally:
            merged.close()
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


_DONE = object()


class _Merged:
    """(choice index, event) from a response's n request streams as they come. end(i) stops one choice's
    request (a stop string ended it); a reader that stops reading (a client gone) stops them all."""

    def __init__(self, streams: list[AsyncIterator[TokenEvent]]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(index, stream)) for index, stream in enumerate(streams)]
        self._remaining = len(streams)

    async def _pump(self, index: int, stream: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in stream:
                self._queue.put_nowait((index, event))
        except asyncio.CancelledError:
            pass  # ended by end() or close(): leaving the stream aborted its request
        except Exception as error:  # surfaced to the reader
            self._queue.put_nowait((index, error))
        finally:
            self._queue.put_nowait((index, _DONE))

    def __aiter__(self) -> _Merged:
        return self

    async def __anext__(self) -> tuple[int, TokenEvent]:
        try:
            while self._remaining:
                index, item = await self._queue.get()
                if item is _DONE:
                    self._remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    return index, item
        except BaseException:  # an error, or this reader cancelled (a client gone): every request stops
            self.close()
            raise
        raise StopAsyncIteration

    def end(self, index: int) -> None:
        self._tasks[index].cancel()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


async def _chunks(
    response: _Response, first: tuple[int, TokenEvent], merged: _Merged
) -> AsyncIterator[tuple[_Choice, str, dict[str, Any] | None]]:
    """(choice, new text, the token's logprobs entry or None) for each event, the first one given."""

    async def events():
        yield first
        async for item in merged:
            yield item

    async for index, event in events():
        choice = response.choices[index]
        if choice.finish_reason is not None:
            continue  # a stop string ended it: an event already on its way
        choice.tokens += 1
        text, stopped = choice.stops.add(event.token, final=event.finished is not None)
        if stopped:
            choice.finish_reason = "stop"
            merged.end(index)  # its request stops at once, not at max_tokens
        elif event.finished is not None:
            choice.finish_reason = event.finished.finish_reason
        entry = _logprobs_entry(response, choice, event)
        yield choice, text, entry
        if all(c.finish_reason is not None for c in response.choices):
            merged.close()
            return


def _logprobs_entry(response: _Response, choice: _Choice, event: TokenEvent) -> dict[str, Any] | None:
    if response.logprobs is None or event.logprobs is None:
        return None
    entry = response.logprobs.entry(event.token, event.logprobs, choice.token_chars)
    choice.token_chars += len(entry["token"])
    choice.logprobs.append(entry)
    return entry


async def _sse(response: _Response, first, merged: _Merged, include_usage: bool) -> AsyncIterator[str]:
    started = set()
    try:
        async for choice, text, logprobs in _chunks(response, first, merged):
            delta: dict[str, Any]
            if response.chat:
                delta = {"content": text}
                if choice.index not in started:
                    delta["role"] = "assistant"
                    started.add(choice.index)
                entry = {"index": choice.index, "delta": delta}
            else:
                entry = {"index": choice.index, "text": text}
            entry["logprobs"] = None if logprobs is None else response.logprobs.block([logprobs])
            entry["finish_reason"] = choice.finish_reason
            yield _event(response, [entry], usage=None, include_usage=include_usage)
    finally:  # a client that leaves makes Starlette cancel or close this generator: its requests abort
        merged.close()
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
        entry: dict[str, Any] = {"index": choice.index}
        if response.chat:
            entry["message"] = {"role": "assistant", "content": choice.stops.text}
        else:
            entry["text"] = choice.stops.text
        entry["logprobs"] = None if choice.logprobs is None else response.logprobs.block(choice.logprobs)
        entry["finish_reason"] = choice.finish_reason
        choices.append(entry)
    return {"id": response.id, "object": response.kind, "created": response.created, "model": response.model,
            "choices": choices, "usage": response.usage()}  # fmt: skip
