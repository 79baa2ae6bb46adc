"""Returning freed host memory to the system while a model loads."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


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
