"""A choice's text as its tokens come: detokenized as a whole (multi-byte characters split over tokens
come out whole), cut at the first stop string, and given out only where no stop string could still
begin (the text held back is at most the longest stop string less one character)."""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"  # what a tokenizer decodes a character's first bytes to


class StopText:
    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [stop for stop in stops if stop]
        self.tokens: list[int] = []
        self.text = ""  # the text so far, cut at a stop string once one appears
        self.sent = 0  # characters of it given out

    def add(self, token: int, final: bool) -> tuple[str, bool]:
        """(text newly safe to give out, whether a stop string ended the choice)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                self.text = text[:at]
                return self._release(len(self.text)), True
        self.text = text
        if final:
            return self._release(len(text)), False
        hold = max((len(stop) - 1 for stop in self.stops), default=0)
        safe = len(text) - hold
        while safe > self.sent and text[safe - 1] == INCOMPLETE:
            safe -= 1
        return self._release(safe), False

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = self.text[self.sent : upto]
        self.sent = upto
        return piece
