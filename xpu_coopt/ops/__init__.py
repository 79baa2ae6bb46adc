"""The op layer: allocating wrappers over one backend's kernels.

Model and cache code call these methods and never look at devices; which kernel runs is decided by the
backend's kernel table (for the device backends, torch's dispatcher picks the kernel by tensor device).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from xpu_coopt.ops.schema import KV_DTYPES, NAMESPACE, SCHEMAS

__all__ = [
    "KV_DTYPES",
    "SCHEMAS",
    "GemmFusions",
    "Ops",
    "dispatcher_kernels",
]


def dispatcher_kernels() -> Any:
    """The registered ops, dispatched by tensor device: torch.ops.xpu_coopt."""
    return getattr(torch.ops, NAMESPACE)


@dataclass(frozen=True)
class GemmFusions:
    """A backend's GEMMs with their neighbours in a decoder layer fused in, for up to max_rows activation
    rows (contract: docs/ops.md, "linear"). Plain weight matrices only.

    norm_linear(x, norm_weight, eps, weight, bias, gated) -> rms_norm(x) @ weight.T + bias; gated: silu(gate)
        * up of the product's two halves
    linear_add(x, weight, bias, residual) -> residual, after residual += x @ weight.T + bias
    """

    max_rows: int
    norm_linear: Callable[..., torch.Tensor]
    linear_add: Callable[..., torch.Tensor]


class Ops:
    """Allocating front end of a kernel table with one attribute per op in schema.SCHEMAS."""

    def __init__(
        self,
        kernels: Any,
        name: str,
        linear: Callable[..., torch.Tensor] = F.linear,
        pack_weight: Callable[..., Any] | None = None,
        fusions: GemmFusions | None = None,
        linear_int4: Callable[..., torch.Tensor] | None = None,
        pack_int4: Callable[..., Any] | None = None,
        linear_int8: Callable[..., torch.Tensor] | None = None,
        pack_int8: Callable[..., Any] | None = None,
    ) -> None:
        missing = [op for op in SCHEMAS if not hasattr(kernels, op)]
        if missing:
            raise ValueError(f"backend {name!r} lacks kernels for {missing}")
        self.kernels = kernels
        self.name = name
        # GEMMs are not ops of the schema (contract: docs/ops.md, "linear"): a backend chooses the kernel
        # that runs them, torch's or its own (Triton's few-row GEMM), and the layout of the weight
        # matrices it owns: pack_weight(fused, parts) -> what linear(x, w, bias) takes, where parts are
        # the plain matrices the fused one was concatenated from.
        self.linear = linear
        self.pack_weight = pack_weight
        self.fusions = fusions
        # 4- and 8-bit weights (docs/ops.md, "linear_int4", "linear_int8"): pack_int4(Int4Weight,
        # activation dtype) -> what linear_int4(x, w, bias) takes (8-bit alike); None where the backend
        # has no such GEMM.
        self.linear_int4 = linear_int4
        self.pack_int4 = pack_int4
        self.linear_int8 = linear_int8
        self.pack_int8 = pack_int8

    def quantized_gemm(self, bits: int) -> tuple[Callable[..., Any], Callable[..., torch.Tensor]]:
        """(pack, linear) of the backend's GEMM for `bits`-bit weights; ValueError where it has none."""
        pack, linear = getattr(self, f"pack_int{bits}", None), getattr(self, f"linear_int{bits}", None)
        if pack is None or linear is None:
            raise ValueError(
                f"backend {self.name!r} has no {bits}-bit GEMM (docs/ops.md, linear_int{bits}): run {bits}-bit "
                "weights on the CPU, SYCL or Triton backend"
            )
        return pack, linear

    def with_torch_gemms(self) -> Ops:
        """These kernels with torch's GEMMs, unfused (torch has no 4- or 8-bit GEMM: the backend's stay)."""
        return Ops(
            self.kernels, self.name, linear_int4=self.linear_int4, pack_int4=self.pack_int4,
            linear_int8=self.linear_int8, pack_int8=self.pack_int8,
        )  # fmt: skip

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        self.kernels.rms_norm(out, x, weight, eps)
        return out

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """residual += x in place; returns x, overwritten with rms_norm(residual)."""
        self.kernels.fused_add_rms_norm(x, residual, weight, eps)
        return x

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        out = gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))
        self.kernels.silu_and_mul(out, gate_up)
        return out
