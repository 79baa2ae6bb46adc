"""Rotary embedding tables: inverse frequencies for the supported rope types, and the cos/sin cache.

The formulas are those of the published models (as transformers computes them), in float32, so that
positions rotate exactly as in the reference implementation.
"""

from __future__ import annotations

import math

import torch

from xpu_coopt.model.spec import RopeSpec


def inverse_frequencies(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """float32 [head_dim // 2]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_frequencies(inv_freq, rope)
    if rope.rope_type == "yarn":
        return _yarn_frequencies(inv_freq, rope, head_dim)
    # "dynamic" (NTK scaling) raises theta only for sequences longer than max_position_embeddings, which
    # OptimizedModel.cover_length refuses: within them its frequencies are the default ones, exactly.
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen = old_context / rope.low_freq_factor
    high_freq_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_frequencies(inv_freq: torch.Tensor, rope: RopeSpec, head_dim: int) -> torch.Tensor:
    # YaRN (arXiv 2309.00071): frequencies that turn fewer than beta_slow times over the pretraining
    # context are interpolated (divided by factor), those turning more than beta_fast times kept, a linear
    # ramp over the dimensions between.
    def dimension_of(rotations: float) -> float:  # the dimension turning `rotations` times in the context
        context = rope.original_max_position_embeddings
        return head_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dimension_of(rope.beta_fast), dimension_of(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    # weight of the interpolated frequency: 0 up to dimension `low`, 1 from `high` on
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / rope.factor * ramp + inv_freq * (1 - ramp)


def cos_sin_cache(rope: RopeSpec, head_dim: int, max_positions: int, device: torch.device) -> torch.Tensor:
    """float32 [max_positions, head_dim]: cos of each frequency in the first half, sin in the second."""
    inv_freq = inverse_frequencies(rope, head_dim).to(device)
    positions = torch.arange(max_positions, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    # YaRN scales both (attention_factor 1 elsewhere), before the model rounds them to its dtype.
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * rope.attention_factor
