"""Where a request's prompt-segment column lives: the two layouts of the segment cache's prompt segment.

ContiguousPrompt holds each request's columns in a row of its own ([R, Hkv, columns, D] per layer);
PagedPrompt (paged.py) in blocks of a shared pool, through a block table. SegmentKVCache asks either the
same questions (PromptSegment), so the cache's bookkeeping is one code for both.
"""

from __future__ import annotations

from typing import Protocol

import torch

from xpu_coopt.cache.storage import KVFormat, KVStorage
from xpu_coopt.cache.window import Window


class PromptSegment(Protocol):
    storage: KVStorage  # the K/V the decode op reads as its prompt segment
    block_table: torch.Tensor | None  # int32 [R, blocks] where paged

    def capacity(self) -> int:
        """Columns a request can hold."""

    def cells(self, columns: int) -> int:
        """Columns of room needed to hold a request's `columns` columns (fewer as a ring)."""

    def is_ring(self) -> bool:
        """Whether columns go on past the capacity, column n in cell n % capacity."""

    def map_prompt(self, kept_start: torch.Tensor, kept_columns: int, rows: torch.Tensor, columns: torch.Tensor,
                   plan_columns: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Lays out a new generation's prompts (each kept from its column kept_start[r]): the cells
        (rows, columns) that the prefill's writes to (request rows, columns) go to. plan_columns: the
        columns a request may come to hold, which a pool must have room for."""

    def address(self, column: int) -> tuple[torch.Tensor, int]:
        """The rows [R] and the cell within them of each request's column `column`."""

    def request_cells(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, columns) of request 0's columns first .. first + count - 1; None where it no longer
        holds them all."""

    def grow(self, columns: int) -> None:
        """Room for `columns` more columns a request."""

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it holds."""


class ContiguousPrompt:
    """Each request's prompt-segment columns in a row of their own. Under a window on every layer, a row
    at least the window wide is a ring: column n in cell n % its columns."""

    block_table = None

    def __init__(self, kv: KVFormat, requests: int, columns: int, window: Window) -> None:
        self.storage = kv.allocate(requests, columns)
        self.window = window
        self._requests = torch.arange(requests, device=kv.device)

    def capacity(self) -> int:
        return self.storage.columns

    def cells(self, columns: int) -> int:
        return self.window.cells(columns)

    def is_ring(self) -> bool:
        return self.window.is_ring(self.capacity())

    def map_prompt(self, kept_start: torch.Tensor, kept_columns: int, rows: torch.Tensor, columns: torch.Tensor,
                   plan_columns: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        return rows, columns

    def address(self, column: int) -> tuple[torch.Tensor, int]:
        return self._requests, column % self.capacity() if self.is_ring() else column

    def request_cells(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.is_ring() and first + count > self.capacity():
            return None  # the ring has gone over the first of them
        columns = torch.arange(first, first + count, device=self._requests.device)
        return torch.zeros_like(columns), columns

    def grow(self, columns: int) -> None:
        self.storage.grow(2, columns)

    def tensors(self) -> list[torch.Tensor]:
        return self.storage.tensors()
