"""The CPU backend: readable PyTorch kernels (kernels.py) and oneDNN's GEMMs (gemm.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from xpu_coopt.backends.cpu import gemm, kernels  # importing kernels registers them as the ops' CPU kernels


def cpu_kernels() -> SimpleNamespace:
    """The CPU kernels as plain functions, whatever the device (backend="torch")."""
    return SimpleNamespace(**kernels.KERNELS)


def cpu_gemm_options() -> dict[str, Any]:
    """The CPU backend's GEMM choices, as Ops keyword arguments."""
    return {"linear": gemm.linear, "pack_weight": gemm.pack_weight}
