"""Every op's schema and fake kernel, in one place. docs/ops.md is the prose form of this file.

Conventions (as in vLLM): the tensors an op writes come first and are marked `(a!)`; ops return nothing,
so callers own every allocation and a backend never hides one. Each backend (reference for CPU, SYCL for
XPU, Triton for CUDA) registers an implementation of exactly these schemas.

We register through `torch.library.Library.define` + `impl` rather than `torch.library.custom_op`:
the latter adds tens of microseconds of Python per call, which a decode step pays hundreds of times.
"""

from __future__ import annotations

import torch

NAMESPACE = "xpu_coopt"

# KV cache storage formats. "auto" stores K/V in the activation dtype; the FP8 formats store uint8 codes
# with one bfloat16 scale per (token, KV head).
KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")

# The attention ops' `window` when a query attends to every earlier key (no sliding window).
NO_WINDOW = -1

SCHEMAS: dict[str, str] = {
    # out[n, :] = input[n, :] * rsqrt(mean(input[n, :]^2) + epsilon) * weight
    "rms_norm": "rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float epsilon) -> ()",
    # residual += input; input = rms_norm(residual) * weight   (both in place)
    "fused_add_rms_norm": (
        "fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float epsilon) -> ()"
    ),
    # out = silu(input[..., :d]) * input[..., d:]
    "silu_and_mul": "silu_and_mul(Tensor(a!) out, Tensor input) -> ()",
    # Rotates query and key in place (neox / rotate-half layout), then writes key and value into the cache.
    # cos_sin holds each token's [cos | sin] row, gathered once per forward and shared by every layer.
    "rotary_embedding_kv_write": (
        "rotary_embedding_kv_write(Tensor(a!) query, Tensor(b!) key, Tensor value, "
        "Tensor cos_sin, Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor(e!)? k_scale, "
        "Tensor(f!)? v_scale, Tensor cache_rows, Tensor cache_positions, str kv_dtype, "
        "bool static_scale=False) -> ()"
    ),
    # Writes key and value into the cache, quantizing to FP8 when kv_dtype asks for it: with a dynamic
    # scale per (token, KV head) written to k_scale / v_scale, or with static_scale the scales already
    # there (a per-tensor scale expanded with zero strides), read and left unchanged.
    "kv_write": (
        "kv_write(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!)? k_scale, "
        "Tensor(d!)? v_scale, Tensor cache_rows, Tensor cache_positions, str kv_dtype, "
        "bool static_scale=False) -> ()"
    ),
    # Causal attention over a left-padded batch of prompts; rows before seq_start[b] are written as zeros.
    # key/value may hold more columns than query has rows: the queries are the last columns (a prompt
    # continued over the K/V of an earlier forward).
    # window (sliding-window attention, as Mistral's): a query attends to the last `window` keys up to
    # itself, itself included; -1 (NO_WINDOW): to all of them.
    "attention_prefill": (
        "attention_prefill(Tensor(a!) out, Tensor query, Tensor key, Tensor value, Tensor seq_start, "
        "float scale, int window=-1) -> ()"
    ),
    # One query token per sequence (beam) over the shared prompt segment of its request and its own
    # response history, which beam_slots maps to response-segment rows. segment_lens (int32 [2], optional)
    # holds the two segments' lengths on the device, so a captured CUDA graph can replay the call.
    # prompt_block_table (int32 [R, blocks], optional) makes the prompt segment paged: prompt_k is then a
    # pool of fixed-size blocks and row r's column n lives in block prompt_block_table[r, n / block_size].
    # prompt_len: the prompt segment's columns to attend (-1: all it holds). window: each sequence attends
    # to its last `window` columns only (prompt columns, then response steps), as attention_prefill's.
    "segment_attention_decode": (
        "segment_attention_decode(Tensor(a!) out, Tensor query, Tensor prompt_k, Tensor prompt_v, "
        "Tensor? prompt_k_scale, Tensor? prompt_v_scale, Tensor prompt_start, Tensor response_k, "
        "Tensor response_v, Tensor? response_k_scale, Tensor? response_v_scale, Tensor beam_slots, "
        "int response_len, float scale, str kv_dtype, Tensor? segment_lens=None, "
        "Tensor? prompt_block_table=None, int prompt_len=-1, int window=-1) -> ()"
    ),
    # A ragged batch of sequences over a pool of KV blocks (the serving engine's step): sequence s's queries
    # are rows query_start[s] .. query_start[s + 1] - 1 of query, the last of its context_lens[s] positions;
    # its keys are positions 0 .. context_lens[s] - 1, position p in cell p % block_size of block
    # block_tables[s, p / block_size]; causal within its queries, GQA, optional window as above.
    "paged_attention": (
        "paged_attention(Tensor(a!) out, Tensor query, Tensor k_pool, Tensor v_pool, Tensor? k_scale, "
        "Tensor? v_scale, Tensor block_tables, Tensor query_start, Tensor context_lens, float scale, "
        "str kv_dtype, int window=-1) -> ()"
    ),
}

_library = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _library.define(_schema)


def _no_output(*args: object, **kwargs: object) -> None:
    """Fake kernel shared by every op: they all return nothing and only write their `(a!)` arguments."""
    return None


for _name in SCHEMAS:
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _no_output, lib=_library)


def library() -> torch.library.Library:
    """The Library object that backends register their implementations on."""
    return _library
