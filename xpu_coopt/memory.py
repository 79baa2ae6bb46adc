"""Returning freed host memory to the system while a model loads, and how much a device has free."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path

import torch

MEMINFO = Path("/proc/meminfo")


def return_freed_memory() -> None:
    """Asks glibc to hand the heap's free pages back to the system (malloc_trim); a no-op elsewhere.

    Loading frees each projection's staging copies as it goes, but glibc keeps freed blocks of up to its
    mmap threshold (32 MB once grown) in the heap: a 7B model's loading then held 1.5 GiB that it had
    freed, on top of the weights (docs/benchmarks.md). Called once a projection or layer, it costs
    milliseconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return getattr(library, "malloc_trim", None)


def free_memory(device: torch.device) -> int:
    """Bytes the device has free now: a GPU's own report, or on the CPU the memory the OS can still give
    (Linux's MemAvailable)."""
    if device.type in ("cuda", "xpu"):
        free, _ = getattr(torch, device.type).mem_get_info(device)
        return int(free)
    if MEMINFO.exists():
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell how much memory this machine has free (no MemAvailable in /proc/meminfo): "
                       "give the KV pool's size in bytes")  # fmt: skip
