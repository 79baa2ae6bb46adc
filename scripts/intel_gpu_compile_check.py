"""Compiles every SYCL kernel for real Intel GPU instruction sets and checks what the GPU compiler decided.

    python scripts/intel_gpu_compile_check.py [--update] [--ocloc DEST/ocloc] [--jobs 2]

No GPU is needed: the SPIR-V images the runtime compiler makes (dumped while every source in
sycl_kernels/ is built on the OpenCL CPU device) are compiled with Intel's offline compiler, ocloc, for
TARGETS (Arc A770, Arc B580, Data Center GPU Max 1550, Lunar Lake). Each kernel's SIMD width, register
file (GRF) size, shared local memory, spill and scratch bytes are read from the binaries (the ELF
section .ze_info) and compared with the committed baseline, docs/results/intel-gpu-kernels.json. The
check fails, printing a table of what changed, on a compile error, a kernel that spills, a change of
SIMD width, GRF size or local memory, a kernel gone or new, or an image that declares double precision
(Arc A-series and integrated GPUs have none). --update rewrites the baseline. The table it prints is the
one in docs/xpu.md. ocloc comes from ../shared/toolchains/intel-ocloc (setup.sh), unless --ocloc names it.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOOLCHAIN = ROOT.parent / "shared" / "toolchains" / "intel-ocloc"
BASELINE = ROOT / "docs" / "results" / "intel-gpu-kernels.json"
# ocloc device names: Arc A770 (Xe-HPG), Arc B580 (Xe2-HPG), Data Center GPU Max 1550 (Xe-HPC), Lunar Lake.
TARGETS = ("acm-g10", "bmg", "pvc", "lnl-m")
# What the compiler may pick per kernel on targets with a large register file: 256 GRF where a kernel
# needs them (icpx's default on pvc); the runtime build asks for the same (backends/sycl/runtime.py).
COMPILE_OPTIONS = "-ze-intel-enable-auto-large-GRF-mode"
FLOAT64_CAPABILITY = 10  # SPIR-V OpCapability Float64
OP_CAPABILITY = 17
COMPARED = ("simd", "grf", "slm", "spill", "scratch")
KERNEL_PREFIX = "__sycl_kernel_"  # how the runtime compiler names xpu_coopt's extern "C" kernels

DUMP = """
import torch
from xpu_coopt.backends.sycl.runtime import queue_for
queue_for(torch.device("cpu")).build_all()
"""


def ocloc_wrapper(given: str | None) -> str:
    if given:
        return given
    if not (TOOLCHAIN / "setup.sh").exists():
        raise SystemExit(f"no Intel offline compiler: {TOOLCHAIN} is absent (pass --ocloc)")
    dest = Path(tempfile.gettempdir()) / "xpu_coopt-ocloc"
    done = subprocess.run(
        ["bash", str(TOOLCHAIN / "setup.sh"), str(dest)], check=True, capture_output=True, text=True
    )
    return done.stdout.strip().splitlines()[-1]


def dump_images(folder: Path) -> list[Path]:
    """The SPIR-V images the runtime compiler makes of every kernel source (built afresh, not from a cache)."""
    env = dict(
        os.environ, SYCL_DUMP_IMAGES="1", SYCL_DUMP_IMAGES_PREFIX=f"{folder}/", SYCL_CACHE_PERSISTENT="0"
    )
    subprocess.run([sys.executable, "-c", DUMP], check=True, env=env, cwd=folder)
    images = sorted(folder.glob("*.spv"))
    if not images:
        raise SystemExit("the runtime compiler wrote no SPIR-V images (SYCL_DUMP_IMAGES)")
    return images


def capabilities(image: Path) -> set[int]:
    """The OpCapability operands at the start of a SPIR-V module (after its 5-word header)."""
    words = struct.unpack(f"<{image.stat().st_size // 4}I", image.read_bytes())
    found, at = set(), 5
    while at < len(words) and words[at] & 0xFFFF == OP_CAPABILITY:
        found.add(words[at + 1])
        at += words[at] >> 16
    return found


def ze_info(binary: Path) -> dict:
    """The YAML of a zebin's .ze_info section."""
    data = binary.read_bytes()
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, section_offset + i * entry_size) for i in range(count)]
    names_at = sections[names_index][4]

    def name(offset: int) -> str:
        return data[names_at + offset : data.index(b"\0", names_at + offset)].decode()

    for name_offset, _, _, _, offset, size in sections:
        if name(name_offset) == ".ze_info":
            return yaml.safe_load(data[offset : offset + size])
    raise ValueError(f"{binary} has no .ze_info section")


def kernel_numbers(info: dict) -> dict[str, dict[str, int]]:
    numbers = {}
    for kernel in info.get("kernels", []):
        if not kernel["name"].startswith(KERNEL_PREFIX):  # the compiler's own (a symbol table)
            continue
        env = kernel.get("execution_env", {})
        scratch = sum(buffer.get("size", 0) for buffer in kernel.get("per_thread_memory_buffers", []) or [])
        numbers[kernel["name"]] = {"simd": env.get("simd_size", 0), "grf": env.get("grf_count", 0),
                                   "slm": env.get("slm_size", 0), "spill": env.get("spill_size", 0),
                                   "scratch": scratch}  # fmt: skip
    return numbers


def compile_image(ocloc: str, image: Path, target: str, out: Path) -> dict[str, dict[str, int]] | str:
    """The image's kernels' numbers on `target`, or the compiler's error."""
    folder = out / f"{image.stem}-{target}"
    command = [ocloc, "compile", "-spirv_input", "-file", str(image), "-device", target, "-output", "k",
               "-output_no_suffix", "-out_dir", str(folder), "-options", COMPILE_OPTIONS]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    binaries = sorted(folder.glob("k*")) if folder.is_dir() else []
    if done.returncode != 0 or not binaries:
        return f"ocloc exited with status {done.returncode}: {(done.stdout + done.stderr).strip()[-2000:]}"
    return kernel_numbers(ze_info(binaries[0]))


def measure(ocloc: str, jobs: int) -> tuple[dict[str, dict[str, dict[str, int]]], list[str]]:
    """{target: {kernel: numbers}} over every image, and the problems that fail the check outright."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="xpu_coopt-gpu-check-") as scratch:
        folder = Path(scratch)
        images = dump_images(folder)
        for image in images:
            if FLOAT64_CAPABILITY in capabilities(image):
                problems.append(f"{image.name} declares the Float64 capability: Arc A-series has no fp64")
        tasks = [(image, target) for target in TARGETS for image in images]
        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda task: compile_image(ocloc, *task, folder), tasks))
    found: dict[str, dict[str, dict[str, int]]] = {target: {} for target in TARGETS}
    for (image, target), result in zip(tasks, results, strict=True):
        if isinstance(result, str):
            problems.append(f"{image.name} for {target}: {result}")
        else:
            found[target].update(result)
    return found, problems


def differences(found: dict, baseline: dict) -> list[tuple[str, str, str, object, object]]:
    """(target, kernel, what, baseline, now) for every change and every spill."""
    rows = []
    for target in TARGETS:
        now, then = found.get(target, {}), baseline.get(target, {})
        for kernel in sorted(set(now) | set(then)):
            if kernel not in now or kernel not in then:
                rows.append(
                    (
                        target,
                        kernel,
                        "kernel",
                        "present" if kernel in then else "-",
                        "present" if kernel in now else "-",
                    )
                )
                continue
            for key in COMPARED:
                if now[kernel][key] != then[kernel][key] and key != "scratch":
                    rows.append((target, kernel, key, then[kernel][key], now[kernel][key]))
            if now[kernel]["spill"]:
                rows.append((target, kernel, "spills", then[kernel]["spill"], now[kernel]["spill"]))
    return rows


def table(found: dict) -> str:
    """Markdown: per kernel family and target, SIMD / GRF / SLM / spill as compiled."""
    lines = ["| kernel | " + " | ".join(TARGETS) + " |", "| --- |" + " --- |" * len(TARGETS)]
    for kernel in sorted(found[TARGETS[0]]):
        cells = []
        for target in TARGETS:
            n = found[target].get(kernel)
            cells.append(
                "-" if n is None else f"SIMD{n['simd']} {n['grf']} GRF, SLM {n['slm']}, spill {n['spill']}"
            )
        lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite the baseline with what was compiled")
    parser.add_argument("--ocloc", default=None)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--table", action="store_true", help="print the Markdown table of docs/xpu.md")
    args = parser.parse_args()
    found, problems = measure(ocloc_wrapper(args.ocloc), args.jobs)
    kernels = len(found[TARGETS[0]])
    if args.table:
        print(table(found))
    if problems:
        print("\n".join(["the Intel GPU compile check failed:", *problems]), file=sys.stderr)
        return 1
    if args.update:
        BASELINE.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
        print(f"wrote {BASELINE.relative_to(ROOT)}: {kernels} kernels x {len(TARGETS)} targets")
        return 0
    rows = differences(found, json.loads(BASELINE.read_text()) if BASELINE.exists() else {})
    if rows:
        print("| target | kernel | what | baseline | now |\n| --- | --- | --- | --- | --- |", file=sys.stderr)
        print("\n".join(f"| {' | '.join(map(str, row))} |" for row in rows), file=sys.stderr)
        print(
            f"the Intel GPU compile check failed: {len(rows)} changes or spills (--update to accept changes)",
            file=sys.stderr,
        )
        return 1
    print(f"{kernels} kernels compiled for {', '.join(TARGETS)}: no spill, as the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
