"""Projections the decoder runs: which modules they are, and sets of them fused into one GEMM."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from xpu_coopt.ops import Ops
from xpu_coopt.quant.int4 import Int4Weight, QuantizedLinear
from xpu_coopt.quant.rtn import quantize_int4


def is_plain_linear(module: nn.Module) -> bool:
    # Exact type: a subclass (quantized, LoRA, ...) may compute something other than x @ W.T + b.
    return type(module) is nn.Linear


def is_int4_linear(module: nn.Module) -> bool:
    """A projection of a quantized checkpoint xpu_coopt loaded (QuantizedLinear): run on its 4-bit GEMMs."""
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

    Other module types (quantized Linear layers, adapters) are called as they are and their outputs
    concatenated, so they keep working; always in eval mode, as xpu_coopt only infers (an adapter's dropout
    would otherwise run where the user's model is in train mode). A single plain Linear shares its weight with the HF model, unless
    pack_shared asks for a packed copy of it too. A fused matrix is xpu_coopt's own: the backend may pack it
    into its preferred layout (ops.pack_weight); if it keeps it plain and inplace is set, the HF modules
    become views of it so no weight is held twice.
    """

    def __init__(
        self, modules: list[nn.Module], dtype: torch.dtype, ops: Ops, inplace: bool, pack_shared: bool = False,
        int4_group_size: int | None = None,
    ) -> None:  # fmt: skip
        self.modules = None
        self.weight = self.bias = None
        self.linear = ops.linear
        self.int4 = all(is_int4_linear(m) for m in modules) or (
            int4_group_size is not None and all(is_plain_linear(m) for m in modules)
        )
        if self.int4:
            self._fuse_int4(modules, dtype, ops, inplace, int4_group_size)
            return
        if not all(is_plain_linear(m) for m in modules):
            self.modules = modules
            self._submodules = [sub for module in modules for sub in module.modules()]
            return
        weight = _concat([m.weight for m in modules], dtype)
        if any(m.bias is not None for m in modules):
            biases = [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules]
            self.bias = _concat(biases, dtype)
        owned = len(modules) > 1 or modules[0].weight.dtype != dtype
        if (owned or pack_shared) and ops.pack_weight is not None:
            weight = ops.pack_weight(weight, tuple(m.weight.detach() for m in modules))
        self.weight = weight
        # A packed weight is opaque to transformers: its modules then keep their own weights.
        if owned and inplace and len(modules) > 1 and isinstance(weight, torch.Tensor):
            _rebind_as_views(modules, weight, self.bias)

    def _fuse_int4(
        self, modules: list[nn.Module], dtype: torch.dtype, ops: Ops, inplace: bool, group_size: int | None
    ) -> None:
        """4-bit projections (QuantizedLinear, or plain ones quantized here to groups of `group_size`):
        their weights stacked and packed for the backend's 4-bit GEMM."""
        if ops.linear_int4 is None:
            raise ValueError(
                f"backend {ops.name!r} has no 4-bit GEMM (docs/ops.md, linear_int4): run 4-bit weights on the "
                "CPU, SYCL or Triton backend"
            )
        self.linear = ops.linear_int4
        weights = [
            m.weight_int4 if is_int4_linear(m) else quantize_int4(m.weight, group_size) for m in modules
        ]
        self.weight = ops.pack_int4(Int4Weight.concat(weights), dtype)
        if inplace:  # the backend's copy is made: the modules' own go now, not after every layer's
            for module in modules:
                if is_int4_linear(module):
                    module.release()
        if any(m.bias is not None for m in modules):
            device = weights[0].codes.device
            biases = [
                m.bias if m.bias is not None else torch.zeros(m.out_features, device=device) for m in modules
            ]
            self.bias = _concat(biases, dtype)

    @property
    def fusable(self) -> bool:
        """Whether the backend's GEMM fusions can take it: a plain 16-bit weight matrix."""
        return self.modules is None and not self.int4

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this projection holds or reads (a packed weight's plain parts included)."""
        if self.modules is not None:
            return [p for m in self.modules for p in m.parameters()]
        weight = self.weight
        held = list(weight.tensors()) if hasattr(weight, "tensors") else [weight]
        return held + ([self.bias] if self.bias is not None else [])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.modules is None:
            return self.linear(x, self.weight, self.bias)
        with _in_eval_mode(self._submodules):
            return torch.cat([m(x) for m in self.modules], dim=-1)


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
