"""Projections the decoder runs: which modules they are, and sets of them fused into one GEMM."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xpu_coopt.ops import Ops
from xpu_coopt.quant.quantized_linear import Quantize, QuantizedLinear


def is_plain_linear(module: nn.Module) -> bool:
    # Exact type: a subclass (quantized, LoRA, ...) may compute something other than x @ W.T + b.
    return type(module) is nn.Linear


def is_quantized_linear(module: nn.Module) -> bool:
    """A projection of a quantized checkpoint xpu_coopt loaded (QuantizedLinear): run on its 4- or 8-bit
    GEMMs."""
    return type(module) is QuantizedLinear


def projection_modules(hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(parameter-path name, module) of every projection the decoder runs: each layer's q/k/v/o and
    gate/up/down, and the LM head."""
    named = []
    for index, layer in enumerate(hf_model.model.layers):
        for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj"))):  # fmt: skip
            for name in names:
                named.append((f"model.layers.{index}.{block}.{name}", getattr(getattr(layer, block), name)))
    return [*named, ("lm_head", hf_model.lm_head)]


class FusedLinear:
    """Projections sharing one input, run as one GEMM when they are plain nn.Linear layers.

    xpu_coopt's QuantizedLinear layers (or plain ones quantized by `quantize`) run on the backend's 4- and
    8-bit GEMMs, one per run of weights of one kind. Other module types (foreign quantized layers,
    adapters) are called as they are and their outputs concatenated, so they keep working; always in eval mode, as xpu_coopt only infers (an adapter's dropout
    would otherwise run where the user's model is in train mode). A single plain Linear shares its weight with the HF model, unless
    pack_shared asks for a packed copy of it too. A fused matrix is xpu_coopt's own: the backend may pack it
    into its preferred layout (ops.pack_weight); if it keeps it plain and inplace is set, the HF modules
    become views of it so no weight is held twice.
    """

    def __init__(
        self, modules: list[nn.Module], dtype: torch.dtype, ops: Ops, inplace: bool, pack_shared: bool = False,
        quantize: Quantize | None = None,
    ) -> None:  # fmt: skip
        self.modules = None
        self.weight = self.bias = None
        self.linear = ops.linear
        self.parts: list[_QuantizedPart] = []
        ours = all(is_quantized_linear(m) or is_plain_linear(m) for m in modules)  # no foreign module
        self.quantized = ours and (
            any(is_quantized_linear(m) for m in modules)
            or (quantize is not None and all(is_plain_linear(m) for m in modules))
        )
        if self.quantized:
            self._fuse_quantized(modules, dtype, ops, inplace, quantize)
            return
        if not all(is_plain_linear(m) for m in modules):
            self.modules = modules
            self._submodules = [sub for module in modules for sub in module.modules()]
            return
        weight = _concat([m.weight for m in modules], dtype)
        if any(m.bias is not None for m in modules):
            self.bias = _concat(_biases(modules), dtype)
        owned = len(modules) > 1 or modules[0].weight.dtype != dtype
        if (owned or pack_shared) and ops.pack_weight is not None:
            weight = ops.pack_weight(weight, tuple(m.weight.detach() for m in modules))
        self.weight = weight
        # A packed weight is opaque to transformers: its modules then keep their own weights.
        if owned and inplace and len(modules) > 1 and isinstance(weight, torch.Tensor):
            _rebind_as_views(modules, weight, self.bias)

    def _fuse_quantized(
        self, modules: list[nn.Module], dtype: torch.dtype, ops: Ops, inplace: bool, quantize: Quantize | None
    ) -> None:
        """Quantized projections (QuantizedLinear, or plain ones quantized here): each run of weights of one
        kind (4-bit, 8-bit, 16-bit where a checkpoint mixes them) stacked into one GEMM of the backend's."""
        weights = [
            m.quantized_weight if is_quantized_linear(m) else quantize(m.weight) if quantize else m.weight
            for m in modules
        ]
        biases = _biases(modules) if any(m.bias is not None for m in modules) else None
        start = 0
        for run in _runs_of_one_kind(weights):
            stop = start + len(run)
            bias = None if biases is None else _concat(biases[start:stop], dtype)
            self.parts.append(_QuantizedPart.fuse(run, bias, dtype, ops))
            start = stop
        if inplace:  # the backend's copy is made: the modules' own go now, not after every layer's
            for module in modules:
                if is_quantized_linear(module):
                    module.release()
        if len(self.parts) == 1:
            self.linear, self.weight, self.bias = (
                self.parts[0].linear,
                self.parts[0].weight,
                self.parts[0].bias,
            )

    @property
    def fusable(self) -> bool:
        """Whether the backend's GEMM fusions can take it: a plain 16-bit weight matrix."""
        return self.modules is None and not self.quantized

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this projection holds or reads (a packed weight's plain parts included)."""
        if self.modules is not None:
            return [p for m in self.modules for p in m.parameters()]
        if self.parts:
            return [tensor for part in self.parts for tensor in part.tensors()]
        return _held_tensors(self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) > 1:
            return torch.cat([part(x) for part in self.parts], dim=-1)
        if self.modules is None:
            return self.linear(x, self.weight, self.bias)
        with _in_eval_mode(self._submodules):
            return torch.cat([m(x) for m in self.modules], dim=-1)


@dataclass(frozen=True)
class _QuantizedPart:
    """Consecutive projections of one weight kind, stacked and packed for the backend's GEMM of that kind."""

    linear: Callable[..., torch.Tensor]
    weight: Any
    bias: torch.Tensor | None

    @staticmethod
    def fuse(weights: list[Any], bias: torch.Tensor | None, dtype: torch.dtype, ops: Ops) -> _QuantizedPart:
        if isinstance(weights[0], torch.Tensor):  # 16-bit projections beside quantized ones
            return _QuantizedPart(ops.linear, _concat(weights, dtype), bias)
        pack, linear = ops.quantized_gemm(weights[0].bits)
        # One weight as it is (no copy: an LM head may share its tensors with the embeddings)
        stacked = weights[0] if len(weights) == 1 else type(weights[0]).concat(weights)
        return _QuantizedPart(linear, pack(stacked, dtype), bias)

    def tensors(self) -> list[torch.Tensor]:
        return _held_tensors(self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias)


def _runs_of_one_kind(weights: list[Any]) -> list[list[Any]]:
    """The weights split where their kind (layout class) changes, in order."""
    runs: list[list[Any]] = []
    for weight in weights:
        if runs and type(runs[-1][0]) is type(weight):
            runs[-1].append(weight)
        else:
            runs.append([weight])
    return runs


def _held_tensors(weight: Any, bias: torch.Tensor | None) -> list[torch.Tensor]:
    held = list(weight.tensors()) if hasattr(weight, "tensors") else [weight]
    return held + ([bias] if bias is not None else [])


def _biases(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Each module's bias, zeros where it has none."""
    return [m.bias if m.bias is not None else torch.zeros(m.out_features, device=_device(m)) for m in modules]


def _device(module: nn.Module) -> torch.device:
    return next(t for t in (*module.parameters(), *module.buffers()) if t is not None).device


@contextmanager
def _in_eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    """The modules in eval mode for the call, each one's own mode restored after: the user's model is
    left as it was."""
    training = [module for module in modules if module.training]
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


def _concat(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].detach().to(dtype)  # no copy when the dtype already matches
    return torch.cat([t.detach() for t in tensors], dim=0).to(dtype)


def _rebind_as_views(modules: list[nn.Module], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """inplace=True: point the HF modules at slices of the fused tensors, so no weight is held twice."""
    start = 0
    for module in modules:
        rows = module.out_features
        module.weight = nn.Parameter(weight[start : start + rows], requires_grad=False)
        if module.bias is not None:
            module.bias = nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
