"""Slow, loop-based, obviously correct references for every op (never shipped).

They compute in float64 one token / head / beam at a time, written from the definitions in docs/ops.md
rather than from xpu_coopt's reference kernels, so the CPU backend is not compared with itself.
"""

from __future__ import annotations

import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float64)
    flat_x, flat_out = x.reshape(-1, x.shape[-1]).double(), out.view(-1, x.shape[-1])
    for row in range(flat_x.shape[0]):
        values = flat_x[row]
        flat_out[row] = values / math.sqrt(float((values * values).mean()) + eps) * weight.double()
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    gate, up = x[..., :d].double(), x[..., d:].double()
    return gate / (1 + torch.exp(-gate)) * up


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D]: rotate-half RoPE, pairs (i, i + D/2) rotated by position * inv_freq[i]."""
    out = x.double().clone()
    half = x.shape[-1] // 2
    for n in range(x.shape[0]):
        for i in range(half):
            angle = float(positions[n]) * float(inv_freq[i])
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[n, :, i].double(), x[n, :, i + half].double()
            out[n, :, i] = a * c - b * s
            out[n, :, i + half] = b * c + a * s
    return out


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q [D]; keys, values [T, D] -> [D] (float64)."""
    scores = [float(q.double() @ keys[t].double()) * scale for t in range(keys.shape[0])]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    out = torch.zeros(q.shape[-1], dtype=torch.float64)
    for t, w in enumerate(weights):
        out += w / total * values[t].double()
    return out


def paged_attention(query, keys, values, query_start, context_lens, scale, window=None) -> torch.Tensor:
    """query [T, H, D]; keys, values: each sequence's K/V [context, Hkv, D] (already read out of the pool,
    in the activation dtype); sequence s's queries are rows query_start[s]..query_start[s + 1] - 1, the
    last of its context: query i at position context - count + i attends keys j <= its position (and
    j > position - window) -> [T, H, D] float64."""
    out = torch.zeros(query.shape, dtype=torch.float64)
    group = query.shape[1] // keys[0].shape[1]
    for s, (k, v) in enumerate(zip(keys, values, strict=True)):
        first, last = int(query_start[s]), int(query_start[s + 1])
        for row in range(first, last):
            position = int(context_lens[s]) - (last - row)
            low = 0 if window is None else max(0, position - window + 1)
            for h in range(query.shape[1]):
                out[row, h] = attention(
                    query[row, h], k[low : position + 1, h // group], v[low : position + 1, h // group], scale
                )
    return out


def attention_prefill(q, k, v, seq_start, scale, window=None) -> torch.Tensor:
    """q [B, Q, H, D], k/v [B, P, Hkv, D] (P >= Q: query i is column P - Q + i): causal over non-padding
    keys, with a window over the last `window` of them up to the query; padding query rows are zero."""
    batch, queries, heads, dim = q.shape
    offset = k.shape[1] - queries
    group = heads // k.shape[2]
    out = torch.zeros((batch, queries, heads, dim), dtype=torch.float64)
    for b in range(batch):
        start = int(seq_start[b])
        for i in range(max(0, start - offset), queries):
            column = offset + i
            first = start if window is None else max(start, column + 1 - window)
            for h in range(heads):
                out[b, i, h] = attention(
                    q[b, i, h],
                    k[b, first : column + 1, h // group],
                    v[b, first : column + 1, h // group],
                    scale,
                )
    return out


def segment_attention_decode(
    query, prompt_k, prompt_v, prompt_start, response_k, response_v, beam_slots, response_len, scale,
    window=None,
):  # fmt: skip
    """Dequantized caches in: prompt_* [R, Hkv, P, D], response_* [S, Hkv, C, D]; query [S, H, D]. With a
    window, each sequence attends to the last `window` of its keys (its padding comes before them all)."""
    num_seqs, heads, dim = query.shape
    requests, kv_heads = prompt_k.shape[:2]
    beams, group = num_seqs // requests, heads // kv_heads
    out = torch.zeros((num_seqs, heads, dim), dtype=torch.float64)
    for s in range(num_seqs):
        r = s // beams
        start = int(prompt_start[r])
        for h in range(heads):
            kv = h // group
            rows = [int(beam_slots[s, t]) for t in range(response_len)]
            keys = torch.cat(
                [prompt_k[r, kv, start:].double()]
                + [response_k[row, kv, t][None].double() for t, row in enumerate(rows)]
            )
            vals = torch.cat(
                [prompt_v[r, kv, start:].double()]
                + [response_v[row, kv, t][None].double() for t, row in enumerate(rows)]
            )
            if window is not None:
                keys, vals = keys[-window:], vals[-window:]
            out[s, h] = attention(query[s, h], keys, vals, scale)
    return out


def ggml_dequantize_row(row: bytes, type_name: str) -> list[float]:
    """One GGUF row of Q4_0 or Q4_1 blocks as ggml's dequantize_row_q4_0 / _q4_1 computes it, block by
    block and value by value in float32 (struct reads the float16 fields; numpy rounds each step)."""
    import struct

    import numpy as np

    f32 = np.float32
    block_bytes = {"Q4_0": 18, "Q4_1": 20}[type_name]
    values: list[float] = []
    for start in range(0, len(row), block_bytes):
        block = row[start : start + block_bytes]
        d = f32(struct.unpack("<e", block[0:2])[0])
        if type_name == "Q4_0":
            quads = block[2:18]
            low = [f32(byte & 0x0F) - f32(8) for byte in quads]
            high = [f32(byte >> 4) - f32(8) for byte in quads]
            values += [float(x * d) for x in low] + [float(x * d) for x in high]
        else:
            m = f32(struct.unpack("<e", block[2:4])[0])
            quads = block[4:20]
            values += [float(f32(byte & 0x0F) * d + m) for byte in quads]
            values += [float(f32(byte >> 4) * d + m) for byte in quads]
    return values


def ggml_dequantize_q4_k_row(row: bytes) -> list[float]:
    """One GGUF row of Q4_K blocks as ggml's dequantize_row_q4_K computes it (get_scale_min_k4 for each
    sub-block's 6-bit scale and minimum), in float32 step by step."""
    import struct

    import numpy as np

    f32 = np.float32

    def scale_min(j: int, q: bytes) -> tuple[int, int]:
        if j < 4:
            return q[j] & 63, q[j + 4] & 63
        return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)

    values: list[float] = []
    for start in range(0, len(row), 144):
        block = row[start : start + 144]
        d, dmin = (f32(value) for value in struct.unpack("<ee", block[0:4]))
        scales, quads = block[4:16], block[16:144]
        for run in range(4):
            codes = quads[32 * run : 32 * run + 32]
            for sub, shift in ((2 * run, 0), (2 * run + 1, 4)):
                sc, m = scale_min(sub, scales)
                d1, m1 = d * f32(sc), dmin * f32(m)
                values += [float(d1 * f32((byte >> shift) & 0xF) - m1) for byte in codes]
    return values


def ggml_dequantize_q8_0_row(row: bytes) -> list[float]:
    """One GGUF row of Q8_0 blocks as ggml's dequantize_row_q8_0 computes it: y = x[j] * d in float32."""
    import struct

    import numpy as np

    values: list[float] = []
    for start in range(0, len(row), 34):
        block = row[start : start + 34]
        d = np.float32(struct.unpack("<e", block[0:2])[0])
        values += [float(np.float32(q) * d) for q in struct.unpack("<32b", block[2:34])]
    return values


def ggml_dequantize_q6_k_row(row: bytes) -> list[float]:
    """One GGUF row of Q6_K blocks as ggml's dequantize_row_q6_K computes it, loop for loop: each half of
    128 columns takes 64 bytes of ql, 32 of qh and 8 scales; y[l + 32 j] = d * sc[l / 16 + 2 j] * q_j."""
    import struct

    import numpy as np

    f32 = np.float32
    values: list[float] = []
    for start in range(0, len(row), 210):
        block = row[start : start + 210]
        ql, qh = block[0:128], block[128:192]
        sc = struct.unpack("<16b", block[192:208])
        d = f32(struct.unpack("<e", block[208:210])[0])
        y = [0.0] * 256
        for half in range(2):
            low, high, scales = ql[64 * half :], qh[32 * half :], sc[8 * half :]
            for lane in range(32):
                index = lane // 16
                q1 = ((low[lane] & 0xF) | (((high[lane] >> 0) & 3) << 4)) - 32
                q2 = ((low[lane + 32] & 0xF) | (((high[lane] >> 2) & 3) << 4)) - 32
                q3 = ((low[lane] >> 4) | (((high[lane] >> 4) & 3) << 4)) - 32
                q4 = ((low[lane + 32] >> 4) | (((high[lane] >> 6) & 3) << 4)) - 32
                for j, q in enumerate((q1, q2, q3, q4)):
                    y[128 * half + lane + 32 * j] = float(d * f32(scales[index + 2 * j]) * f32(q))
        values += y
    return values


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, K] @ weight [N, K].T (+ bias) in float64, row by row."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float64)
    for row in range(x.shape[0]):
        out[row] = (weight.double() * x[row].double()).sum(dim=-1)
    return out if bias is None else out + bias.double()


def gptq_dequantize(qweight, qzeros, scales, g_idx, zero_minus_one: bool) -> torch.Tensor:
    """A GPTQ projection's weight [N, K] in float64, input feature by input feature from the format: input
    feature k of every output in bits 4(k % 8) of qweight[k / 8]; its group's zero point of output n in
    bits 4(n % 8) of qzeros[g, n / 8] (plus one in the v1 format, which stores zero - 1)."""
    inputs, outputs = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty(outputs, inputs, dtype=torch.float64)
    n = torch.arange(outputs)
    for k in range(inputs):
        group = int(g_idx[k])
        q = (qweight[k // 8].to(torch.int64) >> (4 * (k % 8))) & 15
        zero = ((qzeros[group, n // 8].to(torch.int64) >> (4 * (n % 8))) & 15) + (1 if zero_minus_one else 0)
        out[:, k] = (q - zero).double() * scales[group].double()
    return out


def awq_dequantize(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """An AWQ (GEMM format) projection's weight [N, K] in float64: output n's code in nibble
    [0, 2, 4, 6, 1, 3, 5, 7].index(n % 8) of qweight[k, n / 8], its zero likewise in qzeros[k / G, n / 8]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    inputs, outputs = qweight.shape[0], qweight.shape[1] * 8
    out = torch.empty(outputs, inputs, dtype=torch.float64)
    n = torch.arange(outputs)
    shifts = torch.tensor([4 * order.index(i % 8) for i in range(outputs)])
    for k in range(inputs):
        q = (qweight[k, n // 8].to(torch.int64) >> shifts) & 15
        zero = (qzeros[k // group_size, n // 8].to(torch.int64) >> shifts) & 15
        out[:, k] = (q - zero).double() * scales[k // group_size].double()
    return out
