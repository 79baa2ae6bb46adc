"""The engine for an asyncio server: each request's tokens are handed to the event loop as the steps sample
them; a request whose client left is aborted before the next step.

The engine steps elsewhere (engine_core.py: a thread, or a process of its own). The event loop never
waits for a step: it checks a request against the engine's limits, then posts it (or an abort), and the
core hands back each step's events, which go to their requests' streams here."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator

from xpu_coopt.engine.engine import Engine, TokenEvent
from xpu_coopt.engine.request import SamplingParams
from xpu_coopt.serve.engine_core import Message, ProcessCore, ThreadCore
from xpu_coopt.serve.metrics import Metrics


class QueueFull(Exception):
    """More requests wait than the server accepts (--max-waiting)."""


class AsyncEngine:
    """engine: an Engine (stepped in a thread of this process) or a ProcessCore (a process of its own)."""

    def __init__(
        self, engine: Engine | ProcessCore, max_waiting: int, metrics: Metrics | None = None
    ) -> None:
        self.core = ThreadCore(engine) if isinstance(engine, Engine) else engine
        self.limits = self.core.limits
        self.max_waiting = max_waiting
        self.metrics = metrics or Metrics()
        self._ids = itertools.count()
        self._streams_lock = threading.Lock()  # held for single dict operations only
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._running = 0
        self.core.start(self._on_output)

    @property
    def waiting(self) -> int:
        """Requests accepted and not yet running (as of the last step)."""
        return max(0, len(self._streams) - self._running)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """The request's tokens as they come; leaving the iteration early (a client gone) aborts it."""
        self.limits.check(prompt_ids, params)  # ValueError for a bad request, before it is queued
        if self.waiting >= self.max_waiting:
            raise QueueFull(f"{self.max_waiting} requests are waiting already")
        request_id = next(self._ids)
        events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        with self._streams_lock:
            self._streams[request_id] = (asyncio.get_running_loop(), events)
        self.core.post(("add", request_id, list(prompt_ids), params))
        self.metrics.request_added(request_id)
        finished = False
        try:
            while not finished:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                finished = event.finished is not None
                yield event
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: int) -> None:
        with self._streams_lock:
            self._streams.pop(request_id, None)
        self.core.post(("abort", request_id))
        self.metrics.request_ended(request_id)

    def stop(self) -> None:
        """Stops the engine; every request still running ends with an error."""
        self.core.stop()
        self._fail_all("the server is shutting down")

    def _on_output(self, message: Message) -> None:
        """What a step produced (called by the core's thread)."""
        kind = message[0]
        if kind == "events":
            _, events, stats = message
            self._running = stats.running
            self.metrics.step(stats, events)
            for event in events:
                self._deliver(event.request_id, event)
        elif kind == "rejected":
            self._deliver(message[1], ValueError(message[2]))
        else:  # "failed": the step's error ends every request
            self._fail_all(message[1])

    def _deliver(self, request_id: int, item: TokenEvent | BaseException) -> None:
        """Hands an event (or an error) to the request's stream; a finished or failed request's stream goes."""
        with self._streams_lock:
            last = isinstance(item, BaseException) or item.finished is not None
            stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None:
            stream[0].call_soon_threadsafe(stream[1].put_nowait, item)

    def _fail_all(self, message: str) -> None:
        with self._streams_lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            self._deliver(request_id, RuntimeError(message))
