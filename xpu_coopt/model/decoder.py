"""The LLaMA-family decoder on xpu_coopt's ops: one implementation, driven by ModelSpec.

Weights are read from the Hugging Face module tree by parameter name (model.layers.N.self_attn.q_proj, ...),
never through transformers' forward methods. Per layer:
    h = fused_add_rms_norm(h, residual)     residual += h, h = norm(residual)
    qkv = h @ W_qkv                          one GEMM (weights concatenated once)
    attn = attend(cache, q, k, v)            RoPE on q and k, K/V written into the cache, attention
    h = fused_add_rms_norm(attn @ W_o, residual)
    h = silu_and_mul(h @ W_gate_up) @ W_down one GEMM for gate and up
With a backend's GEMM fusions (ops.fusions) and few enough tokens (decode steps), four kernels instead:
    qkv = norm_linear(residual, W_qkv)       the norm in the GEMM
    residual += attn @ W_o                   linear_add: the residual add in the GEMM
    h = norm_linear(residual, W_gate_up, gated=True)   the norm, SiLU and the product in the GEMM
    residual += h @ W_down
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xpu_coopt.cache import SegmentKVCache
from xpu_coopt.cache.attention import attend
from xpu_coopt.memory import return_freed_memory
from xpu_coopt.model.embedding import embed, embedding_table, table_tensors
from xpu_coopt.model.linear import FusedLinear, Quantize
from xpu_coopt.model.rope import cos_sin_cache
from xpu_coopt.model.spec import ModelSpec
from xpu_coopt.ops import Ops
from xpu_coopt.parallel.group import TensorParallel

# The most bytes a prefill's gate/up GEMM writes at once: a long prompt runs it over chunks of rows, as
# its output (2 x intermediate a token) is a prefill's largest tensor and Arc A-series GPUs cannot make
# one allocation over 4 GiB (docs/xpu.md).
GATED_CHUNK_BYTES = 1 << 30


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor  # [hidden]
    qkv: FusedLinear  # hidden -> (H + 2 Hkv) * D
    o_proj: FusedLinear  # H * D -> hidden
    post_attention_norm: torch.Tensor  # [hidden]
    gate_up: FusedLinear  # hidden -> 2 * intermediate
    down_proj: FusedLinear  # intermediate -> hidden
    query_norm: torch.Tensor | None = None  # [D], each query head's RMSNorm before rope (Qwen3)
    key_norm: torch.Tensor | None = None  # [D], each key head's


def _unrotated(cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotary rows [cos | sin] of angle zero, shaped as cos_sin."""
    half = cos_sin.shape[-1] // 2
    return torch.cat((torch.ones_like(cos_sin[:, :half]), torch.zeros_like(cos_sin[:, half:])), dim=-1)


def _norm_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return module.weight.detach().to(dtype)


class LlamaDecoder:
    """Runs token ids through the decoder and the LM head, writing K/V into a cache."""

    def __init__(
        self,
        hf_model: nn.Module,
        spec: ModelSpec,
        ops: Ops,
        dtype: torch.dtype,
        inplace: bool,
        pack_shared: bool = False,
        quantize: Quantize | None = None,
        parallel: TensorParallel | None = None,
    ):
        """parallel: tensor parallelism; hf_model and spec are then the rank's part (parallel/shard.py)."""
        self.spec = spec
        self.parallel = parallel
        self.ops = ops
        self.dtype = dtype
        backbone = hf_model.model
        self.embed_tokens = embedding_table(backbone.embed_tokens, dtype)  # [vocab, hidden]
        self.layers = []
        for layer in backbone.layers:
            self.layers.append(
                self._layer(layer, dtype, ops, inplace, pack_shared, spec.query_key_norm, quantize)
            )
            if inplace:  # the layer's weights the backend copied were released: their memory goes back now
                return_freed_memory()
        self.final_norm = _norm_weight(backbone.norm, dtype)
        self.lm_head = FusedLinear([hf_model.lm_head], dtype, ops, inplace, pack_shared)  # hidden -> vocab
        self.cos_sin_cache = cos_sin_cache(
            spec.rope, spec.head_dim, spec.max_position_embeddings, self.embed_tokens.device
        )
        # The fused GEMMs take plain 16-bit weight matrices: quantized weights and a layer kept as its own
        # modules (foreign quantized layers, adapters) run every step unfused.
        # Nor do they take a partial sum that an all-reduce completes (tensor parallelism).
        fusable = all(p.fusable for p in self._projections()) and parallel is None
        self.fusions = ops.fusions if fusable else None

    @staticmethod
    def _layer(
        layer: nn.Module, dtype: torch.dtype, ops: Ops, inplace: bool, pack_shared: bool, query_key_norm: bool,
        quantize: Quantize | None,
    ) -> DecoderLayer:  # fmt: skip
        attn, mlp = layer.self_attn, layer.mlp
        quantized = {"quantize": quantize}
        return DecoderLayer(
            input_norm=_norm_weight(layer.input_layernorm, dtype),
            qkv=FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj], dtype, ops, inplace, **quantized),
            o_proj=FusedLinear([attn.o_proj], dtype, ops, inplace, pack_shared, **quantized),
            post_attention_norm=_norm_weight(layer.post_attention_layernorm, dtype),
            gate_up=FusedLinear([mlp.gate_proj, mlp.up_proj], dtype, ops, inplace, **quantized),
            down_proj=FusedLinear([mlp.down_proj], dtype, ops, inplace, pack_shared, **quantized),
            query_norm=_norm_weight(attn.q_norm, dtype) if query_key_norm else None,
            key_norm=_norm_weight(attn.k_norm, dtype) if query_key_norm else None,
        )

    def _projections(self) -> list[FusedLinear]:
        layers = [(layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj) for layer in self.layers]
        return [projection for projections in layers for projection in projections] + [self.lm_head]

    def weight_tensors(self) -> list[torch.Tensor]:
        """Every weight tensor the decoder reads, whether shared with the HF model or its own."""
        tensors = [*table_tensors(self.embed_tokens), self.final_norm]
        for layer in self.layers:
            tensors += [layer.input_norm, layer.post_attention_norm]
            tensors += [norm for norm in (layer.query_norm, layer.key_norm) if norm is not None]
        return tensors + [t for projection in self._projections() for t in projection.tensors()]

    def cover_positions(self, positions: int) -> None:
        """Extends the rotary table to hold at least `positions` positions (past max_position_embeddings,
        which transformers also allows for rope types whose frequencies do not depend on the length): it
        at least doubles, so a generation running past the table rebuilds it a few times only. The table
        moves, so a decode graph that reads it is captured again (model/decode_graph.py)."""
        held = self.cos_sin_cache.shape[0]
        if positions > held:
            spec = self.spec
            rows = max(positions, 2 * held)
            self.cos_sin_cache = cos_sin_cache(spec.rope, spec.head_dim, rows, self.cos_sin_cache.device)

    def new_cache(
        self,
        prompt_start: torch.Tensor,
        prompt_len: int,
        num_beams: int,
        max_new_tokens: int,
        kv_dtype: str,
        static_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: str = "segment",
        keep_whole_prompt: bool = False,
    ) -> SegmentKVCache:
        """A cache of layout `kv_cache` ("segment" or "paged") for this generation (keep_whole_prompt:
        SegmentKVCache's)."""
        return SegmentKVCache(
            self.spec, prompt_start, prompt_len, num_beams, max_new_tokens, self.dtype, kv_dtype, static_scales,
            keep_whole_prompt, kv_cache,
        )  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: SegmentKVCache,
        last_only: bool,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [N, L] (prefill: the padded prompts; decode: L = 1).

        Returns logits [N, L, vocab] in the model dtype, or [N, vocab] for the last position when last_only,
        or [len(logit_rows), vocab] for those rows of the flattened N * L tokens (the serving engine's
        ragged step: each sequence's last token).
        """
        spec, ops = self.spec, self.ops
        num_seqs, length = input_ids.shape
        heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        residual = embed(self.embed_tokens, input_ids.reshape(-1))  # [T, hidden]
        # Each token's rotary [cos | sin] row, rounded to the compute dtype (as transformers), for all layers.
        cos_sin = self.cos_sin_cache[positions.reshape(-1)].to(self.dtype)  # [T, D]
        # A layer without rope (SmolLM3's) takes rows of cos 1 and sin 0: q and k come out exactly as they went in.
        unrotated = None if all(spec.layer_rope) else _unrotated(cos_sin)
        tokens = residual.shape[0]
        fused = self.fusions is not None and tokens <= self.fusions.max_rows
        pending = None  # unfused: a sublayer's output, added to the residual by the next norm
        for index, layer in enumerate(self.layers):
            qkv = self._normed(layer.qkv, pending, residual, layer.input_norm, fused)  # [T, (H + 2 Hkv) * D]
            query = qkv[:, : heads * dim].view(tokens, heads, dim)
            key = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
            value = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
            if layer.query_norm is not None:
                query, key = self._head_norm(query, layer.query_norm), self._head_norm(key, layer.key_norm)
            rotary = cos_sin if spec.layer_rope[index] else unrotated
            attention = attend(self.ops, cache, index, query, key, value, rotary)  # [T, H * D]
            pending = self._residual_branch(layer.o_proj, attention, residual, fused)
            hidden = self._normed(layer.gate_up, pending, residual, layer.post_attention_norm, fused, True)
            pending = self._residual_branch(layer.down_proj, hidden, residual, fused)
        if fused:
            rows = residual.view(num_seqs, length, -1)
            rows = rows[:, -1] if last_only else rows
            rows = residual[logit_rows] if logit_rows is not None else rows
            return self._normed(self.lm_head, None, rows, self.final_norm, fused)
        hidden = ops.fused_add_rms_norm(pending, residual, self.final_norm, spec.rms_norm_eps)
        if logit_rows is not None:
            return self._logits(hidden[logit_rows])
        hidden = hidden.view(num_seqs, length, -1)
        if last_only:
            hidden = hidden[:, -1]
        return self._logits(hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits (with tensor parallelism, every rank's vocabulary slice gathered)."""
        logits = self.lm_head(hidden)
        if self.parallel is None:
            return logits
        return self.parallel.gather_columns(logits, self.spec.vocab_size)

    def _head_norm(self, heads: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of each [D] head row of heads [T, heads, D] (a strided view of the q/k/v GEMM's output)."""
        rows = heads.reshape(-1, heads.shape[-1])
        return self.ops.rms_norm(rows, weight, self.spec.rms_norm_eps).view(heads.shape)

    def _normed(
        self,
        projection: FusedLinear,
        pending: torch.Tensor | None,
        residual: torch.Tensor,
        norm_weight: torch.Tensor,
        fused: bool,
        gated: bool = False,
    ) -> torch.Tensor:
        """projection(rms_norm(residual += pending)); gated: silu_and_mul of that."""
        eps = self.spec.rms_norm_eps
        if fused:  # nothing pending: the fused GEMMs add their outputs to the residual themselves
            return self.fusions.norm_linear(
                residual, norm_weight, eps, projection.weight, projection.bias, gated
            )
        if pending is None:
            hidden = self.ops.rms_norm(residual, norm_weight, eps)
        else:
            hidden = self.ops.fused_add_rms_norm(pending, residual, norm_weight, eps)
        return self._gated_in_chunks(projection, hidden) if gated else projection(hidden)

    def _gated_in_chunks(self, projection: FusedLinear, hidden: torch.Tensor) -> torch.Tensor:
        """silu_and_mul(projection(hidden)) over as many rows at a time as keep the gate/up GEMM's output
        [rows, 2 x intermediate] under GATED_CHUNK_BYTES."""
        rows = max(1, GATED_CHUNK_BYTES // (2 * self.spec.intermediate_size * hidden.element_size()))
        if hidden.shape[0] <= rows:
            return self.ops.silu_and_mul(projection(hidden))
        return torch.cat([self.ops.silu_and_mul(projection(part)) for part in hidden.split(rows)])

    def _residual_branch(
        self, projection: FusedLinear, x: torch.Tensor, residual: torch.Tensor, fused: bool
    ) -> torch.Tensor | None:
        """projection(x): added to the residual now (fused), or returned for the next norm to add (summed
        over the ranks first, with tensor parallelism: a row-parallel projection's partial sums)."""
        if not fused:
            out = projection(x)
            return out if self.parallel is None else self.parallel.all_reduce(out)
        self.fusions.linear_add(x, projection.weight, projection.bias, residual)
        return None
