"""The sliding window of every layer, by which a cache lets go of columns no decode step reads again."""

from __future__ import annotations

from dataclasses import dataclass

from xpu_coopt.ops.schema import NO_WINDOW


def window_arguments(layer_windows: tuple[int | None, ...]) -> tuple[int, ...]:
    """Each layer's window as the attention ops take it: NO_WINDOW for full attention."""
    return tuple(NO_WINDOW if window is None else window for window in layer_windows)


@dataclass(frozen=True)
class Window:
    """A window on every layer (the widest, where they differ): each token attends to its last `span`
    columns. span None: some layer attends to every column, so the cache keeps them all."""

    span: int | None

    @classmethod
    def of(cls, layer_windows: tuple[int | None, ...], keep_every_column: bool = False) -> Window:
        keeps_all = keep_every_column or None in layer_windows
        return cls(None if keeps_all else max(layer_windows))

    def passed(self, prompt_len: int) -> int:
        """The prompt's first columns that the window of the first generated token, and so of every later
        one, has passed: never read again (0 without a window)."""
        return 0 if self.span is None else max(0, prompt_len + 1 - self.span)

    def cells(self, columns: int) -> int:
        """The cells a segment of `columns` columns needs: at most a window's, as a ring."""
        return columns if self.span is None else min(columns, self.span)

    def is_ring(self, cells: int) -> bool:
        """Whether a segment of `cells` cells is a ring that every layer's window reads whole: its columns
        then go on past its cells (column n in cell n % cells), and it never needs to grow."""
        return self.span is not None and cells >= self.span
