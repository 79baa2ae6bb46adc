"""Peak memory of loading a GGUF with xpu_coopt.from_pretrained, against the model's size in 16 bits.

    python scripts/gguf_load_memory.py [--preset llama-2-7b] [--type Q4_0] [--weight-dtype auto] [--folder DIR]

Writes a GGUF of a published shape (checkpoints.SHAPE_PRESETS) with random Q4_0 / Q4_1 (or F16)
projections, float16 embeddings and LM head, float32 norms and no tokenizer (once, into --folder), then
loads it in a fresh process with from_pretrained(dtype=bfloat16, weight_dtype=...) and prints that
process's peak RSS beside the checkpoint's 16-bit size and the weights the optimized model holds. `--type
F16 --weight-dtype int4` measures quantizing a 16-bit checkpoint while loading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from xpu_coopt.checkpoints import SHAPE_PRESETS
from xpu_coopt.quant.gguf_blocks import INT4_BLOCKS

LOAD = """
import json, resource, sys, time
import torch, xpu_coopt
start = time.perf_counter()
model, _ = xpu_coopt.from_pretrained(sys.argv[1], dtype=torch.bfloat16, weight_dtype=sys.argv[2],
                                     group_size=int(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - start, "weight_bytes": model.weight_bytes(),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def parameter_count(shape: dict) -> int:
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv_heads, vocab = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    head_dim = hidden // heads
    per_layer = hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 3 * hidden * inter + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


def write_gguf(path: Path, shape: dict, type_name: str) -> None:
    """Writes the GGUF."""
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
    generator = np.random.default_rng(0)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-2-7b", choices=sorted(SHAPE_PRESETS))
    parser.add_argument("--type", default="Q4_0", choices=[*sorted(INT4_BLOCKS), "F16"])
    parser.add_argument("--weight-dtype", default="auto", choices=["auto", "int4", "int8"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    path = args.folder / f"{args.preset}-random-{args.type}.gguf"
    parameters = parameter_count(SHAPE_PRESETS[args.preset])
    if not path.exists():
        write_gguf(path, SHAPE_PRESETS[args.preset], args.type)
    result = json.loads(subprocess.run([sys.executable, "-c", LOAD, str(path), args.weight_dtype, str(args.group_size)], check=True, capture_output=True,
                                       text=True).stdout.strip().splitlines()[-1])  # fmt: skip
    gib = 2**30
    print(f"{path.name}: file {path.stat().st_size / gib:.2f} GiB, the model in bfloat16 {2 * parameters / gib:.2f} GiB; "
          f"from_pretrained took {result['seconds']:.1f} s, peak RSS {result['peak_rss_bytes'] / gib:.2f} GiB, "
          f"weights held {result['weight_bytes'] / gib:.2f} GiB (weight_dtype={args.weight_dtype})")  # fmt: skip


if __name__ == "__main__":
    main()
