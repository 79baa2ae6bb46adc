"""How a backend implements the contract: kernels that take validated calls, behind one entry per op.

A backend writes one kernel per op, named after it, taking that op's call record (ops/calls.py), and
registers its module with register_backend(). The entries it gets back take the op's schema arguments (ops/schema.py), call
the op's validator with the backend's Limits, then its kernel; they are what torch's dispatcher runs for
the backend's dispatch key and what a backend's Ops calls directly. So every backend accepts exactly what
the validators accept, and the op's argument list is written once, in its validator.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

from xpu_coopt.ops import validate
from xpu_coopt.ops.calls import Limits
from xpu_coopt.ops.schema import SCHEMAS, library

Kernel = Callable[[Any], None]


def register_backend(module: ModuleType, limits: Limits, dispatch_key: str) -> SimpleNamespace:
    """Entries for every op over the kernels of `module` (a function named after each op, taking the op's
    validated call; kv_write, where it has none, served by rotary_embedding_kv_write, which a call without
    query and cos_sin asks only to write), registered as the ops' `dispatch_key` implementations ("CPU",
    "XPU", "CUDA"); returned as a namespace of plain functions taking the ops' schema arguments."""
    kernels = {op: getattr(module, op, None) for op in SCHEMAS}
    kernels["kv_write"] = kernels["kv_write"] or kernels["rotary_embedding_kv_write"]
    missing = sorted(op for op, kernel in kernels.items() if kernel is None)
    if missing:
        raise ValueError(f"backend {limits.backend!r}: no kernel for {missing}")
    entries = {op: _entry(op, kernel, limits) for op, kernel in kernels.items()}
    for op, entry in entries.items():
        library().impl(op, entry, dispatch_key)
    return SimpleNamespace(**entries)


def _entry(op: str, kernel: Kernel, limits: Limits) -> Callable[..., None]:
    """The op's entry: its validator (validate.<op>, the schema's arguments after `limits`), then `kernel`."""
    validator = getattr(validate, op)

    def entry(*args: Any, **kwargs: Any) -> None:
        kernel(validator(limits, *args, **kwargs))

    signature = inspect.signature(validator)
    entry.__name__ = entry.__qualname__ = op
    entry.__doc__ = f"{op} on the {limits.backend} kernels (docs/ops.md)."
    parameters = list(signature.parameters.values())[1:]  # without limits
    entry.__signature__ = signature.replace(parameters=parameters, return_annotation=None)
    return entry
