"""Where xpu_coopt keeps what it builds once and reuses across processes: the SYCL launcher and compiled
kernels (backends/sycl/runtime.py) and the embedded SmolLM2's converted copy (checkpoints.py).

One folder, $XPU_COOPT_CACHE or ~/.cache/xpu_coopt. Each entry's name carries a key of what it was made
from, so a changed input makes a new entry instead of reusing a stale one, and each entry appears whole or
not at all (made in a scratch folder beside it, then renamed), so concurrent processes (pytest-xdist
workers, two CLI runs) never read half of one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def cache_dir() -> Path:
    """$XPU_COOPT_CACHE or ~/.cache/xpu_coopt."""
    return Path(os.environ.get("XPU_COOPT_CACHE") or Path.home() / ".cache" / "xpu_coopt")


def key_of(parts: Iterable[str]) -> str:
    """A short digest naming what an entry was made from."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def make_entry(target: Path, write: Callable[[Path], None]) -> None:
    """Makes `target` (a file or a folder) by `write(scratch_path)`, then moves it into place in one step.
    Where another process made it meanwhile, its entry stays and this one is dropped."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".scratch-") as scratch:
        made = Path(scratch) / target.name
        write(made)
        try:
            os.replace(made, target)  # a file replaces a file; a folder takes a missing name only
        except OSError:
            if not target.exists():
                raise
            shutil.rmtree(made, ignore_errors=True)
