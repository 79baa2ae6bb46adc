"""No tensor of the KV cache spans layers: the largest single allocation is one layer's K or V, which
keeps a 7B model's long batches within what an Intel Arc A-series GPU can allocate at once (4 GiB)."""

from __future__ import annotations

import pytest
import torch

from xpu_coopt.cache import SegmentKVCache
from xpu_coopt.cache.paged import BLOCK_SIZE, PagedPrompt, blocks
from xpu_coopt.cache.storage import KVFormat
from xpu_coopt.cache.window import Window
from xpu_coopt.checkpoints import preset_config
from xpu_coopt.model.spec import model_spec

ARC_A_SERIES_LIMIT = 4 << 30  # bytes: the largest single allocation an Arc A-series GPU makes
META = torch.device("meta")  # shapes and sizes without memory


def _llama_2_7b():
    return model_spec(preset_config("llama-2-7b"), "LlamaForCausalLM")


@pytest.mark.parametrize("num_beams", [1, 4])
def test_a_7b_segment_cache_at_batch_4_of_4096_tokens_allocates_under_4_gib_at_once(num_beams):
    """Llama-2-7B in float16 (32 layers, 32 KV heads of 128), 4 prompts of 4096 tokens and 4096 new ones:
    8 GiB of K a layer-spanning tensor would have needed is 32 tensors of 256 MiB (one beam; with 4
    beams the prompt's 128 MiB and the response's 4 x 4 x 4096 rows' 512 MiB)."""
    spec = _llama_2_7b()
    prompt_start = torch.zeros(4, dtype=torch.int32, device=META)
    cache = SegmentKVCache(spec, prompt_start, 4096, num_beams, 4096, torch.float16, "auto")
    row_bytes = spec.num_kv_heads * spec.head_dim * 2  # one token's K (or V) of one layer
    # one beam: the prompt segment, prompt and response; beams: the response segment, a row per beam
    largest_rows = 4 * (4096 + 4096) if num_beams == 1 else 4 * num_beams * 4096
    assert cache.largest_allocation() == largest_rows * row_bytes < ARC_A_SERIES_LIMIT
    assert len(cache.tensors()) == 4 * spec.num_layers + 1  # K and V of two segments a layer, beam_slots
    all_keys = sum(layer.k.untyped_storage().nbytes() for layer in cache.prompt.storage.layers)
    assert all_keys >= ARC_A_SERIES_LIMIT  # what one tensor of every layer's prompt K would have taken


def test_a_7b_paged_pool_allocates_a_layer_at_a_time():
    """The paged pool, sized for 4 prompts of 4096 tokens and 4096 new ones (512 blocks a request and the
    sink), is a tensor per layer for K and V: 2049 blocks of 16 columns, 256 MiB, where one tensor over
    the layers would be 8 GiB."""
    spec = _llama_2_7b()
    kv = KVFormat(spec.num_layers, spec.num_kv_heads, spec.head_dim, "auto", torch.float16, META)
    paged = PagedPrompt(kv, 4, 4096 + 4096, Window(None), new_tokens=True)
    kept_start = torch.zeros(4, dtype=torch.int32)  # the plan is made on the host
    rows = torch.arange(4, device=META).repeat_interleave(4096)
    columns = torch.arange(4096, device=META).repeat(4)
    paged.map_prompt(kept_start, 4096, rows, columns, paged.capacity())
    assert paged.pool_blocks() == 1 + 4 * blocks(4096 + 4096)
    largest = max(tensor.untyped_storage().nbytes() for tensor in paged.tensors())
    assert (
        largest
        == paged.pool_blocks() * spec.num_kv_heads * BLOCK_SIZE * spec.head_dim * 2
        < ARC_A_SERIES_LIMIT
    )
    assert len(paged.storage.layers) == spec.num_layers
