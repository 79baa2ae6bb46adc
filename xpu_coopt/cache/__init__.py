"""KV cache layouts. Each cache owns the attention ops that read its layout (see SegmentKVCache.attend)."""

from xpu_coopt.cache.paged import BLOCK_SIZE, PagedKVCache
from xpu_coopt.cache.segment import RESPONSE_STEP, HeldKV, SegmentKVCache

# optimize(kv_cache=...): the class of each layout
KV_CACHE_KINDS = {"segment": SegmentKVCache, "paged": PagedKVCache}

__all__ = ["BLOCK_SIZE", "KV_CACHE_KINDS", "RESPONSE_STEP", "HeldKV", "PagedKVCache", "SegmentKVCache"]
