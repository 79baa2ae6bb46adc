"""The object optimize() returns: forward and generate over the fused decoder and the segment KV cache."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from xpu_coopt.cache.prefix_cache import PrefixCache
from xpu_coopt.generation.output import ordinary
from xpu_coopt.generation.session import CacheSession, KeptSession
from xpu_coopt.kv_scales import KVScales
from xpu_coopt.model.decoder import LlamaDecoder
from xpu_coopt.model.linear import is_quantized_linear
from xpu_coopt.model.spec import ModelSpec


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [N, L, vocab] (or [N, 1, vocab] with logits_to_keep=1), model dtype
    cache: CacheSession
    loss: torch.Tensor | None = None  # with labels: the mean next-token cross-entropy, float32


# transformers' label for a position the loss skips (padding, prompt tokens not to be scored).
IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of each position's logits against the next position's label, skipping
    IGNORE_INDEX labels, in float32: transformers' loss for causal LMs given `labels`."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have input_ids' shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}"
        )
    targets = F.pad(labels[:, 1:].to(logits.device), (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten().long(), ignore_index=IGNORE_INDEX, reduction="mean"
    )


def prompt_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, spec: ModelSpec):
    """Validates a left-padded prompt batch; returns (attention_mask, positions [N, P], prompt_start [N])."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D tensor [batch, prompt_length]")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if input_ids.min() < 0 or input_ids.max() >= spec.vocab_size:
        raise ValueError(f"input_ids hold token ids outside the vocabulary [0, {spec.vocab_size})")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 and 1")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError(
            "attention_mask must be left-padded (zeros before each prompt's tokens, none after); "
            "with a Hugging Face tokenizer set tokenizer.padding_side = 'left'"
        )
    if (mask.sum(-1) == 0).any():
        raise ValueError("empty prompt: a row of attention_mask has no token")
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    prompt_start = (length - mask.sum(-1)).to(torch.int32)
    return mask, positions, prompt_start


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Memory the tensors hold, each storage counted once (views of one storage share its bytes)."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if tensor.is_meta:  # a shape without memory
            continue
        if tensor.layout == torch.strided:
            key, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
        else:  # an opaque tensor (oneDNN's packed layout) has no storage to share
            key, size = id(tensor), tensor.numel() * tensor.element_size()
        if key not in seen:
            seen.add(key)
            total += size
    return total


class OptimizedModel(nn.Module):
    """A Hugging Face LLaMA-family causal LM running on xpu_coopt's kernels.

    It shares the original model's weights (only the fused q/k/v and gate/up matrices are new tensors
    unless optimize(..., inplace=True)), and serves `forward` and `generate`. An nn.Module (holding the
    original model as its submodule `hf_model`), so code written for a transformers model's object, its
    text-generation pipeline included, takes it; it only infers, on the device and in the dtype it was
    optimized for (train(), to() and the other conversions are errors).
    """

    def __init__(
        self,
        hf_model: Any,
        decoder: LlamaDecoder,
        kv_dtype: str,
        backend: str,
        kv_scales: KVScales | None = None,
        cuda_graph: bool = False,
        kv_cache: str = "segment",
    ) -> None:
        super().__init__()
        self.training = False
        self.hf_model = hf_model
        self.config = hf_model.config
        self.generation_config = getattr(hf_model, "generation_config", None)
        self.decoder = decoder
        self.spec = decoder.spec
        self.dtype = decoder.dtype
        self.device = decoder.embed_tokens.device
        self.kv_dtype = kv_dtype
        self.kv_cache = kv_cache  # the prompt segment's layout, one of xpu_coopt.cache.KV_CACHE_KINDS
        self.backend = backend
        self.kv_scales = kv_scales  # None: dynamic per-row FP8 scales (or a 16-bit cache)
        self.static_scales = None if kv_scales is None else kv_scales.tensors(kv_dtype, self.device)
        self.cuda_graph = cuda_graph  # decode steps replay a captured CUDA graph (model/decode_graph.py)
        self._kept = KeptSession()  # the last generate()'s cache and decode graph, for the next
        # the projections' format optimize() chose: "auto" (as the model holds them), "int4 g<group size>", "int8"
        self.weight_dtype = "auto"

    def __repr__(self) -> str:
        return (
            f"OptimizedModel({self.spec.architecture}, layers={self.spec.num_layers}, dtype={self.dtype}, "
            f"kv_cache={self.kv_cache!r}, kv_dtype={self.kv_dtype!r}{', static KV scales' if self.kv_scales else ''}, backend={self.backend!r}, "
            f"cuda_graph={self.cuda_graph}, device={self.device})"
        )

    def can_generate(self) -> bool:
        """True, as transformers' models that generate (its pipelines ask)."""
        return True

    def train(self, mode: bool = True) -> OptimizedModel:
        """Itself, for mode=False (eval()): the model only ever infers, so transformers' model.eval() idiom
        keeps working and the original model's own mode is left as it is. mode=True is an error."""
        if mode:
            raise ValueError(
                "an optimized model only infers: train the transformers model, then optimize() it again"
            )
        return self

    def to(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Refused: the fused and packed weights and the kernels were chosen for this device and dtype.
        Move or convert the transformers model, then optimize() it there."""
        raise ValueError(
            f"an optimized model stays on {self.device} in {self.dtype}: move or convert the transformers model "
            "(model.to(...)) and call xpu_coopt.optimize(model, dtype=...) on it there"
        )

    # nn.Module's conversions (cuda(), half(), double(), type(), ...) all go through _apply.
    _apply = to_empty = to

    def weight_bytes(self) -> int:
        """Bytes of weights held for this model: the Hugging Face model's parameters and 4-bit weights (which
        it shares) plus xpu_coopt's own fused or packed copies."""
        quantized = [
            buffer
            for module in self.hf_model.modules()
            if is_quantized_linear(module)
            for buffer in module.buffers()
        ]
        return held_bytes([*self.hf_model.parameters(), *quantized, *self.decoder.weight_tensors()])

    def cover_length(self, total_length: int) -> None:
        """Makes the rotary table hold positions up to total_length. Past max_position_embeddings, as
        transformers: a warning (the model was not trained there), and dynamic rope scaling, whose
        frequencies would change with the length, is refused."""
        limit = self.spec.max_position_embeddings
        if total_length > limit:
            if self.spec.rope.rope_type == "dynamic":
                raise ValueError(
                    f"prompt plus new tokens is {total_length} tokens, more than the model's "
                    f"max_position_embeddings ({limit}); dynamic rope scaling beyond it is not supported"
                )
            warnings.warn(
                f"the generation runs past the model's max_position_embeddings ({limit}), beyond the positions "
                "it was trained on: outputs may degrade (as in transformers, which also generates there)",
                stacklevel=2,  # prefill's line (or decode's): shown once under default filters, as transformers
            )
            self.decoder.cover_positions(total_length)

    def keep_cache(self, session: CacheSession) -> None:
        """generate() hands its session back when it is done with it. One that has a captured decode graph
        is kept for the next generate() it fits (prefill(reuse_kept_cache=True)), which then replays that
        graph instead of capturing its own; release_cache() frees it."""
        self._kept.keep(session)

    def release_cache(self) -> None:
        """Frees the KV cache and CUDA graph kept from the last generate() (see keep_cache)."""
        self._kept.release()

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_beams: int = 1,
        max_new_tokens: int = 0,
        last_only: bool = True,
        reuse_kept_cache: bool = False,
        prefix_cache: PrefixCache | None = None,
    ) -> tuple[torch.Tensor, CacheSession]:
        """Runs each prompt once (not once per beam) and returns (logits, the session of a cache with room
        for the beams and max_new_tokens). reuse_kept_cache: prefill into the session keep_cache() kept,
        if this generation fits it (generate() does; a session returned to the caller may still be in
        use). prefix_cache: the prompt's first tokens that it holds are not run again
        (PrefixCache.reusable); the logits are then those of the tokens after them."""
        _, positions, prompt_start = prompt_layout(input_ids, attention_mask, self.spec)
        reused = 0 if prefix_cache is None else prefix_cache.reusable(self, input_ids, attention_mask)
        self.cover_length(input_ids.shape[1] + max_new_tokens)
        prompt_len = input_ids.shape[1]
        session = None
        if reuse_kept_cache:
            session = self._kept.take(prompt_start, prompt_len, num_beams, max_new_tokens)
        if session is None:
            cache = self.decoder.new_cache(
                prompt_start, prompt_len, num_beams, max_new_tokens, self.kv_dtype, self.static_scales,
                self.kv_cache,
            )  # fmt: skip
            session = CacheSession(self, cache)
        if reused:
            session.cache.continue_from(prefix_cache.kv.first(reused))
        if prefix_cache is not None:
            prefix_cache.reused_tokens = reused
        inputs = input_ids[:, reused:].long()
        logits = self.decoder.forward(inputs, positions[:, reused:], session.cache, last_only)
        session.cache.end_step()
        return logits, session

    def decode(self, next_tokens: torch.Tensor, session: CacheSession) -> torch.Tensor:
        """next_tokens: [S] (one per sequence) -> logits [S, vocab] in the model dtype (CacheSession.decode)."""
        return session.decode(next_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: CacheSession | None = None,
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Without a cache: prefill left-padded prompts [N, P]. With one: decode one token per sequence [S, 1].

        logits_to_keep=1 returns only the last position's logits (as transformers' argument of that name).
        labels [N, P] (with the prompts): also the loss, as transformers computes it (causal_lm_loss; label
        the left padding IGNORE_INDEX, -100, to leave it out).
        """
        if logits_to_keep not in (0, 1):
            raise ValueError(f"logits_to_keep must be 0 (all positions) or 1 (last), got {logits_to_keep}")
        if labels is not None and (cache is not None or logits_to_keep != 0):
            raise ValueError(
                "labels are scored over the whole prompt: pass them without a cache and logits_to_keep"
            )
        if cache is None:
            logits, cache = self.prefill(input_ids, attention_mask, last_only=logits_to_keep == 1)
            loss = None if labels is None else causal_lm_loss(logits, labels)
            logits = ordinary(logits if logits_to_keep == 0 else logits[:, None])
            return ModelOutput(logits, cache, loss)
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is only taken with the prompt; the cache keeps it for decode steps"
            )
        if input_ids.dim() != 2 or input_ids.shape != (cache.num_seqs, 1):
            raise ValueError(
                f"decode takes input_ids of shape ({cache.num_seqs}, 1) for this cache, got {tuple(input_ids.shape)}"
            )
        return ModelOutput(ordinary(self.decode(input_ids[:, 0], cache)[:, None]), cache)

    def generate(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ):
        """Greedy, sampling or beam search, with transformers' argument names (the prompt also as `inputs`,
        transformers' name). See xpu_coopt.generation."""
        from xpu_coopt.generation import generate

        if "inputs_embeds" in kwargs:
            raise TypeError("generate() takes token ids (input_ids), not inputs_embeds")
        if "inputs" in kwargs:
            if input_ids is not None:
                raise TypeError("generate() got the prompt twice: as input_ids and as inputs")
            input_ids = kwargs.pop("inputs")
        if input_ids is None:
            raise TypeError("generate() needs the prompt's token ids: input_ids (or inputs)")
        parallel = self.decoder.parallel
        if parallel is None:
            return generate(self, input_ids, attention_mask, **kwargs)
        # Tensor parallelism: every rank draws from one seed, so all sample the same tokens and stay in step.
        seed = parallel.broadcast_seed()
        accelerator = self.device.type != "cpu"
        with torch.random.fork_rng(
            devices=[self.device] if accelerator else [],
            device_type=self.device.type if accelerator else "cuda",
        ):
            torch.manual_seed(seed)
            return generate(self, input_ids, attention_mask, **kwargs)
