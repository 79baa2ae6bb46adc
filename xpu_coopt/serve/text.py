"""A choice's text as its tokens come: detokenized incrementally (each token decoded with a few before it,
as TGI and vLLM do, so a step costs the same at token 10 and at token 2,000; a character split over
tokens comes out whole), cut at the first stop string, and given out only where no stop string could still
begin (the text held back is at most the longest stop string less one character)."""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"  # what a tokenizer decodes a character's first bytes to


class StopText:
    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [stop for stop in stops if stop]
        self.hold = max((len(stop) - 1 for stop in self.stops), default=0)
        self.tokens: list[int] = []
        self.text = ""  # the text so far, cut at a stop string once one appears
        self.sent = 0  # characters of it given out
        self._prefix = 0  # tokens [_prefix:_read] decoded before the new ones give the context they join
        self._read = 0

    def add(self, token: int, final: bool) -> tuple[str, bool]:
        """(text newly safe to give out, whether a stop string ended the choice)."""
        self.tokens.append(token)
        searched = max(0, len(self.text) - self.hold)  # a stop string may straddle the old text and the new
        self.text += self._new_text(final)
        found = [at for at in (self.text.find(stop, searched) for stop in self.stops) if at >= 0]
        if found:
            self.text = self.text[: min(found)]
            return self._release(len(self.text)), True
        return self._release(len(self.text) if final else len(self.text) - self.hold), False

    def _new_text(self, final: bool) -> str:
        """The text the tokens since _read add, once they end on a whole character (or the choice ends)."""
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.tokens[self._prefix :], skip_special_tokens=True)
        if not final and (len(after) <= len(before) or after.endswith(INCOMPLETE)):
            return ""  # a character's first bytes: wait for the rest
        self._prefix, self._read = self._read, len(self.tokens)
        return after[len(before) :]

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = self.text[self.sent : upto]
        self.sent = upto
        return piece
