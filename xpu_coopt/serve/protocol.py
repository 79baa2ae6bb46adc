"""The OpenAI requests the server takes (pydantic, as FastAPI reads them) and OpenAI's error object.

Parameters OpenAI defines that xpu_coopt does not run yet (logit_bias, echo, suffix, tools) are refused
with a 400 naming them, never ignored; unknown ones too (extra="forbid")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from xpu_coopt.engine.request import MAX_LOGPROBS, SamplingParams


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # an extension, as vLLM's
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)  # an extension, as vLLM's
    repetition_penalty: float = Field(default=1.0, gt=0.0)  # an extension, as vLLM's
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = []  # an extension, as vLLM's
    seed: int | None = None
    ignore_eos: bool = False  # an extension, as vLLM's
    user: str | None = None  # accepted, unused
    logit_bias: dict[str, float] | None = None  # OpenAI's, refused unless left out (unsupported())

    def unsupported(self) -> str | None:
        """The first parameter set that xpu_coopt does not run yet, or None."""
        return "logit_bias" if self.logit_bias else None

    def logprob_count(self) -> int | None:
        """How many alternatives each token's logprobs list; None: no logprobs."""
        raise NotImplementedError

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
        """The engine's parameters for choice `choice` of n (its seed offset by the choice: n draws)."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else self.seed + choice, stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos, logprobs=self.logprob_count(),
        )  # fmt: skip


class CompletionRequest(_Common):
    prompt: str | list[int]
    echo: Literal[False] = False
    suffix: None = None
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS
    )  # the legacy form: alternatives per token

    def logprob_count(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
