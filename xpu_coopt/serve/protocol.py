"""The OpenAI requests the server takes (pydantic, as FastAPI reads them) and OpenAI's error object.

Parameters OpenAI defines that xpu_coopt does not run yet (logprobs, logit_bias, echo, suffix, tools)
are refused with a 400 naming them, never ignored; unknown ones too (extra="forbid")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from xpu_coopt.engine.request import SamplingParams


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
    # OpenAI's, refused unless left at their defaults (unsupported())
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> str | None:
        """The first parameter set that xpu_coopt does not run yet, or None."""
        for name, default in (("logprobs", None), ("top_logprobs", None), ("logit_bias", None)):
            if getattr(self, name) not in (default, False):
                return name
        return None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
        """The engine's parameters for choice `choice` of n (its seed offset by the choice: n draws)."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else self.seed + choice, stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
        )  # fmt: skip


class CompletionRequest(_Common):
    prompt: str | list[int]
    echo: Literal[False] = False
    suffix: None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
