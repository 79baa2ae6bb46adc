"""A decode step's lengths held on the device, so that one captured CUDA graph replays every step.

A graph reads every tensor at the address it was captured with and every Python number as it was then.
So what changes between decode steps (the column each sequence writes, its rotary position, the
segments' lengths, and a paged cache's block rows) lives in device tensors, updated in place before each
step by a few asynchronous fills: no wait for the device. The segments are then passed to the attention
op at full capacity, with segment_lens (docs/ops.md, segment_attention_decode).
"""

from __future__ import annotations

import torch


class DeviceLengths:
    """In-place device tensors of a cache's decode steps: segment_lens int32 [2] (prompt-segment columns,
    response steps), columns and positions int64 [S] (each sequence's write column and rotary position),
    rows int64 [S] (each sequence's write row)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.segment_lens = torch.zeros(2, dtype=torch.int32, device=rows.device)
        self.columns = torch.zeros_like(rows)
        self.positions = torch.zeros_like(rows)
        self.rows = rows.clone()

    def set_step(
        self,
        rows: torch.Tensor,
        column: int,
        prompt_lengths: torch.Tensor,
        step: int,
        prompt_columns: int,
        response_steps: int,
    ) -> None:
        """The next decode step's rows and column to write, positions (each sequence's prompt length plus
        the step) and lengths attended."""
        self.rows.copy_(rows)
        self.columns.fill_(column)
        torch.add(prompt_lengths, step, out=self.positions)
        self.segment_lens[0].fill_(prompt_columns)
        self.segment_lens[1].fill_(response_steps)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a replayed graph reads, by name."""
        return {"segment_lens": self.segment_lens, "columns": self.columns, "positions": self.positions,
                "rows": self.rows}  # fmt: skip
