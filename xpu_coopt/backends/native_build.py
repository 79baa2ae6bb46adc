"""Shared libraries xpu_coopt builds from its own C++ with the host compiler, once per machine: the SYCL
launcher (backends/sycl/runtime.py) and the CPU backend's native kernels (backends/cpu/native.py).

Each is kept in the disk cache under a key of its source, compiler and flags (and whatever else the
caller names, such as the CPU's instruction sets for -march=native); the compiler is looked for only
where the cache lacks the library, so a prebuilt cache serves a machine without one.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from xpu_coopt.disk_cache import cache_dir, entry, key_of
from xpu_coopt.errors import BackendUnavailableError, KernelCompileError

logger = logging.getLogger(__name__)


def compiler() -> str:
    """$CXX, or g++."""
    return os.environ.get("CXX") or "g++"


def build_library(
    name: str,
    sources: Sequence[Path],
    flags: Sequence[str],
    libraries: Sequence[str],
    what: str,
    key_parts: Sequence[str] = (),
) -> Path:
    """The shared library `name`.so that `sources` build into with `flags` (before the sources) and
    `libraries` (after them), from the disk cache or built there now; the key covers the sources and the
    headers beside them. `what` names it in messages ("xpu_coopt's SYCL launcher"). BackendUnavailableError
    where it must be built and the compiler is missing, KernelCompileError where the build fails."""
    cxx = compiler()
    headers = sorted({header for source in sources for header in source.parent.glob("*.hpp")})
    texts = [path.read_text() for path in (*sources, *headers)]
    target = cache_dir() / f"{name}-{key_of([*texts, cxx, *flags, *libraries, *key_parts])}"
    command = [cxx, *flags, *map(str, sources), "-o", f"{name}.so", *libraries]
    names = ", ".join(source.name for source in sources)
    return entry(target, lambda folder: _compile(command, folder, target, what, names)) / f"{name}.so"


def _compile(command: list[str], folder: Path, target: Path, what: str, source_names: str) -> None:
    """Runs a library's build in `folder`; KernelCompileError with the command, its status and output."""
    if shutil.which(command[0]) is None:
        raise BackendUnavailableError(
            f"{command[0]} is needed to build {what}, which the disk cache lacks ({target}): "
            "install g++, set CXX to a C++17 compiler, or use a cache where it is built"
        )
    # Said on stderr: a few seconds of g++, once per machine, before any kernel runs.
    print(f"building {what} (once, a few seconds): {target}", file=sys.stderr)
    logger.info("the build command of %s: %s", what, " ".join(command))
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip() or "(no output)"
        raise KernelCompileError(
            f"building {source_names} failed: `{' '.join(command)}` exited with status {result.returncode}:\n{output}"
        )
