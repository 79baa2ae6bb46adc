"""The KV cache: per-layer storage (storage.py), the segment cache's bookkeeping (segment.py) over its
prompt segment's two layouts (prompt_segment.py, paged.py), the attention ops over it (attention.py),
device-held lengths for CUDA graphs (device_lengths.py), and the K/V a PrefixCache keeps between
generate() calls (held.py, prefix_cache.py)."""

from xpu_coopt.cache.held import HeldKV
from xpu_coopt.cache.paged import BLOCK_SIZE
from xpu_coopt.cache.segment import KV_CACHE_KINDS, RESPONSE_STEP, SegmentKVCache

__all__ = ["BLOCK_SIZE", "KV_CACHE_KINDS", "RESPONSE_STEP", "HeldKV", "SegmentKVCache"]
