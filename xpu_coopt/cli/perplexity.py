"""Perplexity of a model on a text, with xpu_coopt's attention reading K/V back from its cache.

Method: chunked, non-overlapping windows. The text's tokens are cut into windows of `context` tokens
(stride = context; the remainder is dropped). A window's first token has no context and is not scored;
each later token is scored once, from the logits of the tokens before it in its window only.

- transformers scores a window with one forward pass (its standard perplexity recipe).
- xpu_coopt prefills the window's first token, then decodes the rest one token at a time, feeding the
  text's next token (teacher forcing). So every scored token's attention reads all earlier K/V back from
  the cache, in the cache's format (16-bit or FP8, dynamic or static scales), exactly as generation does;
  a single prefill pass would attend over full-precision K/V and never exercise an FP8 cache.

Both score the same tokens, so their perplexities compare directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class Perplexity:
    name: str  # "transformers" or the xpu_coopt configuration, e.g. "xpu_coopt fp8_e4m3"
    perplexity: float
    tokens: int  # tokens scored
    kv_bytes: int | None = None  # KV cache bytes for one batch of windows (None for transformers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """The text's token ids (int64 [N]), without special tokens; at most max_tokens of them.

    Tokenizers that encode whole texts slowly (the llama2.c one is quadratic) get it line by line, which
    for these files (one paragraph per line) gives the same tokens up to line boundaries.
    """
    if hasattr(tokenizer, "pieces"):  # xpu_coopt.checkpoints.Llama2cTokenizer
        ids: list[int] = []
        for line in text.splitlines():
            if line.strip():
                ids.extend(tokenizer.encode(line, bos=False))
            if max_tokens is not None and len(ids) >= max_tokens:
                break
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def token_windows(ids: torch.Tensor, context: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [W, context] over the first max_tokens ids (all when None)."""
    if context < 2:
        raise ValueError(
            f"context must be at least 2 tokens (one to condition on, one to score), got {context}"
        )
    usable = ids.numel() if max_tokens is None else min(max_tokens, ids.numel())
    windows = usable // context
    if windows == 0:
        raise ValueError(
            f"the text has {ids.numel()} tokens, too short for one window of {context} tokens: "
            "give a longer text or a shorter --context"
        )
    return ids[: windows * context].view(windows, context)


def _progress(windows: torch.Tensor, name: str, progress: bool) -> tqdm:
    """A bar over the tokens to score."""
    total = windows.shape[0] * (windows.shape[1] - 1)
    return tqdm(total=total, desc=name, unit="tok", disable=not progress, leave=False)


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="sum").item()


@torch.inference_mode()
def transformers_perplexity(
    hf_model: Any, windows: torch.Tensor, batch_size: int = 1, progress: bool = True
) -> Perplexity:
    """transformers' own forward pass over each window (full-precision K/V, no cache)."""
    device = next(hf_model.parameters()).device
    total = 0.0
    with _progress(windows, "transformers", progress) as bar:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = hf_model(input_ids=batch, use_cache=False).logits
            total += _nll_sum(logits[:, :-1], batch[:, 1:])
            bar.update(batch[:, 1:].numel())
    scored = windows.shape[0] * (windows.shape[1] - 1)
    return Perplexity("transformers", math.exp(total / scored), scored)


@torch.inference_mode()
def cached_perplexity(
    model: Any, windows: torch.Tensor, batch_size: int = 8, name: str | None = None, progress: bool = True
) -> Perplexity:
    """xpu_coopt (an OptimizedModel): each window's first token prefilled, every later one decoded against
    the cache (teacher forcing), so attention reads every earlier token's K/V from the cache."""
    name = name or f"xpu_coopt {model.kv_dtype}" + (" static" if model.kv_scales else "")
    if model.weight_dtype != "auto":
        name += f", weights {model.weight_dtype}"
    length = windows.shape[1]
    total, kv_bytes = 0.0, 0
    with _progress(windows, name, progress) as bar:
        for batch in windows.split(batch_size):
            batch = batch.to(model.device)
            logits, cache = model.prefill(batch[:, :1], max_new_tokens=length - 1)
            total += _nll_sum(logits, batch[:, 1])
            for step in range(1, length - 1):
                logits = model.decode(batch[:, step], cache)
                total += _nll_sum(logits, batch[:, step + 1])
                bar.update(batch.shape[0])
            bar.update(batch.shape[0])
            kv_bytes = max(kv_bytes, cache.nbytes())
    scored = windows.shape[0] * (length - 1)
    return Perplexity(name, math.exp(total / scored), scored, kv_bytes)


def evaluate(
    hf_model: Any,
    optimized: Iterable[Any],
    windows: torch.Tensor,
    batch_size: int,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[Perplexity]:
    """transformers first, then each optimized model, on the same windows."""
    results = [transformers_perplexity(hf_model, windows, 1, progress)]
    if log:
        log(f"{results[-1].name}: {results[-1].perplexity:.4f}")
    for model in optimized:
        results.append(cached_perplexity(model, windows, batch_size, progress=progress))
        if log:
            log(f"{results[-1].name}: {results[-1].perplexity:.4f}")
    return results


def format_table(results: list[Perplexity], reference: str = "xpu_coopt auto") -> str:
    """A Markdown table; changes and KV ratios are against the `reference` row (the 16-bit cache)."""
    base = next((r for r in results if r.name == reference), None)
    lines = [
        "| configuration | perplexity | vs xpu_coopt auto | KV bytes | KV vs 16-bit |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        change = f"{100 * (r.perplexity / base.perplexity - 1):+.2f}%" if base else "-"
        kv = "-" if r.kv_bytes is None else f"{r.kv_bytes / 2**20:.2f} MiB"
        ratio = "-" if r.kv_bytes is None or not base else f"{r.kv_bytes / base.kv_bytes:.3f}x"
        lines.append(f"| {r.name} | {r.perplexity:.4f} | {change} | {kv} | {ratio} |")
    return "\n".join(lines)
