"""A request's sampling parameters, and the sequence the engine runs for it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch

MAX_LOGPROBS = 20  # alternatives a token's log-probabilities may list (OpenAI's top_logprobs bound)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (vLLM's names). temperature 0: greedy, as generate(do_sample=False).
    With a seed, a request's tokens do not depend on the other requests of its batch."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    min_p: float = 0.0  # tokens under min_p x the likeliest's probability are dropped (sampling)
    repetition_penalty: float = 1.0  # transformers': every prompt or generated token's logit / (or x) it
    presence_penalty: float = 0.0  # OpenAI's: minus this for each token generated at least once
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often each token was generated
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # each token's log-probability and this many likeliest alternatives'

    def __post_init__(self) -> None:
        checks = {
            "max_tokens": isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            "temperature": math.isfinite(self.temperature) and self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": isinstance(self.top_k, int) and self.top_k >= 0,
            "min_p": 0 <= self.min_p <= 1,
            "repetition_penalty": math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            "presence_penalty": -2 <= self.presence_penalty <= 2,
            "frequency_penalty": -2 <= self.frequency_penalty <= 2,
            "logprobs": self.logprobs is None
            or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(
                f"SamplingParams: {values} out of range (max_tokens >= 1, temperature >= 0, 0 < top_p <= 1, "
                f"top_k >= 0, 0 <= min_p <= 1, repetition_penalty > 0, penalties in [-2, 2], logprobs None or in "
                f"[0, {MAX_LOGPROBS}])"
            )


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability under the model's own distribution (before penalties and
    temperature: vLLM's default), and the likeliest tokens' (id, log-probability), likeliest first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens: its prompt, then what it generated. computed: how many of them have their
    K/V in the pool (a preempted sequence starts again from 0 and recomputes them)."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per output token, where asked

    @property
    def penalized(self) -> bool:
        """Whether its logits are changed before the choice (penalties)."""
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending(self) -> int:
        """Tokens whose K/V are still to compute before the next token can be sampled."""
        return self.length - self.computed

    def append(self, token: int) -> None:
        """Adds a sampled token; finishes the sequence on a stop token or at max_tokens."""
        self.output_ids.append(token)
        if token in self.stop_ids:
            self.finish("stop")
        elif len(self.output_ids) >= self.params.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.status, self.finish_reason = Status.FINISHED, reason
