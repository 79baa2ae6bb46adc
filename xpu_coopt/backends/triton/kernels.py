"""The Triton implementation of every op in xpu_coopt/ops/schema.py (contracts: docs/ops.md).

Each kernel takes its op's validated call (ops/validate.py; LIMITS states what the Triton kernels support
beyond the contract) and launches it; Triton compiles a kernel per dtype, KV format and block sizes on
first use. They are registered as the ops' CUDA kernels;
backend="triton" also calls them on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from types import SimpleNamespace
from typing import NamedTuple

import torch
import triton

from xpu_coopt.backends.triton.attention import (
    attention_prefill_kernel,
    combine_splits_kernel,
    segment_attention_decode_kernel,
)
from xpu_coopt.backends.triton.codecs import codec_constants
from xpu_coopt.backends.triton.kv_write import rotary_kv_write_kernel
from xpu_coopt.backends.triton.norms import fused_add_rms_norm_kernel, rms_norm_kernel, silu_and_mul_kernel
from xpu_coopt.backends.triton.paged import paged_attention_kernel
from xpu_coopt.ops import checks, decode_split, fp8
from xpu_coopt.ops.calls import (
    AddNormCall,
    DecodeCall,
    KVWriteCall,
    Limits,
    NormCall,
    PagedCall,
    PrefillCall,
    SiluCall,
)
from xpu_coopt.ops.registry import register_backend

BACKEND = "Triton"
# Chosen by triton when it is imported; its bfloat16 tl.dot is wrong, so the attention kernels multiply
# bfloat16 blocks in float32 there (exact products, the same result).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 256
MAX_HIDDEN = 65536  # rms_norm holds a whole row in one block
# beams x query heads per KV head in one decode program; more are shared out (decode_split.chunk_rows)
MAX_DECODE_ROWS = 64
SILU_BLOCK = 1024
PREFILL_BLOCK_M, PREFILL_BLOCK_N = 32, 32
# paged_attention: 16 query rows a program (tl.dot's least; a decode has one), 32 keys a step
PAGED_BLOCK_M, PAGED_BLOCK_N = 16, 32
LIMITS = Limits(BACKEND, max_head_dim=MAX_HEAD_DIM, max_hidden=MAX_HIDDEN)


@dataclasses.dataclass(frozen=True)
class DecodeLaunch:
    """The decode kernel's launch constants (tuning scripts replace DECODE_LAUNCH: xpu_coopt/backends/triton/tuning.py)."""

    # Keys per block, by cache storage (measured on an H100, docs/benchmarks.md: 64 keeps a 16-bit cache
    # at 77-89% of the copy rate from 4k; 128 runs an FP8 cache 20% faster than 64).
    block_n_16bit: int = 64
    block_n_fp8: int = 128
    # Response steps per block (at most: a block's columns are these steps of every beam, and hold at most
    # MAX_RESPONSE_COLUMNS; response_steps).
    block_t: int = 16
    num_warps: int = 4
    # Triton's default on CUDA; 2, 4 and 5 stages were no faster for either cache (docs/benchmarks.md).
    num_stages: int = 3
    max_registers: int | None = None  # ptxas's default: up to 255 a thread
    programs_per_sm: int = 2  # decode programs (splits of the prompt segment) wanted per multiprocessor
    # Prompt columns a split covers at least: a shorter split costs more to combine than it saves. Under
    # the interpreter one block, so that the tests' small shapes exercise split decoding.
    min_chunk: int = 64 if INTERPRETED else 256
    # The prompt loop's FP8 tiles converted to 16 bits in the layout they were loaded in, before Triton
    # moves them into tl.dot's operand layout (codecs.decode_codes). Off, Triton moves the codes and
    # converts after, reading V's from shared memory a byte at a time: offline sm_90 SASS of the prompt
    # loop under Triton 3.6, 9.6 instructions a key off, 6.0 on (docs/benchmarks.md). Not yet timed on a
    # GPU: off.
    fp8_upcast_in_registers: bool = False

    def block_n(self, kv_dtype: str) -> int:
        return self.block_n_fp8 if fp8.is_fp8(kv_dtype) else self.block_n_16bit


DECODE_LAUNCH = DecodeLaunch()
# A response block's columns are (beam, step) pairs: at least 16 (tl.dot's smallest reduction), and at
# most 64, beyond which the block's K and V tiles outgrow the prompt loop's (16 beams x 16 steps of
# head_dim 128 took 141 KiB of shared memory, one block an SM).
MIN_RESPONSE_COLUMNS, MAX_RESPONSE_COLUMNS = 16, 64


def response_steps(launch: DecodeLaunch, beams: int) -> int:
    """Response steps a block of the decode kernel covers for each of `beams` (rounded up to a power of 2)."""
    beams = _block(beams)
    return max(MIN_RESPONSE_COLUMNS // beams, min(launch.block_t, MAX_RESPONSE_COLUMNS // beams), 1)


INTERPRETER_DECODE_PROGRAMS = 16


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot must multiply blocks of this dtype in float32 (the interpreter's bfloat16 dot)."""
    return INTERPRETED and dtype == torch.bfloat16


def _block(n: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(n))


def rms_norm(call: NormCall) -> None:
    out, input = call.out, call.input
    hidden = input.shape[1]
    if input.shape[0]:
        rms_norm_kernel[(input.shape[0],)](
            out,
            input,
            call.weight,
            call.epsilon,
            hidden,
            out.stride(0),
            input.stride(0),
            BLOCK=_block(hidden),
        )


def fused_add_rms_norm(call: AddNormCall) -> None:
    input, residual = call.input, call.residual
    hidden = input.shape[1]
    if input.shape[0]:
        fused_add_rms_norm_kernel[(input.shape[0],)](
            input, residual, call.weight, call.epsilon, hidden, input.stride(0), residual.stride(0),
            BLOCK=_block(hidden),
        )  # fmt: skip


def silu_and_mul(call: SiluCall) -> None:
    out, input = call.out, call.input
    rows, width = out.shape
    block = min(SILU_BLOCK, _block(width))
    if rows * width:
        silu_and_mul_kernel[(rows, triton.cdiv(width, block))](
            out, input, width, out.stride(0), input.stride(0), BLOCK=block
        )


def rotary_embedding_kv_write(call: KVWriteCall) -> None:
    """One kernel serves both ops: without query and cos_sin it only writes the cache (kv_write)."""
    query, key, value, cos_sin = call.query, call.key, call.value, call.cos_sin
    k_cache, v_cache, k_scale, v_scale = call.cache
    tokens, kv_heads, head_dim = key.shape
    if tokens == 0:
        return
    rotate = query is not None
    unused = key.new_empty(0, dtype=torch.float32)  # stands for absent pointers, never dereferenced
    rotary_kv_write_kernel[(tokens,)](
        query if rotate else key, key, value, cos_sin if rotate else key, k_cache, v_cache,
        unused if k_scale is None else k_scale, unused if v_scale is None else v_scale,
        call.cache_rows.contiguous(), call.cache_positions.contiguous(), call.heads, kv_heads, head_dim,
        query.stride(0) if rotate else 0, key.stride(0), value.stride(0), cos_sin.stride(0) if rotate else 0,
        *call.strides, ROTATE=rotate, STATIC_SCALE=call.static_scale, BLOCK_HEADS=_block(call.heads),
        BLOCK_KV=_block(kv_heads), BLOCK_HALF=_block(head_dim // 2), BLOCK_D=_block(head_dim),
        **codec_constants(call.kv_dtype),
    )  # fmt: skip


def attention_prefill(call: PrefillCall) -> None:
    query, key = call.query, call.key
    batch, queries, heads, head_dim = query.shape
    if batch * queries == 0:
        return
    attention_prefill_kernel[(triton.cdiv(queries, PREFILL_BLOCK_M), batch * heads)](
        call.out, query, key, call.value, call.seq_start.to(torch.int32).contiguous(), queries, call.columns, heads,
        key.shape[2], head_dim, call.scale, call.span,
        *(s for t in (query, key, call.value, call.out) for s in t.stride()[:2]),
        BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, BLOCK_D=_block(head_dim, 16),
        UPCAST_DOT=upcast_dot(query.dtype),
    )  # fmt: skip


class GpuFacts(NamedTuple):
    """What the launches depend on of the GPU the tensors live on."""

    capability: tuple[int, int]
    multiprocessors: int


@functools.cache
def _gpu(device: torch.device) -> GpuFacts | None:
    """The tensors' GPU; None under the interpreter (CPU tensors). xpu_coopt.backends.triton.offline stands a
    target GPU in for it."""
    if device.type != "cuda" or INTERPRETED:
        return None
    properties = torch.cuda.get_device_properties(device)
    return GpuFacts((properties.major, properties.minor), properties.multi_processor_count)


def _native_fp8(device: torch.device) -> bool:
    """Whether the GPU converts FP8 in hardware (sm_89 and newer); the interpreter and older GPUs decode
    codes with integer operations."""
    gpu = _gpu(device)
    return gpu is not None and gpu.capability >= (8, 9)


def _programs_to_fill(device: torch.device) -> int:
    """Decode programs that keep every multiprocessor busy (DECODE_LAUNCH.programs_per_sm each); a small
    number under the interpreter, so the tests' small shapes run the split path too."""
    gpu = _gpu(device)
    if gpu is None:
        return INTERPRETER_DECODE_PROGRAMS
    return DECODE_LAUNCH.programs_per_sm * gpu.multiprocessors


def decode_splits(programs: int, columns: int, device: torch.device, block_n: int) -> int:
    """Splits of the prompt columns for `programs` (request, KV head, row chunk) (decode_split.split_prompt),
    filling the GPU with DECODE_LAUNCH's min_chunk. Sized by the segment's capacity, so a captured graph stays
    valid as the sequence grows; the kernel shares out the columns a step reads among them."""
    return decode_split.split_prompt(
        programs, columns, _programs_to_fill(device), DECODE_LAUNCH.min_chunk, block_n
    )


def segment_attention_decode(call: DecodeCall) -> None:
    query, out = call.query, call.out
    num_seqs, heads, head_dim = query.shape
    if num_seqs == 0:
        return
    launch = DECODE_LAUNCH
    if launch.fp8_upcast_in_registers and _gpu(query.device) is None:
        raise ValueError(
            "segment_attention_decode: DecodeLaunch.fp8_upcast_in_registers needs compiled GPU code (inline "
            "assembly), which Triton's interpreter does not run"
        )
    block_n = launch.block_n(call.kv_dtype)
    codec = codec_constants(call.kv_dtype)
    # The softmax weights times V's FP8 scales are rounded to 16 bits V_BOOST times larger, out of
    # float16's subnormals (attention._attend_block); FP8_MAX / 2 cannot overflow, as a weight is at most 1
    # and a scale times FP8_MAX is about its row's amax.
    v_boost = codec["FP8_MAX"] / 2
    requests, kv_heads, table, lens = call.requests, call.kv_heads, call.block_table, call.segment_lens
    chunks = decode_split.chunk_rows(call.beams, call.group, MAX_DECODE_ROWS)
    splits = decode_splits(
        requests * kv_heads * chunks.chunks, min(call.prompt_len, call.span), query.device, block_n
    )
    unused = query.new_empty(0, dtype=torch.float32)  # stands for absent pointers, never dereferenced
    # Partials of a split decode: workspace of this call (inside a captured graph, from the graph's pool).
    rows = num_seqs * heads
    partial_acc = unused if splits == 1 else query.new_empty((splits, rows, head_dim), dtype=torch.float32)
    partial_stats = unused if splits == 1 else query.new_empty((splits, rows, 2), dtype=torch.float32)
    prompt = [unused if t is None else t for t in call.prompt]
    response = [unused if t is None else t for t in call.response]
    segment_attention_decode_kernel[(requests * kv_heads, splits, chunks.chunks)](
        out, query, *prompt, call.prompt_start.to(torch.int32).contiguous(), *response, call.beam_slots,
        unused if lens is None else lens, unused if table is None else table, partial_acc, partial_stats,
        call.beams, kv_heads, call.group, chunks.rows, head_dim, call.prompt_len, call.response_len,
        max(1, call.response[0].shape[2]), call.span, rows, call.scale, query.stride(0), out.stride(0),
        *checks.cache_strides("segment_attention_decode", *call.prompt),
        *checks.cache_strides("segment_attention_decode", *call.response),
        call.beam_slots.stride(0), 0 if table is None else table.stride(0), call.prompt[0].shape[2],
        BLOCK_ROWS=_block(chunks.rows, 16), BLOCK_N=block_n, BLOCK_T=response_steps(launch, chunks.beams),
        BEAMS=_block(chunks.beams), BLOCK_D=_block(head_dim, 16), UPCAST_DOT=upcast_dot(query.dtype),
        NATIVE_FP8=_native_fp8(query.device), HAS_LENS=lens is not None, SPLIT=splits > 1,
        FP8_UPCAST_IN_REGISTERS=launch.fp8_upcast_in_registers, PAGED=table is not None,
        RING=call.span != checks.UNBOUNDED_SPAN, V_BOOST=v_boost, **codec,
        num_warps=launch.num_warps, num_stages=launch.num_stages, maxnreg=launch.max_registers,
    )  # fmt: skip
    if splits > 1:
        combine_splits_kernel[(rows,)](
            out, partial_acc, partial_stats, splits, rows, heads, head_dim, out.stride(0),
            BLOCK_S=_block(splits), BLOCK_D=_block(head_dim),
        )  # fmt: skip


def paged_attention(call: PagedCall) -> None:
    """One launch a step (paged.py): the grid covers as many query blocks as the step has tokens, so the
    host never reads the sequences' lengths (a sequence's programs past its queries do nothing)."""
    query = call.query
    tokens, heads, head_dim = query.shape
    if tokens == 0:
        return
    k_pool, v_pool, k_scale, v_scale = call.pool
    unused = query.new_empty(0, dtype=torch.float32)  # stands for a 16-bit pool's absent scales, never read
    k_scale, v_scale = (unused if t is None else t for t in (k_scale, v_scale))
    scale_strides = [s for t in (k_scale, v_scale) for s in (t.stride()[:2] if t.dim() == 3 else (0, 0))]
    codec = codec_constants(call.kv_dtype)
    paged_attention_kernel[(triton.cdiv(tokens, PAGED_BLOCK_M), call.context_lens.shape[0] * heads)](
        call.out, query, k_pool, v_pool, k_scale, v_scale, call.block_tables, call.query_start, call.context_lens,
        heads, k_pool.shape[1], head_dim, call.block_size, call.scale, call.span, *query.stride()[:2],
        *call.out.stride()[:2], call.block_tables.stride(0), *k_pool.stride()[:3], *v_pool.stride()[:3],
        *scale_strides, BLOCK_M=PAGED_BLOCK_M, BLOCK_N=PAGED_BLOCK_N, BLOCK_D=_block(head_dim, 16),
        UPCAST_DOT=upcast_dot(query.dtype), NATIVE_FP8=_native_fp8(query.device), V_BOOST=codec["FP8_MAX"] / 2,
        **codec,
    )  # fmt: skip


ENTRIES = register_backend(sys.modules[__name__], LIMITS, "CUDA")


def triton_kernels() -> SimpleNamespace:
    """The Triton kernels' entries as plain functions: what backend="triton" calls (CUDA tensors, or CPU
    tensors under the interpreter)."""
    return ENTRIES
