"""The attention of a few query rows over many cached keys on the CPU, as a decode step needs it (the
segment cache's, decode.py, and the engine's pool's, paged.py): the native kernel (native.py) where it is
built, torch's flash kernel for CPU otherwise."""

from __future__ import annotations

import torch

from xpu_coopt.backends.cpu import native

_flash_for_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def attend_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    first_column: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, R, D] over key and value [B, H, C, D] (one dtype of bfloat16, float16 or float32;
    any strides with D contiguous): each row's attention output [B, H, R, D] in query's dtype and
    log-sum-exp [B, H, R] in float32, of scores scaled by `scale`. first_column (int64 [B]): batch b
    attends from that column on; a batch with none to attend gives zeros and a log-sum-exp of -inf.
    out: a contiguous [B, H, R, D] tensor of query's dtype to write the output into (the caller's)."""
    operands = (query, key, value)
    if any(t.dtype != query.dtype or t.stride(-1) != 1 for t in operands):
        raise ValueError(
            f"attend_rows takes query, key and value of one dtype with head_dim contiguous, got "
            f"{', '.join(str(t.dtype) for t in operands)} (strides {', '.join(str(t.stride()) for t in operands)})"
        )
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype or not out.is_contiguous()):
        raise ValueError(f"attend_rows writes a contiguous {tuple(query.shape)} {query.dtype} out")
    if native.library() is not None:
        return native.attend_rows(query, key, value, scale, first_column, out)
    result, lse = _attend_rows_flash(query, key, value, scale, first_column)
    return (result, lse) if out is None else (out.copy_(result), lse)


def _attend_rows_flash(query, key, value, scale, first_column):
    """attend_rows with torch's flash kernel for CPU: padding masked, and its K/V zeroed in copies (a zero
    weight times garbage could still be NaN)."""
    if first_column is None:
        return _flash_for_cpu(query, key, value, scale=scale)[:2]
    columns = key.shape[2]
    starts = first_column.clamp(0, columns).tolist()
    key, value = key.clone(), value.clone()
    mask = torch.zeros((query.shape[0], 1, 1, columns), dtype=query.dtype)
    for batch, start in enumerate(starts):
        key[batch, :, :start] = 0
        value[batch, :, :start] = 0
        mask[batch, ..., :start] = float("-inf")
    out, lse = _flash_for_cpu(query, key, value, attn_mask=mask, scale=scale)[:2]
    for batch, start in enumerate(starts):
        if start == columns:  # nothing to attend: the kernel gives zeros and a log-sum-exp of 0
            lse[batch] = float("-inf")
    return out, lse
