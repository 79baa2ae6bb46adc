"""Choosing the kernels: backend names, what each device gets with "auto", and clear errors otherwise."""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import torch

from xpu_coopt.backends.cpu import cpu_gemm_options, cpu_kernels
from xpu_coopt.backends.sycl import linear_quantized as sycl_quantized
from xpu_coopt.backends.sycl.kernels import sycl_kernels
from xpu_coopt.backends.sycl.runtime import queue_for
from xpu_coopt.errors import BackendUnavailableError
from xpu_coopt.ops import Ops, dispatcher_kernels

BACKENDS = ("auto", "torch", "sycl", "triton")
# The backend "auto" picks for each device type: the kernels registered for it in torch's dispatcher.
DEVICE_BACKENDS = {"cpu": "torch", "cuda": "triton", "xpu": "sycl"}
# Oldest NVIDIA GPUs the Triton kernels are compiled and tested for (Ampere: bfloat16 tensor cores).
MIN_CUDA_CAPABILITY = (8, 0)


def _triton_reasons(device: torch.device) -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["Triton is not installed: pip install 'xpu_coopt[triton]'"]
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CUDA_CAPABILITY:
            return [
                f"the Triton kernels need an NVIDIA GPU of compute capability "
                f"{'.'.join(map(str, MIN_CUDA_CAPABILITY))} or newer, this one is {'.'.join(map(str, capability))}"
            ]
        return []
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return [
                "on cpu tensors the Triton kernels run only under Triton's interpreter (TRITON_INTERPRET=1, set "
                "before Python starts; slow, for tests); backend='auto' runs the CPU kernels"
            ]
        return []
    return [
        f"the Triton kernels run on cuda tensors (and cpu tensors under the interpreter), not {device.type}"
    ]


def _triton_kernels() -> Any:
    """Imports the Triton backend (registering the ops' CUDA kernels) only when it is asked for."""
    return importlib.import_module("xpu_coopt.backends.triton.kernels").triton_kernels()


def _unavailable_reasons(backend: str, device: torch.device) -> list[str]:
    if backend == "torch":
        return []
    if backend == "sycl":
        if device.type not in ("xpu", "cpu"):
            return [
                f"the SYCL kernels run on xpu tensors (and cpu tensors, on the OpenCL CPU device), not {device.type}"
            ]
        try:
            queue_for(device)  # loads the runtime and finds the device now, not at the first kernel
        except BackendUnavailableError as error:
            return [str(error)]
        return []
    if backend == "triton":
        return _triton_reasons(device)
    return [f"unknown backend {backend!r}"]


def resolve_backend(backend: str, device: torch.device) -> Ops:
    """The Ops for `backend` on `device`; BackendUnavailableError or ValueError naming the problem."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    name = DEVICE_BACKENDS.get(device.type) if backend == "auto" else backend
    if name is None:
        raise BackendUnavailableError(
            f"no backend for device type {device.type!r}; xpu_coopt runs on {', '.join(DEVICE_BACKENDS)}"
        )
    reasons = _unavailable_reasons(name, device)
    if reasons:
        raise BackendUnavailableError(
            f"backend {name!r} is not available on {device}: "
            + "; ".join(reasons)
            + ". Pass backend='torch' to run the PyTorch reference kernels explicitly."
        )
    if name == "sycl":
        # Compiled now, not at the first kernel call: the first use on a device takes seconds a source (with
        # a progress bar), and a source that does not compile fails here, naming the compiler's error.
        queue_for(device).build_all()
    # Ops options. GEMMs are torch's, with the reference backend's choice of kernels on CPU tensors; Triton
    # runs the few-row GEMMs of decode steps with its own kernel, fused with their neighbours, on either
    # device.
    options = cpu_gemm_options() if device.type == "cpu" else {}
    kernels = None
    if name == "triton":
        kernels = _triton_kernels()  # registers the CUDA kernels
        triton_linear = importlib.import_module("xpu_coopt.backends.triton.linear")
        triton_quantized = importlib.import_module("xpu_coopt.backends.triton.linear_quantized")
        options = {
            "linear": triton_linear.linear, "fusions": triton_linear.FUSIONS,
            **quantized_gemm_options(triton_quantized),
        }  # fmt: skip
    if name == "sycl":
        # 4- and 8-bit GEMMs run the SYCL kernel on either device (torch has none for XPU tensors).
        options = {**options, **quantized_gemm_options(sycl_quantized)}
    if backend == "auto" and device.type == "cpu":
        # The kernels registered for CPU, called directly: the dispatcher's argument handling would cost
        # 3-15 us a call, about 1.2 ms (3%) of a beam-4 decode step of SmolLM2-135M.
        return Ops(cpu_kernels(), name, **options)
    if backend == "auto":
        # torch's dispatcher picks the kernel registered for the tensors' device.
        return Ops(dispatcher_kernels(), name, **options)
    if name == "sycl":  # also on CPU tensors: the SYCL kernels on the OpenCL CPU device
        return Ops(sycl_kernels(), name, **options)
    if name == "triton":  # also on CPU tensors, under Triton's interpreter
        return Ops(kernels, name, **options)
    # backend="torch" asked for explicitly: the reference kernels as plain functions, on any device.
    return Ops(cpu_kernels(), name, **cpu_gemm_options())


def quantized_gemm_options(module: Any) -> dict[str, Any]:
    """A backend module's 4- and 8-bit GEMMs, as Ops keyword arguments."""
    return {name: getattr(module, name) for name in ("linear_int4", "pack_int4", "linear_int8", "pack_int8")}
