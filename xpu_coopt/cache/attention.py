"""Attention over a segment cache: which op runs for a step, over which cells, read from the cache's state.

The decoder calls attend() once per layer. A prefill writes the prompts' K/V into the prompt segment and
attends over the prompts themselves (attention_prefill); a decode step writes each sequence's new K/V
and attends over both segments (segment_attention_decode); a run of several tokens of one sequence
(prompt lookup's drafts) writes them and attends over the cells read back (attention_prefill with more
key columns than queries).
"""

from __future__ import annotations

import torch

from xpu_coopt.cache.segment import SegmentKVCache
from xpu_coopt.cache.storage import LayerKV
from xpu_coopt.ops import Ops, fp8


def attend(
    ops: Ops,
    cache: SegmentKVCache,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin: torch.Tensor,
) -> torch.Tensor:
    """query [T, H, D], key/value [T, Hkv, D] for T tokens (R * P at prefill, S at decode, the run's at a
    token run); cos_sin [T, D]: each token's rotary [cos | sin] row in the activation dtype.

    Rotates query and key, writes K/V into this layer's cells, returns attention output [T, H * D].
    """
    if type(cache) is not SegmentKVCache:  # the serving engine's ragged step (engine/step_batch.py)
        return cache.attend(ops, layer, query, key, value, cos_sin)
    if cache.run_length:
        return _attend_token_run(ops, cache, layer, query, key, value, cos_sin)
    if cache.prefilled:
        return _attend_decode(ops, cache, layer, query, key, value, cos_sin)
    return _attend_prefill(ops, cache, layer, query, key, value, cos_sin)


def _write(ops: Ops, cache: SegmentKVCache, kv: LayerKV, cells: tuple[torch.Tensor, torch.Tensor], query, key,
           value, cos_sin) -> None:  # fmt: skip
    """Rotates query and key and writes K/V into `cells` (rows, columns) of a segment's layer."""
    ops.kernels.rotary_embedding_kv_write(
        query, key, value, cos_sin, *kv, *cells, cache.kv_dtype, cache.static_scales is not None
    )


def _prefill_attention(
    ops: Ops, cache: SegmentKVCache, layer: int, query, key, value, batch: int
) -> torch.Tensor:
    """attention_prefill of the last query.shape[0] / batch columns of `batch` rows over all of key's."""
    queries, length = query.shape[0] // batch, key.shape[0] // batch
    out = query.new_empty((batch, queries, query.shape[1], query.shape[2]))
    ops.kernels.attention_prefill(
        out, query.view(batch, queries, *query.shape[1:]), key.view(batch, length, *key.shape[1:]),
        value.view(batch, length, *value.shape[1:]), cache.prompt_start, cache.spec.attention_scale,
        cache.windows[layer],
    )  # fmt: skip
    return out.view(batch * queries, -1)


def _attend_prefill(ops: Ops, cache: SegmentKVCache, layer: int, query, key, value, cos_sin) -> torch.Tensor:
    """The prompt's tokens (those after continue_from()'s, if any) attend to the whole prompt."""
    kv = cache.prompt.storage[layer]
    rows, columns = cache.prefill_cells
    reused = cache.prefix_len()
    if reused:  # one prompt: its first `reused` columns come from continue_from()
        prefix_k, prefix_v = _write_held(cache, layer, kv, rows[:reused], columns[:reused])
        rows, columns = rows[reused:], columns[reused:]
    _write(ops, cache, kv, (rows, columns), query, key, value, cos_sin)
    if reused:
        key, value = torch.cat((prefix_k, key)), torch.cat((prefix_v, value))
    return _prefill_attention(ops, cache, layer, query, key, value, cache.num_requests)


def _write_held(
    cache: SegmentKVCache, layer: int, kv: LayerKV, rows: torch.Tensor, columns: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies continue_from()'s K/V of this layer into the prompt segment's cells as they were held (FP8
    codes and scales alike: no encoding again), and returns them in the activation dtype, [T, Hkv, D],
    for the new tokens to attend to."""
    held, held_scales = cache.prefix.layer(layer)
    decoded = []
    for cells, scale, values, scales in zip(
        (kv.k, kv.v), (kv.k_scale, kv.v_scale), held, held_scales, strict=True
    ):
        cells[rows, :, columns] = values
        if scales is not None:
            scale[rows, :, columns] = scales
        # static scales are read where the cache broadcasts them
        decoded.append(_in_activation_dtype(cache, values, scale, rows, columns))
    return decoded[0], decoded[1]


def _attend_token_run(
    ops: Ops, cache: SegmentKVCache, layer: int, query, key, value, cos_sin
) -> torch.Tensor:
    """begin_token_run()'s tokens: written into their cells, then attending to every column up to their
    own, as a prefill's last queries (attention_prefill with more key columns than queries)."""
    kv = cache.prompt.storage[layer]
    _write(ops, cache, kv, cache.run_cells, query, key, value, cos_sin)
    rows, columns = cache.request_cells(0, cache.kept_columns + cache.response_len + cache.run_length)
    keys, values = (
        _in_activation_dtype(cache, cells[rows, :, columns], scale, rows, columns)
        for cells, scale in ((kv.k, kv.k_scale), (kv.v, kv.v_scale))
    )
    return _prefill_attention(ops, cache, layer, query, keys, values, 1)


def _in_activation_dtype(
    cache: SegmentKVCache,
    cells: torch.Tensor,
    scale: torch.Tensor | None,
    rows: torch.Tensor,
    columns: torch.Tensor,
) -> torch.Tensor:
    """K or V as the cells (rows, columns) of a segment store them, in the activation dtype: FP8 codes
    decoded with the cells' scales (`scale`, the segment's; None for a 16-bit cache, whose are returned
    as they are)."""
    if scale is None:
        return cells
    return fp8.decode(cells, scale[rows, :, columns], cache.kv_dtype, cache.dtype)


def _attend_decode(ops: Ops, cache: SegmentKVCache, layer: int, query, key, value, cos_sin) -> torch.Tensor:
    """Each sequence's token, written into its cell, attends to its request's prompt segment and its own
    response steps. One beam per request: one segment holds prompt and response, attended as the prompt
    segment."""
    prompt, response = cache.layer(layer)
    _write(
        ops, cache, prompt if cache.single_beam else response, cache.decode_cells, query, key, value, cos_sin
    )
    prompt_columns, response_len = cache.decode_lengths()
    segment_lens = None if cache.lengths is None else cache.lengths.segment_lens
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    ops.kernels.segment_attention_decode(
        out, query, *prompt, cache.kept_start, *response, cache.beam_slots, response_len,
        cache.spec.attention_scale, cache.kv_dtype, segment_lens, cache.prompt.block_table, prompt_columns,
        cache.windows[layer],
    )  # fmt: skip
    return out.view(query.shape[0], -1)
