"""The CPU backend: readable PyTorch kernels (kernels.py, prefill.py, decode.py) and the choice of torch's
GEMMs (gemm.py; 4- and 8-bit weights: gemm_int4.py, gemm_int8.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from xpu_coopt.backends.cpu import gemm, gemm_int4, gemm_int8, kernels


def cpu_kernels() -> SimpleNamespace:
    """The CPU kernels' entries as plain functions, whatever the device (backend="torch")."""
    return kernels.ENTRIES


def cpu_gemm_options() -> dict[str, Any]:
    """The CPU backend's GEMM choices, as Ops keyword arguments."""
    return {
        "linear": gemm.linear, "pack_weight": gemm.pack_weight,
        "linear_int4": gemm_int4.linear_int4, "pack_int4": gemm_int4.pack_int4,
        "linear_int8": gemm_int8.linear_int8, "pack_int8": gemm_int8.pack_int8,
    }  # fmt: skip
