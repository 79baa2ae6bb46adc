"""Readable PyTorch kernels for every op in schema.py: the CPU backend.

They follow Hugging Face's LLaMA arithmetic step for step (where each cast to float32 happens and back),
so that the optimized model matches transformers within rounding. They are the fast path on CPU too, so
they avoid copies where torch allows: decode attention reads the shared prompt K/V once per request for
all beams and query heads of a KV group, with torch's flash attention kernel for CPU on the CPU and one
batched matmul elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xpu_coopt.backends.cpu import gemm
from xpu_coopt.ops import fp8, validate
from xpu_coopt.ops.schema import NO_WINDOW, library


def rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    hidden = input.float()
    inverse_rms = torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True).add_(epsilon))
    # not in place: for float32 input, .float() above returned the input itself
    torch.mul(weight, (hidden * inverse_rms).to(input.dtype), out=out)


def fused_add_rms_norm(
    input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> None:
    residual.add_(input)
    rms_norm(input, residual, weight, epsilon)


def silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    gate, up = input.chunk(2, dim=-1)
    torch.mul(F.silu(gate), up, out=out)


def _rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """x: [N, heads, D]; cos, sin: [N, 1, D/2] in x's dtype. Rotate-half (neox) layout, as transformers:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), rounded in x's dtype after each product as it does."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated_first = x1 * cos - x2 * sin
    x2.copy_(x2 * cos + x1 * sin)
    x1.copy_(rotated_first)


def _key_follows_query(query: torch.Tensor, key: torch.Tensor) -> bool:
    """True when key's heads continue query's in memory, heads D apart in both: views of one fused q/k/v
    row. A one-token view's token stride means nothing (torch gives [1, 9, 64] and [1, 3, 64] views of one
    row strides 576 and 192), so it is compared only where there are several tokens."""
    tokens, heads, head_dim = query.shape
    heads_packed = all(t.shape[1] == 1 or t.stride(1) == head_dim for t in (query, key))
    return (
        heads_packed
        and query.dtype == key.dtype
        and (tokens == 1 or query.stride(0) == key.stride(0))
        and key.data_ptr() == query.data_ptr() + heads * head_dim * query.element_size()
    )


def _load_cache(cache: torch.Tensor, scale: torch.Tensor | None, kv_dtype: str, dtype: torch.dtype):
    """The cache's values in dtype: FP8 codes are dequantized, 16/32-bit caches are returned as they are."""
    if fp8.is_fp8(kv_dtype):
        return fp8.decode(cache, scale, kv_dtype, dtype)
    return cache


def kv_write(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    cache_rows: torch.Tensor,
    cache_positions: torch.Tensor,
    kv_dtype: str,
    static_scale: bool = False,
) -> None:
    # Advanced indices around a slice: cache[rows, :, positions] addresses [N, num_kv_heads, head_dim].
    index = (cache_rows, slice(None), cache_positions)
    for source, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        if fp8.is_fp8(kv_dtype):
            if static_scale:
                token_scale = scale[index]
            else:
                token_scale = fp8.dynamic_scale(source, kv_dtype)
                scale[index] = token_scale.to(scale.dtype)  # exact: a bfloat16 value
            cache[index] = fp8.encode(source, token_scale, kv_dtype)
        else:
            cache[index] = source.to(cache.dtype)


def rotary_embedding_kv_write(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    cache_rows: torch.Tensor,
    cache_positions: torch.Tensor,
    kv_dtype: str,
    static_scale: bool = False,
) -> None:
    half = cos_sin.shape[-1] // 2
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]  # [T, 1, D/2]
    if _key_follows_query(query, key):  # views of one fused q/k/v row: rotate all heads at once
        tokens, heads, head_dim = query.shape[0], query.shape[1] + key.shape[1], query.shape[2]
        query_and_key = query.as_strided((tokens, heads, head_dim), (query.stride(0), head_dim, 1))
        _rotate_in_place(query_and_key, cos, sin)
    else:
        _rotate_in_place(query, cos, sin)
        _rotate_in_place(key, cos, sin)
    kv_write(
        key, value, k_cache, v_cache, k_scale, v_scale, cache_rows, cache_positions, kv_dtype, static_scale
    )


# Query rows of a block of the CPU prefill's masked path (padding or a window). Each block attends only to
# the keys up to its last row and from its first row's window on, so the scores and the mask cover about
# half the P x P square causally, and a band of the window's width under a window. AVX2, 2 threads, 8
# heads of 128: P 4096 with a window of 1024, float32, 575 -> 157 ms (one block: 575); two rows of 2048
# with 1000 columns of padding, float32, 279 -> 154 ms; blocks of 128 and 512 were slower.
PREFILL_QUERY_BLOCK = 256


def attention_prefill(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_start: torch.Tensor,
    scale: float,
    window: int = NO_WINDOW,
) -> None:
    op = "attention_prefill"
    span = validate.window_span(op, window)
    queries, columns = validate.prefill_shapes(op, out, query, key, value, seq_start)
    offset = columns - queries  # query i sits at column offset + i
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, heads, columns, D]
    if offset == 0 and not bool(seq_start.any()) and span >= columns:
        # No padding, no window inside the prompt, a query at every column: plain causal attention, which
        # torch runs with its flash kernel (no mask tensor; its is_causal aligns the first query with the
        # first key, hence offset 0 only).
        result = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        out.copy_(result.transpose(1, 2))
        return
    column = torch.arange(columns, device=query.device)
    valid = column[None, :] >= seq_start[:, None].to(column.dtype)  # [B, columns]: keys, and queries too
    for first in range(0, queries, PREFILL_QUERY_BLOCK):
        last = min(first + PREFILL_QUERY_BLOCK, queries)
        query_columns = slice(offset + first, offset + last)
        keys = slice(max(0, offset + first - span + 1), offset + last)  # from the first query's window
        distance = column[query_columns, None] - column[None, keys]  # query column - key column
        causal = (distance >= 0) & (distance < span)  # the key is one of the query's last `span`
        # Padding rows have no key to attend to; let them see themselves so softmax stays finite, then
        # zero them.
        mask = (causal[None] & valid[:, None, keys]) | (distance == 0)[None]
        result = F.scaled_dot_product_attention(
            q[:, :, first:last], k[:, :, keys], v[:, :, keys], attn_mask=mask[:, None], scale=scale,
            enable_gqa=True,
        )  # fmt: skip
        out[:, first:last].copy_(result.transpose(1, 2) * valid[:, query_columns, None, None])


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul in the operands' dtype (float32 sums, rounded once), run in float32 where this CPU has
    no fast kernel for that dtype (gemm.matmul_dtype)."""
    compute = gemm.matmul_dtype(a.device, a.dtype)
    if compute == a.dtype:
        return torch.matmul(a, b)
    return torch.matmul(a.to(compute), b.to(compute)).to(a.dtype)


# Where the CPU decode copies K/V (prompt padding zeroed in copies, FP8 codes dequantized, blocks
# gathered), it attends to at most this many bytes of K/V at once, a chunk of requests at a time: the
# copies then stay in cache, and glibc reuses their memory instead of mapping fresh pages for each step's
# copies (zeroed by the kernel, page by page). AVX2, 2 threads, SmolLM2-135M's decode attention (then
# bfloat16 converted to float32 for the matmuls, 3 KV heads, 1056 columns, 1.6 MB a request): 16 requests
# 15.0 -> 7.3 ms in chunks of 4 (6.5 MB), 64 requests 72 -> 17 ms; chunks of 8 requests (13 MB) were
# slower. Without copies the requests go in one chunk (flash kernel, 16 requests unpadded: 2.3 -> 1.8 ms).
CPU_CHUNK_BYTES = 8 << 20

# On CPU tensors the decode attention runs torch's flash attention kernel for CPU (_attend_requests_flash);
# False: the batched matmuls it runs on other devices (_attend_requests), which the tests also run on CPU.
CPU_FLASH_ATTENTION = True


def segment_attention_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    prompt_k: torch.Tensor,
    prompt_v: torch.Tensor,
    prompt_k_scale: torch.Tensor | None,
    prompt_v_scale: torch.Tensor | None,
    prompt_start: torch.Tensor,
    response_k: torch.Tensor,
    response_v: torch.Tensor,
    response_k_scale: torch.Tensor | None,
    response_v_scale: torch.Tensor | None,
    beam_slots: torch.Tensor,
    response_len: int,
    scale: float,
    kv_dtype: str,
    segment_lens: torch.Tensor | None = None,
    prompt_block_table: torch.Tensor | None = None,
    prompt_len: int = -1,
    window: int = NO_WINDOW,
) -> None:
    op = "segment_attention_decode"
    span = validate.window_span(op, window)
    capacity = validate.prompt_capacity(op, prompt_k, prompt_start, prompt_block_table, prompt_len, span)
    # The lengths may live on the device: read them here, once for every chunk.
    rings = validate.rings(prompt_k, prompt_block_table, response_k, span)
    prompt_len, response_len = validate.host_segment_lens(op, segment_lens, capacity, response_len, rings)
    # A sliding window keeps each sequence's last `span` columns (prompt columns, then response steps):
    # the columns and steps before those are neither read nor computed on.
    window_first = prompt_len + response_len - span
    prompt_columns = range(min(max(window_first, 0), prompt_len), prompt_len)
    steps = range(max(window_first - prompt_len, 0), response_len)
    num_requests = prompt_start.shape[0]
    beams = query.shape[0] // num_requests
    paged = prompt_block_table is not None  # the pool of blocks is shared: its table is sliced instead
    chunk = num_requests
    if query.device.type == "cpu" and _copies_kv(kv_dtype, paged, prompt_start, prompt_columns):
        per_request = _request_bytes(query, prompt_k.shape[1], len(prompt_columns) + beams * len(steps))
        chunk = max(1, CPU_CHUNK_BYTES // max(per_request, 1))
    prompt_segment = (prompt_k, prompt_v, prompt_k_scale, prompt_v_scale)
    response_segment = (response_k, response_v, response_k_scale, response_v_scale)
    for first in range(0, num_requests, chunk):
        requests, seqs = slice(first, first + chunk), slice(first * beams, (first + chunk) * beams)
        prompt = [t if t is None or paged else t[requests] for t in prompt_segment]
        response = [None if t is None else t[seqs] for t in response_segment]
        slots = beam_slots[seqs] - first * beams if first else beam_slots[seqs]  # rows from the chunk's
        table = prompt_block_table[requests] if paged else None
        attend = (
            _attend_requests_flash if query.device.type == "cpu" and CPU_FLASH_ATTENTION else _attend_requests
        )
        attend(
            out[seqs], query[seqs], prompt, prompt_start[requests], response, slots, steps, scale, kv_dtype,
            table, prompt_columns,
        )  # fmt: skip


def _copies_kv(kv_dtype: str, paged: bool, prompt_start: torch.Tensor, prompt_columns: range) -> bool:
    """Whether the CPU decode copies K/V: FP8 codes are dequantized, blocks gathered, and padding zeroed
    in copies (the batched matmuls of CPU_FLASH_ATTENTION=False convert K/V on most CPUs anyway)."""
    padded = bool((prompt_start > prompt_columns.start).any()) if len(prompt_columns) else False
    return fp8.is_fp8(kv_dtype) or paged or padded or not CPU_FLASH_ATTENTION


def _request_bytes(query: torch.Tensor, num_kv_heads: int, columns: int) -> int:
    """The bytes of one request's K and V over `columns`, in the dtype the decode's copies hold them in."""
    compute = query.dtype if CPU_FLASH_ATTENTION else gemm.matmul_dtype(query.device, query.dtype)
    return 2 * num_kv_heads * columns * query.shape[-1] * compute.itemsize


def _attend_requests(
    out: torch.Tensor,
    query: torch.Tensor,
    prompt: list[torch.Tensor | None],
    prompt_start: torch.Tensor,
    response: list[torch.Tensor | None],
    beam_slots: torch.Tensor,
    steps: range,
    scale: float,
    kv_dtype: str,
    prompt_block_table: torch.Tensor | None,
    prompt_columns: range,
) -> None:
    """segment_attention_decode for some requests (all their beams), the lengths read on the host, with
    batched matmuls: on devices other than the CPU (and on the CPU with CPU_FLASH_ATTENTION off).
    prompt: (prompt_k, prompt_v, prompt_k_scale, prompt_v_scale); response: the same of the response.
    prompt_columns, steps: the prompt-segment columns and response steps attended (the window's)."""
    prompt_k, prompt_v, prompt_k_scale, prompt_v_scale = prompt
    response_k, response_v, response_k_scale, response_v_scale = response
    dtype = query.dtype
    compute = gemm.matmul_dtype(query.device, dtype)
    # 16-bit K/V gathered from blocks come out in the matmuls' dtype: the gather's copy converts them.
    gathered_kv = None if fp8.is_fp8(kv_dtype) else compute
    callers_v = prompt_v  # the caller's cache, never written: padding is zeroed in a copy of it
    prompt_k, prompt_v = (
        _prompt_columns(t, prompt_block_table, prompt_columns, gathered_kv) for t in (prompt_k, prompt_v)
    )
    prompt_k_scale, prompt_v_scale = (
        None if t is None else _prompt_columns(t, prompt_block_table, prompt_columns, None)
        for t in (prompt_k_scale, prompt_v_scale)
    )
    num_seqs, num_heads, head_dim = query.shape
    num_requests, num_kv_heads, prompt_len, _ = prompt_k.shape
    beams = num_seqs // num_requests
    group = num_heads // num_kv_heads
    rows = beams * group  # query rows per (request, KV head): every beam and query head of the group
    # Work in [R, Hkv, beams, G, ...]: every beam and query head of a KV group shares one prompt matmul.
    q = query.view(num_requests, beams, num_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)

    # Prompt segment: read once per (request, KV head) for all beams and query heads of the group.
    # One copy of K either way: a 16-bit bmm copies its transposed operand element by element, 10x slower
    # than making the slice of the cache's columns contiguous here; where the matmuls run in float32, the
    # conversion makes it contiguous, and float32 bmm reads the transpose in place.
    pk = _load_cache(prompt_k, prompt_k_scale, kv_dtype, dtype)  # [R, Hkv, P, D]
    pk = pk.contiguous() if compute == dtype else pk.to(compute)
    pv = _load_cache(prompt_v, prompt_v_scale, kv_dtype, dtype).to(compute)  # converted once, not per use
    scores = _matmul(q.reshape(num_requests, num_kv_heads, rows, head_dim), pk.transpose(-1, -2))
    padded = _padded_requests(prompt_start, prompt_columns, prompt_len)
    if padded:
        # A zero weight times garbage could still be NaN: the padding's values are zeroed too, in a copy.
        # One slice fill per padded request: a masked_fill over the whole segment with a broadcast mask
        # takes 8x the float32 conversion itself (AVX2, [4, 3, 1056, 64]: 710 against 90 us).
        pv = pv.clone() if _shares_memory(pv, callers_v) else pv
        for request, start in padded:
            scores[request, ..., :start] = float("-inf")
            pv[request, :, :start] = 0

    response_len = len(steps)
    if response_len:  # (0: everything lives in the prompt segment, as with one beam per request)
        # Response segment: each beam's own rows, found through beam_slots (integers only were reordered).
        history = _ResponseHistory(beam_slots, steps, num_requests, num_kv_heads, response_k.shape[2])
        rk = history.read(response_k, response_k_scale, kv_dtype, dtype)  # [R, Hkv, beams, T, D]
        rv = history.read(response_v, response_v_scale, kv_dtype, dtype)
        response_scores = _matmul(q, rk.transpose(-1, -2)).view(
            num_requests, num_kv_heads, rows, response_len
        )
        scores = torch.cat((scores, response_scores), dim=-1)  # exact: both are in dtype
    # Softmax in float32 (a fresh tensor unless dtype is float32, where scores is ours to scale in place).
    probs = torch.softmax(scores.float().mul_(scale), dim=-1).to(dtype)  # [R, Hkv, rows, P + T]
    result = _matmul(probs[..., :prompt_len], pv)  # [R, Hkv, rows, D]
    result = result.view(num_requests, num_kv_heads, beams, group, head_dim)
    if response_len:
        response_probs = probs[..., prompt_len:].view(num_requests, num_kv_heads, beams, group, response_len)
        result += _matmul(response_probs, rv)
    out.view(num_requests, beams, num_kv_heads, group, head_dim).copy_(result.permute(0, 2, 1, 3, 4))


def _attend_requests_flash(
    out: torch.Tensor,
    query: torch.Tensor,
    prompt: list[torch.Tensor | None],
    prompt_start: torch.Tensor,
    response: list[torch.Tensor | None],
    beam_slots: torch.Tensor,
    steps: range,
    scale: float,
    kv_dtype: str,
    prompt_block_table: torch.Tensor | None,
    prompt_columns: range,
) -> None:
    """_attend_requests on the CPU with torch's flash attention kernel for CPU, which reads 16-bit K/V
    where they lie (no float32 copy) and returns each row's log-sum-exp: the prompt segment's partial
    (every beam and query head of a KV group as rows of one matrix, the prompt read once) and the response
    segment's (each beam's own rows) are merged by it, as the device kernels merge their splits."""
    num_seqs, num_heads, head_dim = query.shape
    num_requests, num_kv_heads = prompt_start.shape[0], prompt[0].shape[1]
    beams, group = num_seqs // num_requests, num_heads // num_kv_heads
    # [R, Hkv, beams, G, D]: viewed as [R, Hkv, beams * G, D] for the prompt, [R, Hkv * beams, G, D] for
    # the response.
    q = query.view(num_requests, beams, num_kv_heads, group, head_dim).transpose(1, 2).contiguous()
    rows = (num_requests, num_kv_heads, beams * group)
    partials = []
    if len(prompt_columns):
        partials.append(_attend_prompt_flash(q.view(*rows, head_dim), prompt, prompt_start, scale, kv_dtype,
                                             prompt_block_table, prompt_columns))  # fmt: skip
    if len(steps):
        response_k, response_v, response_k_scale, response_v_scale = response
        history = _ResponseHistory(beam_slots, steps, num_requests, num_kv_heads, response_k.shape[2])
        each_beam = (num_requests, num_kv_heads * beams, len(steps), head_dim)
        rk = history.read(response_k, response_k_scale, kv_dtype, query.dtype).view(each_beam)
        rv = history.read(response_v, response_v_scale, kv_dtype, query.dtype).view(each_beam)
        result, lse = _flash_for_cpu(
            q.view(num_requests, num_kv_heads * beams, group, head_dim), rk, rv, scale=scale
        )
        partials.append((result.reshape(*rows, head_dim), lse.reshape(rows)))
    result = partials[0][0] if len(partials) == 1 else _merge_partials(*partials)
    out.view(num_requests, beams, num_kv_heads, group, head_dim).copy_(
        result.reshape(num_requests, num_kv_heads, beams, group, head_dim).transpose(1, 2)
    )


_flash_for_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _attend_prompt_flash(
    q: torch.Tensor,
    prompt: list[torch.Tensor | None],
    prompt_start: torch.Tensor,
    scale: float,
    kv_dtype: str,
    prompt_block_table: torch.Tensor | None,
    prompt_columns: range,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt segment's attention of q [R, Hkv, rows, D] and each row's log-sum-exp [R, Hkv, rows]."""
    prompt_k, prompt_v, prompt_k_scale, prompt_v_scale = prompt
    columns = [_prompt_columns(t, prompt_block_table, prompt_columns, None) for t in (prompt_k, prompt_v)]
    scales = [
        None if t is None else _prompt_columns(t, prompt_block_table, prompt_columns, None)
        for t in (prompt_k_scale, prompt_v_scale)
    ]
    pk, pv = (_load_cache(t, t_scale, kv_dtype, q.dtype) for t, t_scale in zip(columns, scales, strict=True))
    length = pk.shape[2]
    padded = _padded_requests(prompt_start, prompt_columns, length)
    mask = None
    if padded:
        # The mask adds -inf to the padding's scores, but NaN K or V would still make NaN: both are zeroed,
        # in copies (never in the caller's cache).
        pk, pv = (
            t.clone() if _shares_memory(t, cache) else t for t, cache in ((pk, prompt_k), (pv, prompt_v))
        )
        mask = torch.zeros((q.shape[0], 1, 1, length), dtype=q.dtype, device=q.device)
        for request, start in padded:
            pk[request, :, :start] = 0
            pv[request, :, :start] = 0
            mask[request, ..., :start] = float("-inf")
    result, lse = _flash_for_cpu(q, pk, pv, attn_mask=mask, scale=scale)
    for request, start in padded:
        if start == length:  # nothing to attend here: the kernel gives zeros and a log-sum-exp of 0
            lse[request] = float("-inf")
    return result, lse


def _merge_partials(
    prompt: tuple[torch.Tensor, torch.Tensor], response: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Two softmax partials (output [..., D] normalized over its own keys, in the activation dtype, and
    log-sum-exp [...]) merged into the attention over both sets of keys: weighed in float32, rounded to
    the activation dtype once more."""
    (prompt_out, prompt_lse), (response_out, response_lse) = prompt, response
    lse = torch.logaddexp(prompt_lse, response_lse)
    merged = prompt_out.float() * (prompt_lse - lse).exp_().unsqueeze(-1)
    merged += response_out.float() * (response_lse - lse).exp_().unsqueeze(-1)
    return merged.to(prompt_out.dtype)


def _padded_requests(prompt_start: torch.Tensor, prompt_columns: range, length: int) -> list[tuple[int, int]]:
    """(request, columns of padding) for each request whose attended prompt columns begin with padding
    (with a window, at most all `length` of them): never read. Columns count from the first attended."""
    starts = [min(max(start - prompt_columns.start, 0), length) for start in prompt_start.tolist()]
    return [(request, start) for request, start in enumerate(starts) if start]


def _shares_memory(tensor: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether tensor is (a view of) the caller's cache rather than a copy of ours that we may write."""
    return tensor.untyped_storage().data_ptr() == cache.untyped_storage().data_ptr()


def _prompt_columns(
    segment: torch.Tensor, block_table: torch.Tensor | None, columns: range, dtype: torch.dtype | None
) -> torch.Tensor:
    """[R, Hkv, len(columns), ...]: a prompt segment's `columns` (K/V, or without D their scales): from a
    ring of the segment's columns (docs/ops.md; at most that many columns), or with a block table,
    gathered from the block pool [blocks, Hkv, block_size, ...] it indexes into a new tensor of `dtype`
    (None: the pool's) in one copy after the blocks' (the table's order is not the columns')."""
    if block_table is None:  # a ring: column n is held at n % held, the columns in at most two pieces
        held = segment.shape[2]
        first, count = columns.start % held, len(columns)
        if first + count <= held:
            return segment[:, :, first : first + count]
        return torch.cat((segment[:, :, first:], segment[:, :, : first + count - held]), dim=2)
    block_size = segment.shape[2]
    first, end = columns.start // block_size, -(-columns.stop // block_size)  # the blocks holding them
    requests, used = block_table.shape[0], end - first
    # Each block is contiguous: index_select copies them whole, then one copy puts them in column order.
    blocks = segment.index_select(0, block_table[:, first:end].flatten().long())
    blocks = blocks.view(requests, used, *segment.shape[1:]).transpose(1, 2)  # [R, Hkv, used, block, ...]
    gathered = torch.empty(
        (*blocks.shape[:2], used * block_size, *segment.shape[3:]),
        dtype=segment.dtype if dtype is None else dtype,
        device=segment.device,
    )
    gathered.view(blocks.shape).copy_(blocks)
    offset = columns.start - first * block_size
    return gathered[:, :, offset : offset + len(columns)]


class _ResponseHistory:
    """Where each sequence's response K/V over `steps` lies: past the segment's `cells` columns a ring
    (docs/ops.md), step t in column t % cells, its slot likewise. One beam per request reads its own row,
    a slice; beams gather their rows with one index_select of whole head_dim rows, at element offsets
    from the cache's strides: twice as fast as advanced indexing over (slot, step), which copies element
    by element (AVX2, 2 threads, 4 beams x 8 KV heads of 128 over 1500 float32 steps: 15-24 -> 6-10 ms)."""

    def __init__(self, beam_slots: torch.Tensor, steps: range, requests: int, kv_heads: int, cells: int):
        self.steps = steps
        self.beams = beam_slots.shape[0] // requests
        self.sliced = self.beams == 1 and steps.stop <= cells
        if not self.sliced:
            device = beam_slots.device
            step = torch.arange(steps.start, steps.stop, device=device) % cells
            # [R, 1, beams, T] slots and [T] columns; heads broadcast in between: [R, Hkv, beams, T]
            self.slots = beam_slots[:, step].view(requests, 1, self.beams, len(steps)).long()
            self.columns = step
            self.heads = torch.arange(kv_heads, device=device).view(kv_heads, 1, 1)

    def read(
        self, cache: torch.Tensor, scale: torch.Tensor | None, kv_dtype: str, dtype: torch.dtype
    ) -> torch.Tensor:
        """[R, Hkv, beams, T, D]: cache's rows (response K or V [S, Hkv, C, D]) in dtype."""
        if self.sliced:
            rows = cache[:, :, self.steps.start : self.steps.stop].unsqueeze(2)
            row_scale = (
                None if scale is None else scale[:, :, self.steps.start : self.steps.stop].unsqueeze(2)
            )
        else:
            rows = self._gather(cache, cache.shape[-1])
            row_scale = None if scale is None else self._gather(scale, 1).squeeze(-1)
        return _load_cache(rows, row_scale, kv_dtype, dtype)

    def _gather(self, tensor: torch.Tensor, width: int) -> torch.Tensor:
        """[R, Hkv, beams, T, width]: the `width` elements from each (slot, KV head, column) of tensor."""
        stride = tensor.stride()
        offsets = self.slots * stride[0] + self.heads * stride[1] + self.columns * stride[2]
        # Row i of this view is the `width` elements from element i on (rows overlap: it is only read).
        last_row = sum((size - 1) * step for size, step in zip(tensor.shape[:3], stride, strict=False))
        rows = tensor.as_strided((last_row + 1, width), (1, 1))
        return rows.index_select(0, offsets.flatten()).view(*offsets.shape, width)


KERNELS = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "silu_and_mul": silu_and_mul,
    "rotary_embedding_kv_write": rotary_embedding_kv_write,
    "kv_write": kv_write,
    "attention_prefill": attention_prefill,
    "segment_attention_decode": segment_attention_decode,
}

for _name, _kernel in KERNELS.items():
    library().impl(_name, _kernel, "CPU")
