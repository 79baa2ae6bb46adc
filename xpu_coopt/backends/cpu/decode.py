"""segment_attention_decode on the CPU: a request's prompt K/V read once for all its beams and query heads
of a KV group, with the CPU's attention of a few rows (rows_attention.py: a native kernel) on the CPU
(partials merged by their log-sum-exp) and batched matmuls elsewhere (backend="torch" on another
device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xpu_coopt.backends.cpu import gemm, native
from xpu_coopt.backends.cpu.rows_attention import attend_rows
from xpu_coopt.ops import fp8
from xpu_coopt.ops.calls import DecodeCall


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
# slower. Without copies the requests go in one chunk (then torch's flash kernel, 16 requests unpadded:
# 2.3 -> 1.8 ms).
CPU_CHUNK_BYTES = 8 << 20

# On CPU tensors the decode attention runs the CPU's attention of a few rows (_attend_requests_rows);
# False: the batched matmuls it runs on other devices (_attend_requests), which the tests also run on CPU.
CPU_ROWS_ATTENTION = True


def segment_attention_decode(call: DecodeCall) -> None:
    # The lengths may live on the device: read them here, once for every chunk.
    prompt_len, response_len = call.host_lengths()
    # A sliding window keeps each sequence's last `span` columns (prompt columns, then response steps):
    # the columns and steps before those are neither read nor computed on.
    window_first = prompt_len + response_len - call.span
    prompt_columns = range(min(max(window_first, 0), prompt_len), prompt_len)
    steps = range(max(window_first - prompt_len, 0), response_len)
    requests, beams = call.requests, call.beams
    chunk = requests
    if call.query.device.type == "cpu" and _copies_kv(call, prompt_columns):
        per_request = _request_bytes(call.query, call.kv_heads, len(prompt_columns) + beams * len(steps))
        chunk = max(1, CPU_CHUNK_BYTES // max(per_request, 1))
    attend = (
        _attend_requests_rows if call.query.device.type == "cpu" and CPU_ROWS_ATTENTION else _attend_requests
    )
    for first in range(0, requests, chunk):
        attend(_Chunk.of(call, first, min(first + chunk, requests), prompt_columns, steps))


@dataclass(slots=True)
class _Chunk:
    """Some requests of a decode call, all their beams, with the columns and steps to attend read on the
    host: prompt, response (K, V and their scales), beam_slots, block_table sliced to them (a paged pool
    is shared: its table is sliced instead)."""

    out: torch.Tensor
    query: torch.Tensor
    prompt: tuple[torch.Tensor | None, ...]
    prompt_start: torch.Tensor
    response: tuple[torch.Tensor | None, ...]
    beam_slots: torch.Tensor
    block_table: torch.Tensor | None
    prompt_columns: range
    steps: range
    scale: float
    kv_dtype: str

    @classmethod
    def of(cls, call: DecodeCall, first: int, end: int, prompt_columns: range, steps: range) -> _Chunk:
        if first == 0 and end == call.requests:  # every request: the call's tensors, unsliced
            return cls(call.out, call.query, call.prompt, call.prompt_start, call.response, call.beam_slots,
                       call.block_table, prompt_columns, steps, call.scale, call.kv_dtype)  # fmt: skip
        beams = call.beams
        requests, seqs = slice(first, end), slice(first * beams, end * beams)
        paged = call.block_table is not None
        prompt = tuple(t if t is None or paged else t[requests] for t in call.prompt)
        response = tuple(None if t is None else t[seqs] for t in call.response)
        slots = call.beam_slots[seqs] - first * beams if first else call.beam_slots[seqs]  # the chunk's rows
        table = call.block_table[requests] if paged else None
        return cls(call.out[seqs], call.query[seqs], prompt, call.prompt_start[requests], response, slots,
                   table, prompt_columns, steps, call.scale, call.kv_dtype)  # fmt: skip


def _copies_kv(call: DecodeCall, prompt_columns: range) -> bool:
    """Whether the CPU decode copies K/V: FP8 codes are dequantized, blocks gathered, and padding zeroed
    in copies where torch's flash kernel attends (the batched matmuls of CPU_ROWS_ATTENTION=False convert
    K/V on most CPUs anyway; the native kernel skips padding)."""
    if fp8.is_fp8(call.kv_dtype) or call.block_table is not None or not CPU_ROWS_ATTENTION:
        return True
    if native.library() is not None:
        return False
    # a host list rather than a tensor comparison: a few microseconds less, each layer of each step
    return len(prompt_columns) > 0 and max(call.prompt_start.tolist()) > prompt_columns.start


def _request_bytes(query: torch.Tensor, num_kv_heads: int, columns: int) -> int:
    """The bytes of one request's K and V over `columns`, in the dtype the decode's copies hold them in."""
    compute = query.dtype if CPU_ROWS_ATTENTION else gemm.matmul_dtype(query.device, query.dtype)
    return 2 * num_kv_heads * columns * query.shape[-1] * compute.itemsize


def _attend_requests(chunk: _Chunk) -> None:
    """A chunk's attention with batched matmuls: on devices other than the CPU (and on the CPU with
    CPU_ROWS_ATTENTION off). Work in [R, Hkv, beams, G, ...]: every beam and query head of a KV group
    shares one prompt matmul, the prompt read once per (request, KV head)."""
    query, dtype = chunk.query, chunk.query.dtype
    num_seqs, num_heads, head_dim = query.shape
    requests, kv_heads = chunk.prompt_start.shape[0], chunk.prompt[0].shape[1]
    beams, group = num_seqs // requests, num_heads // kv_heads
    q = query.view(requests, beams, kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
    scores, pv = _prompt_scores(chunk, q.reshape(requests, kv_heads, beams * group, head_dim))
    prompt_len, response_len = pv.shape[2], len(chunk.steps)
    if response_len:  # (0: everything lives in the prompt segment, as with one beam per request)
        # Response segment: each beam's own rows, found through beam_slots (integers only were reordered).
        response_k, response_v, response_k_scale, response_v_scale = chunk.response
        history = _ResponseHistory(chunk.beam_slots, chunk.steps, requests, kv_heads, response_k.shape[2])
        rk = history.read(response_k, response_k_scale, chunk.kv_dtype, dtype)  # [R, Hkv, beams, T, D]
        rv = history.read(response_v, response_v_scale, chunk.kv_dtype, dtype)
        response_scores = _matmul(q, rk.transpose(-1, -2)).view(
            requests, kv_heads, beams * group, response_len
        )
        scores = torch.cat((scores, response_scores), dim=-1)  # exact: both are in dtype
    # Softmax in float32 (a fresh tensor unless dtype is float32, where scores is ours to scale in place).
    probs = torch.softmax(scores.float().mul_(chunk.scale), dim=-1).to(dtype)  # [R, Hkv, rows, P + T]
    result = _matmul(probs[..., :prompt_len], pv).view(requests, kv_heads, beams, group, head_dim)
    if response_len:
        response_probs = probs[..., prompt_len:].view(requests, kv_heads, beams, group, response_len)
        result += _matmul(response_probs, rv)
    chunk.out.view(requests, beams, kv_heads, group, head_dim).copy_(result.permute(0, 2, 1, 3, 4))


def _prompt_scores(chunk: _Chunk, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt segment's scores of q [R, Hkv, rows, D], [R, Hkv, rows, P] in q's dtype (-inf over left
    padding), and its values [R, Hkv, P, D] in the matmuls' dtype (zeros over left padding)."""
    dtype, kv_dtype = q.dtype, chunk.kv_dtype
    compute = gemm.matmul_dtype(q.device, dtype)
    # 16-bit K/V gathered from blocks come out in the matmuls' dtype: the gather's copy converts them.
    gathered_kv = None if fp8.is_fp8(kv_dtype) else compute
    prompt_k, prompt_v, prompt_k_scale, prompt_v_scale = (
        None
        if t is None
        else _prompt_columns(t, chunk.block_table, chunk.prompt_columns, gathered_kv if i < 2 else None)
        for i, t in enumerate(chunk.prompt)
    )
    # One copy of K either way: a 16-bit bmm copies its transposed operand element by element, 10x slower
    # than making the slice of the cache's columns contiguous here; where the matmuls run in float32, the
    # conversion makes it contiguous, and float32 bmm reads the transpose in place.
    pk = _load_cache(prompt_k, prompt_k_scale, kv_dtype, dtype)  # [R, Hkv, P, D]
    pk = pk.contiguous() if compute == dtype else pk.to(compute)
    pv = _load_cache(prompt_v, prompt_v_scale, kv_dtype, dtype).to(compute)  # converted once, not per use
    scores = _matmul(q, pk.transpose(-1, -2))
    padded = _padded_requests(chunk.prompt_start, chunk.prompt_columns, pk.shape[2])
    if padded:
        # A zero weight times garbage could still be NaN: the padding's values are zeroed too, in a copy
        # (never in the caller's cache). One slice fill per padded request: a masked_fill over the whole
        # segment with a broadcast mask takes 8x the float32 conversion itself (AVX2, [4, 3, 1056, 64]:
        # 710 against 90 us).
        pv = pv.clone() if _shares_memory(pv, chunk.prompt[1]) else pv
        for request, start in padded:
            scores[request, ..., :start] = float("-inf")
            pv[request, :, :start] = 0
    return scores, pv


def _attend_requests_rows(chunk: _Chunk) -> None:
    """_attend_requests on the CPU with attend_rows, which reads 16-bit K/V where they lie (no float32
    copy) and returns each row's log-sum-exp: the prompt segment's partial (every beam and query head of
    a KV group as rows of one matrix, the prompt read once) and the response segment's (each beam's own
    rows) are merged by it, as the device kernels merge their splits."""
    query = chunk.query
    num_seqs, num_heads, head_dim = query.shape
    requests, kv_heads = chunk.prompt_start.shape[0], chunk.prompt[0].shape[1]
    beams, group = num_seqs // requests, num_heads // kv_heads
    # [R, Hkv, beams, G, D]: viewed as [R, Hkv, beams * G, D] for the prompt, [R, Hkv * beams, G, D] for
    # the response.
    q = query.view(requests, beams, kv_heads, group, head_dim).transpose(1, 2).contiguous()
    rows = (requests, kv_heads, beams * group)
    if beams == 1 and not len(chunk.steps) and chunk.out.is_contiguous():
        # One beam, everything in the prompt segment (generate()'s decode): [S, H, D] is [R, Hkv, G, D],
        # the kernel's own layout, so it writes the output where it goes.
        _attend_prompt_rows(chunk, q.view(*rows, head_dim), chunk.out.view(*rows, head_dim))
        return
    partials = []
    if len(chunk.prompt_columns):
        partials.append(_attend_prompt_rows(chunk, q.view(*rows, head_dim)))
    if len(chunk.steps):
        response_k, response_v, response_k_scale, response_v_scale = chunk.response
        history = _ResponseHistory(chunk.beam_slots, chunk.steps, requests, kv_heads, response_k.shape[2])
        each_beam = (requests, kv_heads * beams, len(chunk.steps), head_dim)
        rk = history.read(response_k, response_k_scale, chunk.kv_dtype, query.dtype).view(each_beam)
        rv = history.read(response_v, response_v_scale, chunk.kv_dtype, query.dtype).view(each_beam)
        result, lse = attend_rows(q.view(requests, kv_heads * beams, group, head_dim), rk, rv, chunk.scale)
        partials.append((result.reshape(*rows, head_dim), lse.reshape(rows)))
    result = partials[0][0] if len(partials) == 1 else _merge_partials(*partials)
    chunk.out.view(requests, beams, kv_heads, group, head_dim).copy_(
        result.reshape(requests, kv_heads, beams, group, head_dim).transpose(1, 2)
    )


def _attend_prompt_rows(
    chunk: _Chunk, q: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt segment's attention of q [R, Hkv, rows, D] (written into out where given) and each
    row's log-sum-exp [R, Hkv, rows]."""
    prompt_k, prompt_v, prompt_k_scale, prompt_v_scale = (
        None if t is None else _prompt_columns(t, chunk.block_table, chunk.prompt_columns, None)
        for t in chunk.prompt
    )
    pk = _load_cache(prompt_k, prompt_k_scale, chunk.kv_dtype, q.dtype)
    pv = _load_cache(prompt_v, prompt_v_scale, chunk.kv_dtype, q.dtype)
    padded = _padded_requests(chunk.prompt_start, chunk.prompt_columns, pk.shape[2])
    first_column = None
    if padded:  # each request's first attended column past its padding
        starts = [0] * q.shape[0]
        for request, start in padded:
            starts[request] = start
        first_column = torch.tensor(starts, dtype=torch.int64)
    return attend_rows(q, pk, pv, chunk.scale, first_column, out)


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


def _load_cache(cache: torch.Tensor, scale: torch.Tensor | None, kv_dtype: str, dtype: torch.dtype):
    """The cache's values in dtype: FP8 codes are dequantized, 16/32-bit caches are returned as they are."""
    if fp8.is_fp8(kv_dtype):
        return fp8.decode(cache, scale, kv_dtype, dtype)
    return cache
