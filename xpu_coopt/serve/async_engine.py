"""The engine stepping in a background thread, for an asyncio server: each request's tokens are handed to
the event loop as the steps sample them; a request whose client left is aborted before the next step.

The event loop never waits for a step: it checks a request, then posts it (or an abort) to an inbox that
the engine thread empties between steps, so a step of many seconds cannot stall the server's other clients."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator

from xpu_coopt.engine.engine import Engine, TokenEvent
from xpu_coopt.engine.request import SamplingParams
from xpu_coopt.serve.metrics import Metrics


class QueueFull(Exception):
    """More requests wait than the server accepts (--max-waiting)."""


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics or Metrics()
        self._ids = itertools.count()
        # ("add", id, prompt, params) or ("abort", id), emptied by the engine thread between steps
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._work = threading.Event()
        self._streams_lock = threading.Lock()  # held for single dict operations only, never over a step
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="xpu-coopt-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests accepted and not yet running (an estimate while the engine thread steps)."""
        return max(0, len(self._streams) - len(self.engine.scheduler.running))

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """The request's tokens as they come; leaving the iteration early (a client gone) aborts it."""
        self.engine.check_request(prompt_ids, params)  # ValueError for a bad request, before it is queued
        if self.waiting >= self.max_waiting:
            raise QueueFull(f"{self.max_waiting} requests are waiting already")
        request_id = next(self._ids)
        events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        with self._streams_lock:
            self._streams[request_id] = (asyncio.get_running_loop(), events)
        self._post(("add", request_id, list(prompt_ids), params))
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
        self._post(("abort", request_id))
        self.metrics.request_ended(request_id)

    def stop(self) -> None:
        """Stops stepping; every request still running ends with an error."""
        self._stopped = True
        self._work.set()
        self._thread.join(timeout=30)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _post(self, message: tuple) -> None:
        self._inbox.put(message)
        self._work.set()

    def _loop(self) -> None:
        while not self._stopped:
            self._work.wait()
            self._work.clear()  # before the inbox is read: a message posted later sets it again
            self._take_inbox()
            while self.engine.has_work and not self._stopped:
                self._step()
                self._take_inbox()

    def _take_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "abort":
                self.engine.abort(message[1])
                continue
            _, request_id, prompt_ids, params = message
            try:
                self.engine.add_request(prompt_ids, params, request_id)
            except ValueError as error:  # checked on arrival already; delivered to its stream all the same
                self._deliver(request_id, error)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as error:  # a failed step ends every running request, not the server
            self._fail_all(error)
            return
        self.metrics.step(self.engine, events)
        for event in events:
            self._deliver(event.request_id, event)

    def _deliver(self, request_id: int, item: TokenEvent | BaseException) -> None:
        """Hands an event (or an error) to the request's stream; a finished or failed request's stream goes."""
        with self._streams_lock:
            last = isinstance(item, BaseException) or item.finished is not None
            stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is not None:
            stream[0].call_soon_threadsafe(stream[1].put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        with self._streams_lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            self._deliver(request_id, error)
            self.engine.abort(request_id)
