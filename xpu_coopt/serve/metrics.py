"""The server's Prometheus metrics (prometheus_client), in a registry of their own per server."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("xpu_coopt_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("xpu_coopt_requests_waiting", "Requests waiting to run", registry=r)
        self.kv_blocks_used = Gauge(
            "xpu_coopt_kv_blocks_used", "KV pool blocks held by sequences", registry=r
        )
        self.kv_blocks_total = Gauge("xpu_coopt_kv_blocks_total", "KV pool blocks", registry=r)
        self.requests = Counter("xpu_coopt_requests", "Requests accepted", registry=r)
        self.generated = Counter("xpu_coopt_generated_tokens", "Tokens generated", registry=r)
        self.reused = Counter("xpu_coopt_prefix_cache_reused_tokens", "Prompt tokens taken from the prefix cache",
                              registry=r)  # fmt: skip
        self._reused_seen = 0
        self.ttft = Histogram("xpu_coopt_time_to_first_token_seconds", "Time to a request's first token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("xpu_coopt_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self._added: dict[int, float] = {}
        self._last: dict[int, float] = {}

    def request_added(self, request_id: int) -> None:
        self.requests.inc()
        self._added[request_id] = time.perf_counter()

    def step(self, stats, events) -> None:
        """After a step: the engine's counts (engine_core.StepStats), and each sampled token's latency."""
        now = time.perf_counter()
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_blocks_used.set(stats.used_blocks)
        self.kv_blocks_total.set(stats.num_blocks)
        self.reused.inc(stats.reused_tokens - self._reused_seen)
        self._reused_seen = stats.reused_tokens
        for event in events:
            self.generated.inc()
            last = self._last.get(event.request_id)
            if last is None:
                self.ttft.observe(now - self._added.pop(event.request_id, now))
            else:
                self.itl.observe(now - last)
            if event.finished is None:
                self._last[event.request_id] = now
            else:
                self._last.pop(event.request_id, None)

    def request_ended(self, request_id: int) -> None:
        """An aborted request's timestamps go."""
        self._added.pop(request_id, None)
        self._last.pop(request_id, None)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
