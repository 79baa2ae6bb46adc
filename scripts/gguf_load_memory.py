"""Peak memory of loading a GGUF with xpu_coopt.from_pretrained, against the model's size in 16 bits.

    python scripts/gguf_load_memory.py [--preset llama-2-7b] [--type Q4_0] [--weight-dtype auto] [--folder DIR]
                                       [--tensor-parallel N]

Writes a GGUF of a published shape (checkpoints.SHAPE_PRESETS) with random Q4_0 / Q4_1 (or F16)
projections, float16 embeddings and LM head, float32 norms and no tokenizer (once, into --folder), then
loads it in a fresh process with from_pretrained(dtype=bfloat16, weight_dtype=...) and prints that
process's peak RSS beside the checkpoint's 16-bit size and the weights the optimized model holds. `--type
F16 --weight-dtype int4` measures quantizing a 16-bit checkpoint while loading; `--tensor-parallel N`
loads it in N ranks under torchrun (gloo), each splitting the layers as it reads them, and prints each
rank's peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from xpu_coopt.checkpoints import SHAPE_PRESETS
from xpu_coopt.quant.gguf_blocks import INT4_BLOCKS
from xpu_coopt.quant.random_gguf import write_random_gguf

LOAD = """
import json, os, resource, sys, time
import torch, xpu_coopt
start = time.perf_counter()
model, _ = xpu_coopt.from_pretrained(sys.argv[1], dtype=torch.bfloat16, weight_dtype=sys.argv[2],
                                     group_size=int(sys.argv[3]), tensor_parallel=int(sys.argv[4]))
print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "seconds": time.perf_counter() - start,
                  "weight_bytes": model.weight_bytes(),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def parameter_count(shape: dict) -> int:
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv_heads, vocab = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    head_dim = hidden // heads
    per_layer = hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 3 * hidden * inter + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-2-7b", choices=sorted(SHAPE_PRESETS))
    parser.add_argument("--type", default="Q4_0", choices=[*sorted(INT4_BLOCKS), "F16"])
    parser.add_argument("--weight-dtype", default="auto", choices=["auto", "int4", "int8"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--tensor-parallel", type=int, default=1)
    args = parser.parse_args()
    path = args.folder / f"{args.preset}-random-{args.type}.gguf"
    parameters = parameter_count(SHAPE_PRESETS[args.preset])
    if not path.exists():
        write_random_gguf(path, SHAPE_PRESETS[args.preset], args.type)
    results = load(path, args)
    gib = 2**30
    for result in sorted(results, key=lambda r: r["rank"]):
        print(f"{path.name}: file {path.stat().st_size / gib:.2f} GiB, the model in bfloat16 {2 * parameters / gib:.2f} GiB; "
              f"rank {result['rank']} of {len(results)}: from_pretrained took {result['seconds']:.1f} s, peak RSS "
              f"{result['peak_rss_bytes'] / gib:.2f} GiB, weights held {result['weight_bytes'] / gib:.2f} GiB "
              f"(weight_dtype={args.weight_dtype})")  # fmt: skip


def load(path: Path, args: argparse.Namespace) -> list[dict]:
    """Each rank's measures, from fresh processes (torchrun's with --tensor-parallel)."""
    script = args.folder / "xpu_coopt-gguf-load.py"
    script.write_text(LOAD)
    command = [sys.executable, str(script)]
    if args.tensor_parallel > 1:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--nproc-per-node", str(args.tensor_parallel), str(script)]
    output = subprocess.run([*command, str(path), args.weight_dtype, str(args.group_size), str(args.tensor_parallel)],
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


if __name__ == "__main__":
    main()
