"""KV cache layouts. Each cache owns the attention ops that read its layout (see SegmentKVCache.attend)."""

from xpu_coopt.cache.segment import RESPONSE_STEP, SegmentKVCache

KV_CACHE_KINDS = ("segment",)

__all__ = ["KV_CACHE_KINDS", "RESPONSE_STEP", "SegmentKVCache"]
