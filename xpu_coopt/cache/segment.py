"""Segment KV cache: the prompt's K/V once per request, the response's K/V per beam.

Layout (L layers, R requests, nb beams per request, S = R * nb sequences, P padded prompt length,
C response capacity, Hkv KV heads, D head_dim):
    prompt_k, prompt_v     [L, R, Hkv, P, D]  written once at prefill, shared by the request's beams (under
                           a window on every layer a ring, below)
    response_k, response_v [L, S, Hkv, C, D]  row s, column t: the token that sequence slot s generated at step t
    *_scale                 same without D, bfloat16 (FP8 caches only: one scale per token and KV head;
                            with static scales, each layer's one K or V scale broadcast with zero strides)
    beam_slots             [S, C] int32: beam_slots[s, t] = the response row that holds step t of sequence s
                           (under a window, a ring: step t in column t % C, below)
    prompt_start           [R] int32: first non-padding prompt position (prompts are left-padded)
    kept_start             [R] int32: the same column in the prompt segment (prompt_start unless a window
                           on every layer dropped the prompt's first columns, below)

Beam reordering gathers rows of beam_slots (integers); no K/V moves. KV memory is proportional to
R * P + S * C, not S * (P + C). The cache grows in steps of RESPONSE_STEP columns when a caller decodes
past the capacity it asked for; generate() asks for max_new_tokens up front.

With one beam per request (greedy, sampling, batches) every K/V row is the request's own, so the prompt
segment simply continues with the generated tokens: prompt_* is [L, R, Hkv, P + C, D], the response
segment is empty, and decode attention runs over one segment (half the matmuls and no gather).

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

PagedKVCache (paged.py) keeps this layout with the prompt segment in blocks allocated as they fill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from xpu_coopt.model.spec import ModelSpec
from xpu_coopt.ops import Ops, fp8
from xpu_coopt.ops.schema import NO_WINDOW

RESPONSE_STEP = 16


@dataclass
class HeldKV:
    """K/V of a run of tokens, taken out of a cache as it stored them (request_kv) to be put back in a
    cache of the same format (continue_from): rotated keys and values [layers, tokens, Hkv, D] in the
    activation dtype or as uint8 FP8 codes, with [layers, tokens, Hkv] bfloat16 scales where each row had
    its own (dynamic FP8; None for 16-bit caches and static scales)."""

    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None

    def _fields(self) -> list[torch.Tensor | None]:
        return [getattr(self, field.name) for field in fields(self)]

    def tensors(self) -> list[torch.Tensor]:
        return [tensor for tensor in self._fields() if tensor is not None]

    def first(self, count: int) -> HeldKV:
        """The first `count` tokens' K/V (views)."""
        return HeldKV(*(None if tensor is None else tensor[:, :count] for tensor in self._fields()))


def _layer_views(tensors: tuple[torch.Tensor | None, ...], layer: int) -> tuple[torch.Tensor | None, ...]:
    """One layer of a segment's (k, v, k_scale, v_scale), in the ops' argument order."""
    return tuple(None if t is None else t[layer] for t in tensors)


def _round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


def extend(tensor: torch.Tensor | None, dim: int, extra: int) -> torch.Tensor | None:
    """`tensor` with `extra` more zero entries along `dim` (a copy); a broadcast view of static scales
    (zero stride there) grows without storage."""
    if tensor is None:
        return None
    if tensor.stride(dim) == 0:
        shape = list(tensor.shape)
        shape[dim] += extra
        return tensor.as_strided(shape, tensor.stride())
    pad_shape = list(tensor.shape)
    pad_shape[dim] = extra
    return torch.cat((tensor, tensor.new_zeros(pad_shape)), dim=dim)


class SegmentKVCache:
    def __init__(
        self,
        spec: ModelSpec,
        ops: Ops,
        prompt_start: torch.Tensor,
        prompt_len: int,
        num_beams: int,
        max_new_tokens: int,
        dtype: torch.dtype,
        kv_dtype: str,
        static_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep_whole_prompt: bool = False,
    ) -> None:
        """static_scales: [layers] K and V scales in fp8.SCALE_DTYPE (FP8 only); None: dynamic per-row scales.
        keep_whole_prompt: every prompt column kept, even those a window on every layer has passed (what
        calibration reads)."""
        if static_scales is not None and not fp8.is_fp8(kv_dtype):
            raise ValueError(f"static KV scales apply to FP8 caches, not kv_dtype={kv_dtype!r}")
        self.spec = spec
        self.ops = ops
        self.kv_dtype = kv_dtype
        self.static_scales = static_scales
        self.dtype = dtype
        # Each layer's window as the attention ops take it (sliding-window layers attend to their last keys).
        self.windows = tuple(NO_WINDOW if window is None else window for window in spec.layer_windows)
        # The window of every layer (the widest), if each has one: no column before it is read again.
        keeps_every_column = keep_whole_prompt or None in spec.layer_windows
        self.common_window = None if keeps_every_column else max(spec.layer_windows)
        device = prompt_start.device
        self.num_requests = prompt_start.shape[0]
        self.num_beams = num_beams
        self.num_seqs = self.num_requests * num_beams
        self.prompt_start = prompt_start.to(torch.int32)
        # Each prompt's first column in the prompt segment, which may have dropped the prompt's first columns.
        self.kept_start = torch.zeros_like(self.prompt_start)

        storage = torch.uint8 if fp8.is_fp8(kv_dtype) else dtype
        layers, heads, dim = spec.num_layers, spec.num_kv_heads, spec.head_dim
        capacity = _round_up(max_new_tokens, RESPONSE_STEP)
        self.single_beam = num_beams == 1
        self.block_table: torch.Tensor | None = None  # a paged prompt segment's (PagedKVCache)
        self._allocate_prompt_segment(self._prompt_room(prompt_len, capacity), storage)
        response_columns = 0 if self.single_beam else self._window_cells(capacity)
        response_shape = (layers, self.num_seqs, heads, response_columns, dim)
        self.response_k = torch.zeros(response_shape, dtype=storage, device=device)
        self.response_v = torch.zeros(response_shape, dtype=storage, device=device)
        self.response_k_scale, self.response_v_scale = self._scales(response_shape)
        self.beam_slots = torch.zeros((self.num_seqs, response_columns), dtype=torch.int32, device=device)
        self._seq_rows = torch.arange(self.num_seqs, device=device)
        self._decode_rows = self._seq_rows  # the rows a decode step writes K/V to, by sequence
        self.segment_lens = None  # set by use_device_lengths(): decode steps then suit CUDA graph replay
        self.run_length = 0  # tokens of the decode step under way, where it runs several (begin_token_run)
        self.decode_graph = None  # the DecodeGraph replaying this cache's decode steps, if any
        self._new_prompt(prompt_len)

    def _allocate_prompt_segment(self, columns: int, storage: torch.dtype) -> None:
        """prompt_k, prompt_v (and scales) with room for `columns` columns per request."""
        spec = self.spec
        shape = (spec.num_layers, self.num_requests, spec.num_kv_heads, columns, spec.head_dim)
        self.prompt_k = torch.zeros(shape, dtype=storage, device=self.prompt_start.device)
        self.prompt_v = torch.zeros(shape, dtype=storage, device=self.prompt_start.device)
        self.prompt_k_scale, self.prompt_v_scale = self._scales(shape)

    def _columns_before_window(self, prompt_len: int) -> int:
        """The prompt's first columns, which the window of the first generated token (and so of every later
        one) has passed: 0 without a window on every layer."""
        if self.common_window is None:
            return 0
        return max(0, prompt_len + 1 - self.common_window)

    def _prompt_room(self, prompt_len: int, new_tokens: int) -> int:
        """Columns of the prompt segment a prompt of prompt_len columns and new_tokens generated tokens need:
        those kept of the prompt, with one beam the new tokens' (the first of which takes prefill's writes
        of the columns not kept), else one for those writes where there are any."""
        dropped = self._columns_before_window(prompt_len)
        room = new_tokens if self.single_beam else int(dropped > 0)
        return self._held_columns(prompt_len - dropped + room)

    def _window_cells(self, columns: int) -> int:
        """The cells a segment of `columns` columns takes: at most a window's, a ring, where every layer
        has one (a decode step reads no column before its window)."""
        return columns if self.common_window is None else min(columns, self.common_window)

    def _held_columns(self, columns: int) -> int:
        """The cells a prompt segment of `columns` columns takes (_window_cells)."""
        return self._window_cells(columns)

    def _is_ring(self, cells: int) -> bool:
        """Whether a segment of `cells` cells is a ring that every layer's window reads whole: its columns
        then go on past its cells (column n in cell n % cells), and it never needs to grow."""
        return self.common_window is not None and cells >= self.common_window

    def _wraps(self) -> bool:
        """Whether the one-beam generation's segment, the prompt's (unless paged) or with beams the
        response's, is a ring (_is_ring)."""
        if self.single_beam:
            return self.block_table is None and self._is_ring(self.prompt_capacity())
        return self._is_ring(self.response_k.shape[3])

    def prompt_capacity(self) -> int:
        """Columns the prompt segment holds per request (with one beam, the response's included)."""
        return self.prompt_k.shape[3]

    def _new_prompt(self, prompt_len: int) -> None:
        """Sets the state of a generation over prompt_start's prompts of prompt_len columns, before prefill."""
        device = self.prompt_start.device
        self.prompt_len = prompt_len
        dropped = self._columns_before_window(prompt_len)
        self.kept_columns = prompt_len - dropped  # the prompt's columns the prompt segment holds
        torch.sub(self.prompt_start, dropped, out=self.kept_start).clamp_(min=0)  # in place: a graph reads it
        # Positions continue from each request's real (unpadded) prompt length.
        self.prompt_lengths = (prompt_len - self.prompt_start.long()).repeat_interleave(self.num_beams)
        self.response_len = 0
        self.prefilled = False
        self.capacity = self._generated_room()
        # Prefill writes every column of the padded batch; those dropped go to the column after the kept
        # ones, which no step reads before writing it (with one beam the first generated token's).
        columns = torch.arange(prompt_len, device=device) - dropped
        columns[:dropped] = self.kept_columns
        self._prompt_rows = torch.arange(self.num_requests, device=device).repeat_interleave(prompt_len)
        self._prompt_columns = columns.repeat(self.num_requests)
        self._prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # continue_from()'s K/V, until prefill

    def _generated_room(self) -> float:
        """Tokens a generation can decode before the cache must grow: with one beam the prompt segment's
        columns after the prompt's (the generated tokens follow it there), else the response segment's;
        no end to a ring."""
        if self._wraps():
            return math.inf
        return self.prompt_capacity() - self.kept_columns if self.single_beam else self.response_k.shape[3]

    def fits(self, num_requests: int, prompt_len: int, num_beams: int, max_new_tokens: int) -> bool:
        """Whether reset() can take a generation of this shape: as many requests and beams, and room for
        its prompt and its max_new_tokens."""
        if (num_requests, num_beams) != (self.num_requests, self.num_beams):
            return False
        if self._prompt_room(prompt_len, max_new_tokens) > self.prompt_capacity():
            return False
        return self.single_beam or self._window_cells(max_new_tokens) <= self.response_k.shape[3]

    @torch.inference_mode()
    def reset(self, prompt_start: torch.Tensor, prompt_len: int) -> None:
        """Empties the cache for a new generation that fits() it, to be prefilled next. Every tensor keeps
        its storage, so a decode graph captured over the cache replays the new generation's steps: the new
        prompt starts are copied into the old tensor, and the cells of the last generation are left as
        they are (a step reads only the cells its own generation wrote: the lengths bound it)."""
        if (
            prompt_start.shape != self.prompt_start.shape
            or self._prompt_room(prompt_len, 1) > self.prompt_capacity()
        ):
            raise ValueError(
                f"{prompt_start.shape[0]} prompts of {prompt_len} columns do not fit this cache's "
                f"{self.num_requests} of at most {self.prompt_capacity()}"
            )
        self.prompt_start.copy_(prompt_start)
        self._new_prompt(prompt_len)

    def graph_inputs(self) -> dict[str, torch.Tensor]:
        """The tensors a decode step replayed as a CUDA graph reads or writes, by attribute: the graph
        holds their addresses, so they must keep their storage while it replays."""
        names = (
            "prompt_k", "prompt_v", "prompt_k_scale", "prompt_v_scale", "response_k", "response_v",
            "response_k_scale", "response_v_scale", "beam_slots", "kept_start", "segment_lens",
            "_decode_columns", "_positions", "_seq_rows", "block_table", "_decode_rows",
        )  # fmt: skip
        return {name: getattr(self, name) for name in names if getattr(self, name, None) is not None}

    def _scales(self, shape: tuple[int, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The K and V scale tensors of a segment shaped `shape` (None for a 16-bit cache)."""
        if not fp8.is_fp8(self.kv_dtype):
            return None, None
        if self.static_scales is not None:  # [layers] -> [layers, rows, heads, columns], no copy
            # Zero strides in every dimension but the layer's, sizes of 1 included (expand() keeps theirs):
            # extend() then grows the view without storage.
            return tuple(
                scale.as_strided(shape[:-1], (scale.stride(0), 0, 0, 0)) for scale in self.static_scales
            )
        return tuple(
            torch.ones(shape[:-1], dtype=fp8.SCALE_DTYPE, device=self.prompt_start.device) for _ in "kv"
        )

    def use_device_lengths(self) -> None:
        """From the next decode step on, every step reads the segments at their full capacity, with the
        write column, the positions and the segments' lengths held in device tensors updated in place: one
        CUDA graph captured at one step then replays at every later step. The cache no longer grows."""
        device = self._seq_rows.device
        self.segment_lens = torch.zeros(2, dtype=torch.int32, device=device)
        self._decode_columns = torch.zeros_like(self._seq_rows)
        self._positions = torch.zeros_like(self.prompt_lengths)

    def positions(self) -> torch.Tensor:
        """int64 [S]: the rotary position of the token each sequence decodes next."""
        if self.segment_lens is not None:
            return self._positions
        return self.prompt_lengths + self.response_len

    def begin_decode_step(self) -> None:
        """Claims column response_len of every slot's own row for the token about to be decoded."""
        if not self.prefilled:
            raise RuntimeError("decode before prefill: the cache holds no prompt")
        if self.response_len == self.capacity:
            if self.segment_lens is not None:
                raise RuntimeError(
                    f"the cache holds {self.capacity} generated tokens and was set to device lengths "
                    "(a captured decode graph): ask for max_new_tokens up front"
                )
            self._grow()
        step = self.response_len
        column = self._write_column(step)
        if not self.single_beam:
            self.beam_slots[:, column] = self._seq_rows.to(torch.int32)
        if self.segment_lens is None:
            self._decode_columns = torch.full_like(self._seq_rows, column)
            return
        # In place, as a replayed graph reads them: a few tiny asynchronous fills, no host sync.
        self._decode_columns.fill_(column)
        torch.add(self.prompt_lengths, step, out=self._positions)
        prompt_columns, response_steps = self._decode_lengths()
        self.segment_lens[0].fill_(prompt_columns)
        self.segment_lens[1].fill_(response_steps)

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
        if self.num_seqs != 1 or (self.common_window is not None and length > self.common_window):
            raise ValueError(
                "a run of several tokens in one decode step takes a cache of one sequence, within the window "
                f"where every layer has one (here {length} columns, window {self.common_window})"
            )
        while self.response_len + count > self.capacity:
            if self.segment_lens is not None:
                raise RuntimeError(
                    f"the cache holds {self.capacity} generated tokens and was set to device lengths (a "
                    "captured decode graph): ask for max_new_tokens up front"
                )
            self._grow()
        rows, columns = [], []
        for step in range(self.response_len, self.response_len + count):
            columns.append(self._write_column(step))
            # A copy: with device lengths a paged cache updates its decode rows in place.
            rows.append(self._decode_rows.clone())
        self._run_rows = torch.cat(rows)
        self._run_columns = torch.tensor(columns, device=self._run_rows.device)
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

    def _write_column(self, step: int) -> int:
        """The column of its row (self._decode_rows) where each sequence's token of `step` is written (with
        beams, also its slot's in beam_slots)."""
        column = self.kept_columns + step if self.single_beam else step
        if not self._wraps():
            return column
        return column % (self.prompt_capacity() if self.single_beam else self.response_k.shape[3])

    def _decode_lengths(self) -> tuple[int, int]:
        """(prompt-segment columns, response steps) the token being decoded attends to, itself included."""
        step = self.response_len
        return (self.kept_columns + step + 1, 0) if self.single_beam else (self.kept_columns, step + 1)

    def end_step(self) -> None:
        if self.prefilled:
            self.response_len += 1
        self.prefilled = True
        self._prefix = None

    def continue_from(self, held: HeldKV) -> None:
        """Before prefill: the prompt's first held.keys.shape[1] tokens were run by an earlier forward, whose
        K/V these are, as a cache of this one's format stored them (request_kv); prefill then runs the
        rest alone, over them. One unpadded prompt."""
        if self.prefilled or self.num_requests != 1 or bool(self.prompt_start.any()):
            raise ValueError("continue_from() takes one unpadded prompt, before its prefill")
        keys, values = held.keys, held.values
        if not 0 < keys.shape[1] < self.prompt_len or values.shape != keys.shape:
            raise ValueError(
                f"continue_from() takes K/V of 1 to {self.prompt_len - 1} of the prompt's {self.prompt_len} "
                f"tokens, got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if keys.dtype != self.prompt_k.dtype or (held.key_scales is not None) != self._dynamic_fp8():
            raise ValueError(f"continue_from() takes K/V stored as this cache stores them ({self.kv_dtype})")
        self._prefix = held

    def prefix_len(self) -> int:
        """The prompt's first tokens whose K/V continue_from() gave (0 without)."""
        return 0 if self._prefix is None else self._prefix.keys.shape[1]

    def _dynamic_fp8(self) -> bool:
        """Whether each (token, KV head) row is stored with a scale of its own."""
        return fp8.is_fp8(self.kv_dtype) and self.static_scales is None

    @torch.inference_mode()
    def request_kv(self, count: int) -> HeldKV | None:
        """The first `count` K/V the prompt segment holds of request 0 from its prompt's start (with one
        beam, its generated tokens' follow), as stored: the activation dtype, or FP8 codes with their
        dynamic scales (none with static scales, which are the model's). None where the cache no longer
        holds them all: a window on every layer let go of the first, or a ring wrapped over them."""
        start = int(self.kept_start[0])  # the prompt's first token's column
        dropped_tokens = self._columns_before_window(self.prompt_len) > int(self.prompt_start[0])
        if dropped_tokens or (self._wraps() and start + count > self.prompt_capacity()):
            return None
        cells = self._request_cells(start, count)
        if cells is None:
            return None
        rows, columns = cells
        scales = (self.prompt_k_scale, self.prompt_v_scale) if self._dynamic_fp8() else (None, None)
        # tensor[:, rows, :, columns]: [count, layers, Hkv(, D)], the indexed dimension first
        held = [
            None if tensor is None else tensor[:, rows, :, columns].transpose(0, 1).contiguous()
            for tensor in (self.prompt_k, self.prompt_v, *scales)
        ]
        return HeldKV(*held)

    def _request_cells(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, columns) of the prompt segment holding request 0's columns first .. first + count - 1."""
        columns = torch.arange(first, first + count, device=self.prompt_k.device)
        return torch.zeros_like(columns), columns

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

    def _grow(self) -> None:
        """RESPONSE_STEP more columns for generated tokens (a segment this makes a ring as wide as the window
        wraps from then on, and keeps the columns it holds in their cells)."""
        if self.single_beam:
            names = ("prompt_k", "prompt_v", "prompt_k_scale", "prompt_v_scale")
        else:
            names = ("response_k", "response_v", "response_k_scale", "response_v_scale", "beam_slots")
        for name in names:
            setattr(self, name, extend(getattr(self, name), 3 if name != "beam_slots" else 1, RESPONSE_STEP))
        self.capacity = self._generated_room()

    def nbytes(self) -> int:
        tensors = (
            self.prompt_k, self.prompt_v, self.prompt_k_scale, self.prompt_v_scale,
            self.response_k, self.response_v, self.response_k_scale, self.response_v_scale,
            self.beam_slots, self.block_table,
        )  # fmt: skip
        # By storage: broadcast static scales count once, at their real size.
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None
        }
        return sum(storages.values())

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos_sin: torch.Tensor
    ) -> torch.Tensor:
        """query [T, H, D], key/value [T, Hkv, D] for T tokens (R * P at prefill, S at decode);
        cos_sin [T, D]: each token's rotary [cos | sin] row in the activation dtype.

        Rotates query and key, writes K/V into this layer's segment, returns attention output [T, H * D].
        """
        if self.run_length:
            return self._attend_token_run(layer, query, key, value, cos_sin)
        if self.prefilled:
            return self._attend_decode(layer, query, key, value, cos_sin)
        return self._attend_prefill(layer, query, key, value, cos_sin)

    def _prompt_segment(self, layer: int) -> tuple[torch.Tensor | None, ...]:
        return _layer_views((self.prompt_k, self.prompt_v, self.prompt_k_scale, self.prompt_v_scale), layer)

    def _response_segment(self, layer: int) -> tuple[torch.Tensor | None, ...]:
        tensors = (self.response_k, self.response_v, self.response_k_scale, self.response_v_scale)
        return _layer_views(tensors, layer)

    def _attend_prefill(self, layer, query, key, value, cos_sin) -> torch.Tensor:
        """The prompt's tokens (those after continue_from()'s, if any) attend to the whole prompt."""
        kernels = self.ops.kernels
        segment, static = self._prompt_segment(layer), self.static_scales is not None
        reused = self.prefix_len()
        rows, columns = self._prompt_rows, self._prompt_columns
        if reused:  # one prompt: its first `reused` columns come from continue_from()
            prefix_k, prefix_v = self._write_prefix(layer, segment, rows[:reused], columns[:reused])
            rows, columns = rows[reused:], columns[reused:]
        kernels.rotary_embedding_kv_write(
            query, key, value, cos_sin, *segment, rows, columns, self.kv_dtype, static
        )  # fmt: skip
        if reused:
            key, value = torch.cat((prefix_k, key)), torch.cat((prefix_v, value))
        batch, queries, length = self.num_requests, self.prompt_len - reused, self.prompt_len
        out = query.new_empty((batch, queries, query.shape[1], query.shape[2]))
        kernels.attention_prefill(
            out,
            query.view(batch, queries, *query.shape[1:]),
            key.view(batch, length, *key.shape[1:]),
            value.view(batch, length, *value.shape[1:]),
            self.prompt_start,
            self.spec.attention_scale,
            self.windows[layer],
        )
        return out.view(batch * queries, -1)

    def _write_prefix(
        self, layer: int, segment: tuple[torch.Tensor | None, ...], rows: torch.Tensor, columns: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies continue_from()'s K/V of this layer into the prompt segment's cells as they were held (FP8
        codes and scales alike: no encoding again), and returns them in the activation dtype, [T, Hkv, D],
        for the new tokens to attend to."""
        held = self._prefix
        decoded = []
        for cache, scale, values, scales in zip(
            segment[:2],
            segment[2:],
            (held.keys, held.values),
            (held.key_scales, held.value_scales),
            strict=True,
        ):
            cache[rows, :, columns] = values[layer]
            if scales is not None:
                scale[rows, :, columns] = scales[layer]
            # static scales are read where the cache broadcasts them
            decoded.append(self._in_activation_dtype(values[layer], scale, rows, columns))
        return decoded[0], decoded[1]

    def _attend_token_run(self, layer, query, key, value, cos_sin) -> torch.Tensor:
        """begin_token_run()'s tokens: written into their columns, then attending to every column up to
        their own, as a prefill's last queries (attention_prefill with more key columns than queries)."""
        kernels = self.ops.kernels
        segment = self._prompt_segment(layer)
        kernels.rotary_embedding_kv_write(
            query, key, value, cos_sin, *segment, self._run_rows, self._run_columns, self.kv_dtype,
            self.static_scales is not None,
        )  # fmt: skip
        count, length = self.run_length, self.kept_columns + self.response_len + self.run_length
        keys, values = self._read_cells(segment, *self._request_cells(0, length))
        out = query.new_empty((1, count, query.shape[1], query.shape[2]))
        kernels.attention_prefill(
            out,
            query.view(1, count, *query.shape[1:]),
            keys.view(1, length, *keys.shape[1:]),
            values.view(1, length, *values.shape[1:]),
            self.prompt_start,
            self.spec.attention_scale,
            self.windows[layer],
        )
        return out.view(count, -1)

    def _read_cells(
        self, segment: tuple[torch.Tensor | None, ...], rows: torch.Tensor, columns: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a layer's cells (rows, columns) in the activation dtype, [cells, Hkv, D]: FP8 codes
        decoded with their scales."""
        keys, values = (
            self._in_activation_dtype(cache[rows, :, columns], scale, rows, columns)
            for cache, scale in zip(segment[:2], segment[2:], strict=True)
        )
        return keys, values

    def _in_activation_dtype(
        self, cells: torch.Tensor, scale: torch.Tensor | None, rows: torch.Tensor, columns: torch.Tensor
    ) -> torch.Tensor:
        """K or V as the cells (rows, columns) of a segment store them, in the activation dtype: FP8 codes
        decoded with the cells' scales (`scale`, the segment's; None for a 16-bit cache, whose are returned
        as they are)."""
        if scale is None:
            return cells
        return fp8.decode(cells, scale[rows, :, columns], self.kv_dtype, self.dtype)

    def _attend_decode(self, layer, query, key, value, cos_sin) -> torch.Tensor:
        kernels = self.ops.kernels
        prompt, response = self._prompt_segment(layer), self._response_segment(layer)
        # One beam per request: one segment holds prompt and response, attended as the prompt segment.
        written = prompt if self.single_beam else response
        prompt_columns, response_len = self._decode_lengths()
        if self.segment_lens is not None:  # the lengths live in segment_lens: pass the capacities
            prompt_columns, response_len = -1, self.response_k.shape[3]
        kernels.rotary_embedding_kv_write(
            query, key, value, cos_sin, *written, self._decode_rows, self._decode_columns, self.kv_dtype,
            self.static_scales is not None,
        )  # fmt: skip
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        kernels.segment_attention_decode(
            out, query, *prompt, self.kept_start, *response, self.beam_slots, response_len,
            self.spec.attention_scale, self.kv_dtype, self.segment_lens, self.block_table, prompt_columns,
            self.windows[layer],
        )  # fmt: skip
        return out.view(query.shape[0], -1)
