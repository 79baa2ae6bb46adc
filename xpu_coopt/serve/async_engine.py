"""The engine stepping in a background thread, for an asyncio server: each request's tokens are handed to
the event loop as the steps sample them; a request whose client left is aborted at once."""

from __future__ import annotations

import asyncio
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
        self._lock = threading.Lock()  # the engine is stepped by one thread and fed by the event loop
        self._work = threading.Event()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="xpu-coopt-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """The request's tokens as they come; leaving the iteration early (a client gone) aborts it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        with self._lock:
            if len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are waiting already")
            request_id = self.engine.add_request(prompt_ids, params)  # ValueError for a bad request
            self._streams[request_id] = (loop, queue)
        self.metrics.request_added(request_id)
        self._work.set()
        finished = False
        try:
            while not finished:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                finished = event.finished is not None
                yield event
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: int) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)
        self.metrics.request_ended(request_id)

    def stop(self) -> None:
        """Stops stepping; every request still running ends with an error."""
        self._stopped = True
        self._work.set()
        self._thread.join(timeout=30)
        with self._lock:
            for request_id, (loop, queue) in list(self._streams.items()):
                loop.call_soon_threadsafe(queue.put_nowait, RuntimeError("the server is shutting down"))
                self.engine.abort(request_id)
            self._streams.clear()

    def _loop(self) -> None:
        while not self._stopped:
            self._work.wait()
            with self._lock:
                if not self.engine.has_work:
                    self._work.clear()
                    continue
                try:
                    events = self.engine.step()
                except Exception as error:  # a failed step ends every running request, not the server
                    self._fail_all(error)
                    continue
                self.metrics.step(self.engine, events)
                for event in events:
                    stream = self._streams.get(event.request_id)
                    if stream is not None:
                        stream[0].call_soon_threadsafe(stream[1].put_nowait, event)
                    if event.finished is not None:
                        self._streams.pop(event.request_id, None)

    def _fail_all(self, error: Exception) -> None:
        for request_id, (loop, queue) in list(self._streams.items()):
            loop.call_soon_threadsafe(queue.put_nowait, error)
            self.engine.abort(request_id)
        self._streams.clear()
