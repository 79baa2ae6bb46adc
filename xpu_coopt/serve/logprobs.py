"""A choice's log-probabilities in OpenAI's two forms: the completions API's parallel lists (tokens,
token_logprobs, top_logprobs, text_offset) and the chat API's list of token entries (token, logprob,
bytes, top_logprobs). A token's text is its own decoding, as vLLM gives it."""

from __future__ import annotations

from typing import Any

from xpu_coopt.engine.request import TokenLogprobs


class LogprobsFormat:
    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self._texts: dict[int, str] = {}

    def entry(self, token: int, logprobs: TokenLogprobs, offset: int) -> dict[str, Any]:
        """One token's entry; offset: where its text starts in the choice's text (the completions form's)."""
        text = self._text(token)
        if self.chat:
            return {"token": text, "logprob": logprobs.logprob, "bytes": list(text.encode()),
                    "top_logprobs": [{"token": self._text(i), "logprob": value, "bytes": list(self._text(i).encode())}
                                     for i, value in logprobs.top]}  # fmt: skip
        top = {self._text(i): value for i, value in logprobs.top}
        return {"token": text, "logprob": logprobs.logprob, "top": top, "offset": offset}

    def block(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """Entries joined into a choice's (or a chunk's) logprobs object."""
        if self.chat:
            return {"content": entries}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries], "text_offset": [e["offset"] for e in entries]}  # fmt: skip

    def _text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token])
        return text
