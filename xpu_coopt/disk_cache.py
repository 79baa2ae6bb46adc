"""Where xpu_coopt keeps what it builds once and reuses across processes: the SYCL launcher
(backends/sycl/runtime.py) and the embedded SmolLM2's converted copy (checkpoints.py).

One folder, $XPU_COOPT_CACHE or ~/.cache/xpu_coopt. Each entry is a folder whose name carries a key of
what it was made from, so a changed input makes a new entry instead of reusing a stale one. An entry
appears whole or not at all: it is made in a scratch folder beside it, with a manifest of its files'
sizes, times and SHA-256 digests written last, then renamed into place, so concurrent processes
(pytest-xdist workers, two CLI runs) never read half of one. An entry is checked against its manifest
before use (sizes always, a file's digest where its time changed); a damaged one is removed with a
warning naming it, and made again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

MANIFEST = "manifest.json"
# Part of every key: entries of an earlier layout (no manifest) are not looked at.
ENTRY_FORMAT = "entry-v2"
CACHE_VARIABLE = "XPU_COOPT_CACHE"


class DiskCacheError(OSError):
    """The disk cache's folder cannot be written."""


def cache_dir() -> Path:
    """$XPU_COOPT_CACHE or ~/.cache/xpu_coopt."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "xpu_coopt")


def key_of(parts: Iterable[str]) -> str:
    """A short digest naming what an entry was made from."""
    return hashlib.sha256("\0".join([ENTRY_FORMAT, *parts]).encode()).hexdigest()[:16]


def sha256_of(path: Path) -> str:
    """A file's SHA-256, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _describe(path: Path) -> dict[str, int | str]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_of(path)}


def _write_manifest(folder: Path) -> None:
    files = {p.name: _describe(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _unwritable(folder: Path, error: OSError) -> DiskCacheError:
    where = (
        f"{CACHE_VARIABLE}={os.environ[CACHE_VARIABLE]}" if os.environ.get(CACHE_VARIABLE) else str(folder)
    )
    return DiskCacheError(
        f"xpu_coopt's disk cache ({where}) cannot be written: {error}; set {CACHE_VARIABLE} to a writable folder"
    )


def make_entry(target: Path, write: Callable[[Path], None]) -> Path:
    """Makes the entry folder `target`: write(scratch_folder) fills a folder it is given, the manifest is
    added, and the folder is moved into place in one step. Where another process made it meanwhile, its
    entry stays and this one is dropped. DiskCacheError where the cache's folder cannot be written."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(dir=target.parent, prefix=".scratch-")
    except OSError as error:
        raise _unwritable(target.parent, error) from error
    with scratch:
        made = Path(scratch.name) / target.name
        made.mkdir()
        write(made)
        _write_manifest(made)
        try:
            os.replace(made, target)  # a folder takes a missing (or empty) name only
        except OSError:
            if not target.exists() or _damage(target) is not None:
                raise
    return target


def _damage(folder: Path) -> str | None:
    """What is wrong with an entry against its manifest, or None where nothing is."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its manifest cannot be read ({error})"
    for name, recorded in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != recorded["size"]:
            return f"{name} holds {stat.st_size} bytes, not the {recorded['size']} written"
        # A file whose time changed (touched, copied) is read whole: its digest must still match.
        if stat.st_mtime_ns != recorded["mtime_ns"] and sha256_of(path) != recorded["sha256"]:
            return f"{name} changed since it was written (its SHA-256 differs)"
    return None


def verified_entry(target: Path) -> Path | None:
    """`target` where it is an entry that matches its manifest; None where there is none. A damaged one
    is removed, with a warning naming it and its damage, so that the caller makes it again."""
    if not target.exists():
        return None
    damage = _damage(target)
    if damage is None:
        return target
    warnings.warn(
        f"xpu_coopt's disk cache entry {target} is damaged ({damage}): removed, made again", stacklevel=3
    )
    discard(target)
    return None


def discard(target: Path) -> None:
    """Removes an entry: renamed away first, so that no process sees half of it."""
    doomed = target.with_name(f".discarded-{target.name}-{os.getpid()}")
    try:
        os.replace(target, doomed)
    except OSError:
        return  # another process removed it first, or the folder is read-only: it is made aside then
    shutil.rmtree(doomed, ignore_errors=True)


def entry(target: Path, write: Callable[[Path], None]) -> Path:
    """The verified entry at `target`, made by write(folder) where it is missing or damaged."""
    return verified_entry(target) or make_entry(target, write)
