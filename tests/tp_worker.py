"""One rank of the tensor-parallel tests (tests/parallel/): run in a process of its own, it joins a gloo
group and writes what it generated in each case to rank<N>.json."""

from __future__ import annotations

import functools
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import STORIES_MODEL, left_padded_prompts, require_data, tiny_model

import xpu_coopt
from xpu_coopt.checkpoints import load_llama2c
from xpu_coopt.parallel.shard import SHARDED
from xpu_coopt.quant.quantized_linear import QuantizedLinear
from xpu_coopt.quant.random_gguf import write_random_gguf
from xpu_coopt.quant.rtn import quantize_int4, quantize_int8

# (model, KV cache, variant): MHA, GQA with K/V heads the ranks split, MQA (one K/V head: each rank
# holds it), Qwen2's q/k/v biases, Llama's o_proj and MLP biases (row-parallel: added once), Qwen3's head
# norms, a sliding window, stories260K's real weights; an FP8 cache; int4 quantized per rank
# (weight_dtype), and 4- and 8-bit projections held as a quantized checkpoint holds them, split; with
# inplace=True, the whole projections released.
CASES = [
    ("llama-mha-d64", "segment", ""), ("llama-gqa-8q2kv-d64", "segment", ""), ("llama-gqa-8q2kv-d64", "paged", ""),
    ("llama-mqa-d128", "segment", ""), ("qwen2-bias", "paged", ""), ("llama-tied-bias", "segment", ""),
    ("qwen3-qk-norm", "segment", ""), ("mistral-window", "paged", ""), ("stories260K", "segment", ""),
    ("qwen2-bias", "segment", "fp8"), ("llama-gqa-8q2kv-d64", "segment", "int4"),
    ("llama-gqa-8q2kv-d64", "paged", "stored-int4"), ("qwen2-bias", "segment", "stored-int8"),
    ("llama-gqa-8q2kv-d64", "segment", "inplace"), ("llama-tied-bias", "paged", "inplace"),
]  # fmt: skip
GROUP_SIZE = 16
VARIANTS = {"": {}, "fp8": {"kv_dtype": "fp8_e4m3"}, "int4": {"weight_dtype": "int4", "group_size": GROUP_SIZE},
            "stored-int4": {}, "stored-int8": {}, "inplace": {"inplace": True}}  # fmt: skip


def model_for(name: str):
    if name == "stories260K":
        return load_llama2c(require_data(STORIES_MODEL))
    return tiny_model(name)


def case_id(name: str, kv_cache: str, variant: str) -> str:
    return "-".join(part for part in (name, kv_cache, variant) if part)


def _stored_quantized(hf_model, bits: int):
    """The model with each layer's projections held as a 4- or 8-bit checkpoint's (QuantizedLinear)."""
    quantize = functools.partial(quantize_int4, group_size=GROUP_SIZE) if bits == 4 else quantize_int8
    for layer in hf_model.model.layers:
        for block, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):  # fmt: skip
            for projection in names:
                linear = getattr(block, projection)
                bias = None if linear.bias is None else linear.bias.detach()
                setattr(block, projection, QuantizedLinear(quantize(linear.weight.detach()), bias))
    return hf_model


def generations(name: str, kv_cache: str, variant: str, tensor_parallel: int) -> dict:
    """Greedy, beam-search and sampled tokens of two left-padded prompts, and prompt lookup's of one."""
    hf_model = model_for(name)
    if variant.startswith("stored-int"):
        hf_model = _stored_quantized(hf_model, int(variant[len("stored-int") :]))
    model = xpu_coopt.optimize(
        hf_model, kv_cache=kv_cache, tensor_parallel=tensor_parallel, **VARIANTS[variant]
    )
    ids, mask = left_padded_prompts([5, 9], hf_model.config.vocab_size)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=4, do_sample=False)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20)
    lookup = None  # prompt lookup refuses a sliding window on every layer
    if not all(model.spec.layer_windows):
        lookup = model.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=8, prompt_lookup_num_tokens=3,
                                do_sample=False).tolist()  # fmt: skip
    return {"greedy": greedy.tolist(), "beams": beams.tolist(), "sampled": sampled.tolist(), "lookup": lookup,
            "kv_heads": model.spec.num_kv_heads, "heads": model.spec.num_heads,
            "weight_bytes": model.weight_bytes()}  # fmt: skip


def served(name: str, tensor_parallel: int) -> dict:
    """xpu_coopt.LLM's tokens for three prompts in one continuous batch: greedy, seeded and unseeded sampling."""
    model = xpu_coopt.optimize(model_for(name), kv_cache="paged", tensor_parallel=tensor_parallel)
    llm = xpu_coopt.LLM(model, num_blocks=64, block_size=4, max_num_batched_tokens=8)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    results = {}
    for kind, params in (
        ("greedy", {}),
        ("seeded", {"temperature": 1.0, "seed": 7}),
        ("unseeded", {"temperature": 1.0}),
    ):
        outputs = llm.generate(
            prompts, xpu_coopt.SamplingParams(max_tokens=10, ignore_eos=True, **params), progress=False
        )
        results[kind] = [output.token_ids for output in outputs]
    return results


GGUF_SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, rms_norm_eps=1e-5)  # fmt: skip


def write_gguf(folder: Path) -> Path:
    path = folder / "tiny-q4_0.gguf"
    write_random_gguf(path, GGUF_SHAPE, "Q4_0")
    return path


FOLDER_MODEL = "qwen2-bias"  # q/k/v biases: split with their rows while loading


def write_folder(folder: Path) -> Path:
    path = folder / FOLDER_MODEL
    tiny_model(FOLDER_MODEL).save_pretrained(path)
    return path


# (checkpoint, from_pretrained's weight_dtype): a GGUF's Q4_0 kept, a folder kept 16-bit or quantized
CHECKPOINTS = [("tiny-q4_0.gguf", "auto"), (FOLDER_MODEL, "auto"), (FOLDER_MODEL, "int4")]


def write_checkpoints(folder: Path) -> None:
    write_gguf(folder)
    write_folder(folder)


def from_checkpoint(path: Path, weight_dtype: str, tensor_parallel: int) -> dict:
    """from_pretrained's greedy tokens and held weights; with tensor_parallel, the checkpoint split while
    loading."""
    model, _ = xpu_coopt.from_pretrained(path, dtype=torch.float32, weight_dtype=weight_dtype, group_size=16,
                                         tensor_parallel=tensor_parallel)  # fmt: skip
    ids = torch.tensor([[5, 9, 17, 3, 100, 42]])
    tokens = model.generate(ids, max_new_tokens=10, do_sample=False).tolist()
    split = getattr(model.hf_model, SHARDED, None) is not None  # its layers split as they were read
    return {
        "greedy": tokens,
        "weight_bytes": model.weight_bytes(),
        "kv_heads": model.spec.num_kv_heads,
        "split": split,
    }


def run(rank: int, world: int, port: int, out: str, fail_rank: int | None = None) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    os.environ["XPU_COOPT_TP_TIMEOUT"] = "60"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # fmt: skip
    path = Path(out) / f"rank{rank}.json"
    try:
        if fail_rank is not None:
            model = xpu_coopt.optimize(tiny_model("llama-gqa-8q2kv-d64"), tensor_parallel=world)
            if rank == fail_rank:
                raise RuntimeError(f"rank {rank} fails on purpose")
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
            results = {"finished": True}
        else:
            results = {case_id(*case): generations(*case, tensor_parallel=world) for case in CASES}
            results["LLM"] = served("llama-gqa-8q2kv-d64", world)
            for name, weight_dtype in CHECKPOINTS:
                results[f"{name}/{weight_dtype}"] = from_checkpoint(Path(out) / name, weight_dtype, world)
    except Exception as error:  # reported to the test, which checks how the ranks ended
        results = {"error": f"{type(error).__name__}: {error}"}
    path.write_text(json.dumps(results))
