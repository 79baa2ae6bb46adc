"""Segment KV cache: the prompt's K/V once per request, the response's K/V per beam.

Layout (R requests, nb beams per request, S = R * nb sequences, P padded prompt length, C response
capacity, Hkv KV heads, D head_dim), per layer (storage.py: no tensor spans layers):
    prompt.storage         K, V [R, Hkv, P, D]  written once at prefill, shared by the request's beams (paged:
                           a pool of blocks, paged.py; under a window on every layer a ring, below)
    response               K, V [S, Hkv, C, D]  row s, column t: the token that sequence slot s generated at step t
    FP8 scales             the same without D, bfloat16: one scale per token and KV head (static scales: each
                           layer's one K or V scale broadcast with zero strides)
and for all layers:
    beam_slots             [S, C] int32: beam_slots[s, t] = the response row that holds step t of sequence s
                           (under a window, a ring: step t in column t % C, below)
    prompt_start           [R] int32: first non-padding prompt position (prompts are left-padded)
    kept_start             [R] int32: the same column in the prompt segment (prompt_start unless a window
                           on every layer dropped the prompt's first columns, below)

Beam reordering gathers rows of beam_slots (integers); no K/V moves. KV memory is proportional to
R * P + S * C, not S * (P + C). generate() asks for max_new_tokens up front; a caller that decodes past
the capacity it asked for grows the cache RESPONSE_STEP columns at a time.

With one beam per request (greedy, sampling, batches) every K/V row is the request's own, so the prompt
segment simply continues with the generated tokens: it holds P + C columns, the response segment none,
and decode attention runs over one segment (half the matmuls and no gather).

With a sliding window on every layer (Mistral's), the prompt's columns before the window of the first
generated token are never read again: the prompt segment keeps only the prompt's last `window - 1` columns
(as transformers' sliding-window cache keeps `window - 1` tokens), so a long prompt takes about a window's
memory. Prefill still attends over the whole prompt (its K/V come from the q/k/v GEMM, not the cache);
the columns it drops are written to a cell no decode step reads before writing it (the first generated
token's column, or one more column kept for them with beams). The prompt segment then holds at most
`window` columns, as a ring (segment_attention_decode, docs/ops.md: column n in cell n % its columns):
with one beam, each generated token takes the cell of the column the window has just let go of, so a
generation of any length holds a window of K/V, as transformers' does. With beams the response segment
is a ring of at most `window` columns too (step t of a row, and its slot in beam_slots, in column
t % columns): every beam then holds a window of K/V, and its request one more for the prompt.

Who does what: the prompt segment's layout (prompt_segment.py, paged.py), the window's rules
(window.py), device-held lengths for CUDA graphs (device_lengths.py), the K/V a PrefixCache keeps
(held.py) and the attention ops over the cache (attention.py) each have their module; this class keeps
a generation's bookkeeping: lengths, write cells, beam reordering, growth.
"""

from __future__ import annotations

import math

import torch

from xpu_coopt.cache.device_lengths import DeviceLengths
from xpu_coopt.cache.held import HeldKV, check_held
from xpu_coopt.cache.paged import PagedPrompt
from xpu_coopt.cache.prompt_segment import ContiguousPrompt, PromptSegment
from xpu_coopt.cache.storage import KVFormat, LayerKV, extend, storage_bytes
from xpu_coopt.cache.window import Window, window_arguments
from xpu_coopt.model.spec import ModelSpec
from xpu_coopt.ops import fp8

RESPONSE_STEP = 16
# optimize(kv_cache=...): how the prompt segment is laid out
KV_CACHE_KINDS = ("segment", "paged")


def _round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


class SegmentKVCache:
    def __init__(
        self,
        spec: ModelSpec,
        prompt_start: torch.Tensor,
        prompt_len: int,
        num_beams: int,
        max_new_tokens: int,
        dtype: torch.dtype,
        kv_dtype: str,
        static_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep_whole_prompt: bool = False,
        kv_cache: str = "segment",
    ) -> None:
        """static_scales: [layers] K and V scales in fp8.SCALE_DTYPE (FP8 only); None: dynamic per-row scales.
        keep_whole_prompt: every prompt column kept, even those a window on every layer has passed (what
        calibration reads). kv_cache: the prompt segment's layout, "segment" (contiguous) or "paged"."""
        if static_scales is not None and not fp8.is_fp8(kv_dtype):
            raise ValueError(f"static KV scales apply to FP8 caches, not kv_dtype={kv_dtype!r}")
        if kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"unknown kv_cache {kv_cache!r}; choose one of {', '.join(KV_CACHE_KINDS)}")
        self.spec = spec
        self.dtype = dtype
        self.kv_dtype = kv_dtype
        self.static_scales = static_scales
        # Each layer's window as the attention ops take it (sliding-window layers attend to their last keys).
        self.windows = window_arguments(spec.layer_windows)
        self.window = Window.of(spec.layer_windows, keep_whole_prompt)
        device = prompt_start.device
        self.num_requests = prompt_start.shape[0]
        self.num_beams = num_beams
        self.num_seqs = self.num_requests * num_beams
        self.single_beam = num_beams == 1
        self.prompt_start = prompt_start.to(torch.int32)
        # Each prompt's first column in the prompt segment, which may have dropped the prompt's first columns.
        self.kept_start = torch.zeros_like(self.prompt_start)
        kv = KVFormat(
            spec.num_layers, spec.num_kv_heads, spec.head_dim, kv_dtype, dtype, device, static_scales
        )
        capacity = _round_up(max_new_tokens, RESPONSE_STEP)
        columns = self._prompt_columns(prompt_len, capacity)
        if kv_cache == "segment":
            columns = self.window.cells(columns)
        self.prompt: PromptSegment = (
            ContiguousPrompt(kv, self.num_requests, columns, self.window)
            if kv_cache == "segment"
            else PagedPrompt(kv, self.num_requests, columns, self.window, self.single_beam)
        )
        response_columns = 0 if self.single_beam else self.window.cells(capacity)
        self.response = kv.allocate(self.num_seqs, response_columns)
        self.beam_slots = torch.zeros((self.num_seqs, response_columns), dtype=torch.int32, device=device)
        self._seq_rows = torch.arange(self.num_seqs, device=device)
        self.lengths: DeviceLengths | None = None  # use_device_lengths(): decode steps suit CUDA graph replay
        self.run_length = 0  # tokens of the decode step under way, where it runs several (begin_token_run)
        self._new_prompt(prompt_len)

    # --- room ----------------------------------------------------------------------------------------

    def _prompt_columns(self, prompt_len: int, new_tokens: int) -> int:
        """Columns of the prompt segment a prompt of prompt_len columns and new_tokens generated tokens need:
        those kept of the prompt, with one beam the new tokens' (the first of which takes prefill's writes
        of the columns not kept), else one for those writes where there are any."""
        dropped = self.window.passed(prompt_len)
        room = new_tokens if self.single_beam else int(dropped > 0)
        return prompt_len - dropped + room

    def _prompt_room(self, prompt_len: int, new_tokens: int) -> int:
        """The room in the prompt segment those columns take (fewer as a ring)."""
        return self.prompt.cells(self._prompt_columns(prompt_len, new_tokens))

    def _wraps(self) -> bool:
        """Whether the generation's segment, the prompt's (one beam) or the response's, is a ring."""
        return self.prompt.is_ring() if self.single_beam else self.window.is_ring(self.response.columns)

    def _generated_room(self) -> float:
        """Tokens a generation can decode before the cache must grow: with one beam the prompt segment's
        columns after the prompt's (the generated tokens follow it there), else the response segment's;
        no end to a ring."""
        if self._wraps():
            return math.inf
        return self.prompt.capacity() - self.kept_columns if self.single_beam else self.response.columns

    def room(self) -> float:
        """Tokens the generation can still decode without growing the cache."""
        return self.capacity - self.response_len

    def fits(self, prompt_start: torch.Tensor, prompt_len: int, num_beams: int, max_new_tokens: int) -> bool:
        """Whether reset() can take a generation of this shape: as many requests and beams, and room for
        its prompt and its max_new_tokens (a paged pool, for their blocks)."""
        if (prompt_start.shape[0], num_beams) != (self.num_requests, self.num_beams):
            return False
        if self._prompt_room(prompt_len, max_new_tokens) > self.prompt.capacity():
            return False
        if not self.single_beam:
            return self.window.cells(max_new_tokens) <= self.response.columns
        if isinstance(self.prompt, PagedPrompt):
            dropped = self.window.passed(prompt_len)
            kept_start = (prompt_start - dropped).clamp(min=0)
            needed = self.prompt.planned_blocks(kept_start, prompt_len - dropped, self.prompt.capacity())
            return needed <= self.prompt.pool_blocks()
        return True

    # --- a generation's lifecycle ----------------------------------------------------------------------

    def _new_prompt(self, prompt_len: int) -> None:
        """Sets the state of a generation over prompt_start's prompts of prompt_len columns, before prefill."""
        device = self.prompt_start.device
        self.prompt_len = prompt_len
        dropped = self.window.passed(prompt_len)
        self.kept_columns = prompt_len - dropped  # the prompt's columns the prompt segment holds
        torch.sub(self.prompt_start, dropped, out=self.kept_start).clamp_(min=0)  # in place: a graph reads it
        # Positions continue from each request's real (unpadded) prompt length.
        self.prompt_lengths = (prompt_len - self.prompt_start.long()).repeat_interleave(self.num_beams)
        self.response_len = 0
        self.prefilled = False
        # Prefill writes every column of the padded batch; those dropped go to the column after the kept
        # ones, which no step reads before writing it (with one beam the first generated token's).
        columns = torch.arange(prompt_len, device=device) - dropped
        columns[:dropped] = self.kept_columns
        rows = torch.arange(self.num_requests, device=device).repeat_interleave(prompt_len)
        self.prefill_cells = self.prompt.map_prompt(
            self.kept_start,
            self.kept_columns,
            rows,
            columns.repeat(self.num_requests),
            self.prompt.capacity(),
        )
        self.capacity = self._generated_room()
        self.prefix: HeldKV | None = None  # continue_from()'s K/V, until prefill

    @torch.inference_mode()
    def reset(self, prompt_start: torch.Tensor, prompt_len: int) -> None:
        """Empties the cache for a new generation that fits() it, to be prefilled next. Every tensor keeps
        its storage, so a decode graph captured over the cache replays the new generation's steps: the new
        prompt starts are copied into the old tensor, and the cells of the last generation are left as
        they are (a step reads only the cells its own generation wrote: the lengths bound it)."""
        if (
            prompt_start.shape != self.prompt_start.shape
            or self._prompt_room(prompt_len, 1) > self.prompt.capacity()
        ):
            raise ValueError(
                f"{prompt_start.shape[0]} prompts of {prompt_len} columns do not fit this cache's "
                f"{self.num_requests} of at most {self.prompt.capacity()}"
            )
        self.prompt_start.copy_(prompt_start)
        self._new_prompt(prompt_len)

    def continue_from(self, held: HeldKV) -> None:
        """Before prefill: the prompt's first held.keys.shape[1] tokens were run by an earlier forward, whose
        K/V these are, as a cache of this one's format stored them (request_kv); prefill then runs the
        rest alone, over them. One unpadded prompt."""
        if self.prefilled or self.num_requests != 1 or bool(self.prompt_start.any()):
            raise ValueError("continue_from() takes one unpadded prompt, before its prefill")
        check_held(held, self.prompt_len, self.prompt.storage[0].k.dtype, self.dynamic_fp8(), self.kv_dtype)
        self.prefix = held

    def prefix_len(self) -> int:
        """The prompt's first tokens whose K/V continue_from() gave (0 without)."""
        return 0 if self.prefix is None else self.prefix.keys.shape[1]

    def end_step(self) -> None:
        if self.prefilled:
            self.response_len += 1
        self.prefilled = True
        self.prefix = None

    def begin_decode_step(self) -> None:
        """Claims column response_len of every slot's own row for the token about to be decoded."""
        if not self.prefilled:
            raise RuntimeError("decode before prefill: the cache holds no prompt")
        self._make_room(1)
        step = self.response_len
        rows, column = self._write_cell(step)
        if not self.single_beam:
            self.beam_slots[:, column] = self._seq_rows.to(torch.int32)
        if self.lengths is None:
            self.decode_cells = (rows, torch.full_like(self._seq_rows, column))
            return
        # In place, as a replayed graph reads them: a few tiny asynchronous fills, no host sync.
        self.lengths.set_step(rows, column, self.prompt_lengths, step, *self._decode_lengths())
        self.decode_cells = (self.lengths.rows, self.lengths.columns)

    def begin_token_run(self, count: int) -> None:
        """Claims the columns of `count` consecutive tokens of the one sequence of a generation with one
        request and one beam, decoded in one step (prompt lookup decoding's check of its drafts: each token
        attends to those before it); end_token_run() then says how many of them stand. The step runs
        eagerly, its lengths on the host: a cache set to device lengths (a decode graph's) takes runs
        between its graph's steps, each of which sets the device lengths anew. Under a window on every layer,
        only while the sequence is within the window (the cache then holds every column, in order)."""
        if not self.prefilled:
            raise RuntimeError("decode before prefill: the cache holds no prompt")
        length = self.prompt_len + self.response_len + count
        if self.num_seqs != 1 or (self.window.span is not None and length > self.window.span):
            raise ValueError(
                "a run of several tokens in one decode step takes a cache of one sequence, within the window "
                f"where every layer has one (here {length} columns, window {self.window.span})"
            )
        self._make_room(count)
        cells = [self._write_cell(step) for step in range(self.response_len, self.response_len + count)]
        self.run_cells = (torch.cat([rows for rows, _ in cells]),
                          torch.tensor([column for _, column in cells], device=self._seq_rows.device))  # fmt: skip
        self.run_length = count

    def run_positions(self) -> torch.Tensor:
        """int64 [run_length]: the rotary positions of begin_token_run()'s tokens (from the host's lengths:
        device lengths are set by decode steps only)."""
        steps = torch.arange(
            self.response_len, self.response_len + self.run_length, device=self._seq_rows.device
        )
        return self.prompt_lengths + steps

    def end_token_run(self, kept: int) -> None:
        """After a begin_token_run() step: its first `kept` tokens stand (their K/V are the sequence's next;
        none where the first was not chosen); the columns of the rest are written again by later steps."""
        if not 0 <= kept <= self.run_length:
            raise ValueError(
                f"a run of {self.run_length} tokens keeps 0 to {self.run_length} of them, not {kept}"
            )
        self.response_len += kept
        self.run_length = 0

    @torch.inference_mode()
    def reorder(self, parents: torch.Tensor, check: bool = True) -> None:
        """parents: int [S], the slot each sequence continues from (within its own request). check=False
        skips verifying that (a wait for the device) when the caller guarantees it, as beam search does."""
        parents = parents.to(device=self.beam_slots.device, dtype=torch.long)
        if parents.shape != (self.num_seqs,):
            raise ValueError(f"parents must hold {self.num_seqs} slots, one per sequence")
        if check and not torch.equal(parents // self.num_beams, self._seq_rows // self.num_beams):
            raise ValueError(f"parents must hold {self.num_seqs} slots, each within its own request's beams")
        done = min(self.response_len, self.beam_slots.shape[1])  # (every column of a ring gone round)
        self.beam_slots[:, :done] = self.beam_slots[parents, :done]

    # --- where tokens go ------------------------------------------------------------------------------

    def _write_cell(self, step: int) -> tuple[torch.Tensor, int]:
        """The rows [S] and the cell within them where each sequence's token of `step` is written: with
        one beam in the prompt segment after the kept prompt, else in the response segment (with beams,
        also its slot in beam_slots)."""
        if self.single_beam:
            return self.prompt.address(self.kept_columns + step)
        column = step % self.response.columns if self._wraps() else step
        return self._seq_rows, column

    def _decode_lengths(self) -> tuple[int, int]:
        """(prompt-segment columns, response steps) the token being decoded attends to, itself included."""
        step = self.response_len
        return (self.kept_columns + step + 1, 0) if self.single_beam else (self.kept_columns, step + 1)

    def decode_lengths(self) -> tuple[int, int]:
        """The decode op's (prompt_len, response_len): the lengths attended, or with device lengths the
        capacities (-1: all the prompt segment holds), the lengths then in lengths.segment_lens."""
        if self.lengths is not None:
            return -1, self.response.columns
        return self._decode_lengths()

    def _make_room(self, count: int) -> None:
        """Grows the cache until `count` more tokens fit (a caller decoding past its max_new_tokens)."""
        while self.response_len + count > self.capacity:
            if self.lengths is not None:
                raise RuntimeError(
                    f"the cache holds {self.capacity} generated tokens and was set to device lengths (a "
                    "captured decode graph): ask for max_new_tokens up front"
                )
            if self.single_beam:
                self.prompt.grow(RESPONSE_STEP)
            else:
                self.response.grow(2, RESPONSE_STEP)
                self.beam_slots = extend(self.beam_slots, 1, RESPONSE_STEP)
            self.capacity = self._generated_room()

    def use_device_lengths(self) -> None:
        """From the next decode step on, every step reads the segments at their full capacity, with the
        write cells, the positions and the segments' lengths held in device tensors updated in place: one
        CUDA graph captured at one step then replays at every later step. The cache no longer grows."""
        self.lengths = DeviceLengths(self._seq_rows)

    def positions(self) -> torch.Tensor:
        """int64 [S]: the rotary position of the token each sequence decodes next (set by
        begin_decode_step() where the lengths live on the device)."""
        if self.lengths is not None:
            return self.lengths.positions
        return self.prompt_lengths + self.response_len

    # --- what it holds ------------------------------------------------------------------------------

    def layer(self, layer: int) -> tuple[LayerKV, LayerKV]:
        """The prompt and response segments' K/V of one layer."""
        return self.prompt.storage[layer], self.response[layer]

    def dynamic_fp8(self) -> bool:
        """Whether each (token, KV head) row is stored with a scale of its own."""
        return fp8.is_fp8(self.kv_dtype) and self.static_scales is None

    def tokens_run(self) -> int:
        """Tokens of request 0 that went through the model, from its prompt's start: the prompt's and, with
        one sequence, every generated token's but the last."""
        return self.prompt_len + (self.response_len if self.num_seqs == 1 else 0)

    def request_cells(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, columns) of the prompt segment holding request 0's columns first .. first + count - 1,
        or None where it no longer holds them all."""
        return self.prompt.request_cells(first, count)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.prompt.tensors(), *self.response.tensors(), self.beam_slots]

    def nbytes(self) -> int:
        """Bytes the cache holds, each storage counted once (broadcast static scales at their real size)."""
        return sum(storage_bytes(self.tensors()).values())

    def largest_allocation(self) -> int:
        """Bytes of the largest single allocation the cache holds: one layer's K or V (or its pool's)."""
        return max(tensor.untyped_storage().nbytes() for tensor in self.tensors())

    def graph_inputs(self) -> dict[str, torch.Tensor]:
        """The tensors a decode step replayed as a CUDA graph reads or writes, by name: the graph holds their
        addresses, so they must keep their storage while it replays."""
        tensors = {f"kv{index}": tensor for index, tensor in enumerate(self.tensors())}
        tensors.update(kept_start=self.kept_start, seq_rows=self._seq_rows)
        if self.lengths is not None:
            tensors.update(self.lengths.tensors())
        return tensors
