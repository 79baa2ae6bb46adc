"""A GGUF of random weights in a published shape: for measuring loading (scripts/gguf_load_memory.py) and
for tests, where no model hub is at hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xpu_coopt.quant.gguf_blocks import INT4_BLOCKS


def write_random_gguf(path: Path, shape: dict[str, Any], type_name: str, seed: int = 0) -> None:
    """Writes a llama GGUF of `shape` (checkpoints.SHAPE_PRESETS' fields) with random `type_name` (Q4_0, Q4_1
    or F16) projections, float16 embeddings and LM head, unit float32 norms and no tokenizer."""
    import gguf

    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv_heads, vocab = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(shape["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(shape["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    generator = np.random.default_rng(seed)

    def blocks(rows: int, columns: int) -> np.ndarray:
        if type_name == "F16":
            return float16(rows, columns)
        block_bytes, _ = INT4_BLOCKS[type_name]
        raw = generator.integers(0, 256, size=(rows, columns // 32, block_bytes), dtype=np.uint8)
        raw[..., :2] = np.array([0.01], dtype=np.float16).view(np.uint8)
        return raw.reshape(rows, -1)

    def float16(rows: int, columns: int) -> np.ndarray:
        return (generator.standard_normal((rows, columns), dtype=np.float32) * 0.02).astype(np.float16)

    quantized = None if type_name == "F16" else gguf.GGMLQuantizationType[type_name]
    writer.add_tensor("token_embd.weight", float16(vocab, hidden))
    writer.add_tensor("output.weight", float16(vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    projections = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden),
                   "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, heads * head_dim),
                   "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}  # fmt: skip
    for layer in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(hidden, dtype=np.float32))
        for name, (rows, columns) in projections.items():
            writer.add_tensor(f"blk.{layer}.{name}.weight", blocks(rows, columns), raw_dtype=quantized)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
