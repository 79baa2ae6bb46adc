"""Where the engine steps for a server: a thread of the server's process (ThreadCore) or a process of its
own (ProcessCore, as vLLM's engine core), so that stepping and the event loop do not share the GIL.

Both run the same EngineLoop. It takes messages, ("add", id, prompt_ids, params) and ("abort", id),
between steps, and emits what each step produced: ("events", [TokenEvent], StepStats), or
("failed", message) when a step raised (every running request then ends with that error), or
("rejected", id, message) for a request the engine refused."""

from __future__ import annotations

import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xpu_coopt.engine.engine import Engine, EngineLimits

Message = tuple
Emit = Callable[[Message], None]
# An idle rank 0 shares an empty list this often: the other ranks' collectives never wait long enough to
# time out.
HEARTBEAT_SECONDS = 1.0


@dataclass(frozen=True)
class StepStats:
    """The engine's state after a step, for the server's metrics."""

    running: int
    waiting: int
    used_blocks: int
    num_blocks: int
    reused_tokens: int  # prompt tokens taken from the prefix cache so far


class EngineLoop:
    """Steps the engine while it has work; between steps, applies the messages received. receive(block)
    returns the messages waiting (blocking for one when block is true), or None once told to stop."""

    def __init__(self, engine: Engine, receive: Callable[[bool], list[Message] | None], emit: Emit) -> None:
        self.engine = engine
        self.receive = receive
        self.emit = emit

    def run(self) -> None:
        while True:
            messages = self.receive(not self.engine.has_work)
            if messages is None:
                return
            for message in messages:
                self._apply(message)
            if self.engine.has_work:
                self._step()
            elif messages:  # aborts emptied the engine: no step will report its state
                self.emit(("events", [], self._stats()))

    def _apply(self, message: Message) -> None:
        if message[0] == "abort":
            self.engine.abort(message[1])
            return
        _, request_id, prompt_ids, params = message
        try:
            self.engine.add_request(prompt_ids, params, request_id)
        except ValueError as error:  # checked on arrival already; reported to its stream all the same
            self.emit(("rejected", request_id, str(error)))

    def _step(self) -> None:
        engine = self.engine
        try:
            events = engine.step()
        except Exception as error:  # a failed step ends every running request, not the server
            for sequence in [*engine.scheduler.running, *engine.scheduler.waiting]:
                engine.abort(sequence.id)
            self.emit(("failed", f"{type(error).__name__}: {error}"))
            return
        self.emit(("events", events, self._stats()))

    def _stats(self) -> StepStats:
        scheduler, blocks = self.engine.scheduler, self.engine.blocks
        return StepStats(len(scheduler.running), len(scheduler.waiting), blocks.used_blocks, blocks.num_blocks,
                         scheduler.reused_tokens)  # fmt: skip


class ThreadCore:
    """The engine stepping in a thread of this process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.limits = engine.limits
        self._inbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, emit: Emit) -> None:
        loop = EngineLoop(self.engine, self._receive, emit)
        self._thread = threading.Thread(target=loop.run, name="xpu-coopt-engine", daemon=True)
        self._thread.start()

    def post(self, message: Message) -> None:
        self._inbox.put(message)

    def stop(self) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _receive(self, block: bool) -> list[Message] | None:
        messages = []
        try:
            messages.append(self._inbox.get(block=block))
            while True:
                messages.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return None if None in messages else messages


class ProcessCore:
    """The engine stepping in a process of its own. build() runs there and returns (engine, tokenizer);
    the tokenizer comes back to this process (self.tokenizer), the model never does. The constructor
    waits until the engine is built, and raises RuntimeError with the child's message if that failed."""

    def __init__(self, build: Callable[[], tuple[Engine, Any]], startup_timeout: float = 3600) -> None:
        context = multiprocessing.get_context("spawn")  # torch's threads and locks do not survive a fork
        self._connection, child_end = context.Pipe()
        self._process = context.Process(target=_process_main, args=(build, child_end), name="xpu-coopt-engine",
                                        daemon=True)  # fmt: skip
        self._process.start()
        child_end.close()
        ready = self._first_message(startup_timeout)
        if ready[0] != "ready":
            self._process.join(timeout=30)
            raise RuntimeError(f"the engine process failed to start: {ready[1]}")
        self.limits: EngineLimits = ready[1]
        self.tokenizer = ready[2]
        self._outbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()

    def start(self, emit: Emit) -> None:
        # the event loop posts without waiting on the pipe; one thread sends, one receives
        for target, args in ((self._send, ()), (self._receive, (emit,))):
            threading.Thread(target=target, args=args, name="xpu-coopt-engine-pipe", daemon=True).start()

    def post(self, message: Message) -> None:
        self._outbox.put(message)

    def stop(self) -> None:
        self._outbox.put(None)
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)

    def _first_message(self, timeout: float) -> Message:
        waited = 0.0
        while not self._connection.poll(1.0):
            waited += 1.0
            if not self._process.is_alive():
                return ("failed", f"it exited with status {self._process.exitcode}")
            if waited >= timeout:
                self._process.terminate()
                return ("failed", f"not ready after {timeout:.0f} s")
        return self._connection.recv()

    def _send(self) -> None:
        while True:
            message = self._outbox.get()
            try:
                self._connection.send(message)
            except OSError:  # the engine process is gone; the receiver reports it
                return
            if message is None:
                return

    def _receive(self, emit: Emit) -> None:
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                if self._process.exitcode not in (None, 0):
                    emit(("failed", f"the engine process exited with status {self._process.exitcode}"))
                return
            emit(message)


def _process_main(build: Callable[[], tuple[Engine, Any]], connection) -> None:
    """The engine process: builds the engine, says it is ready, then steps until told to stop or until the
    server's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the server, which stops this process
    try:
        engine, tokenizer = build()
    except Exception as error:
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", engine.limits, tokenizer))
    parallel = engine.model.decoder.parallel
    if parallel is None:
        EngineLoop(engine, _pipe_receiver(connection, None), connection.send).run()
        return
    # Tensor parallelism: this process is rank 0's engine; the other ranks step theirs in step with it.
    receive = _pipe_receiver(connection, HEARTBEAT_SECONDS)
    EngineLoop(engine, lambda block: parallel.share(receive(block)), connection.send).run()


def run_follower(engine: Engine) -> None:
    """A rank other than 0 under tensor parallelism: applies the messages rank 0's engine shares each
    iteration (none when idle: a heartbeat) and steps with it, emitting nothing, until rank 0 stops."""
    parallel = engine.model.decoder.parallel
    EngineLoop(engine, lambda block: parallel.share(None), lambda message: None).run()


def _pipe_receiver(connection, wait: float | None) -> Callable[[bool], list[Message] | None]:
    """receive(block) over the pipe: the messages waiting; when blocking, the first waited for up to
    `wait` seconds (forever for None); None once told to stop or when the server's end closes."""

    def receive(block: bool) -> list[Message] | None:
        messages = []
        try:
            if connection.poll(wait if block else 0):
                messages.append(connection.recv())
            while connection.poll():
                messages.append(connection.recv())
        except EOFError:  # the server is gone
            return None
        return None if None in messages else messages

    return receive
