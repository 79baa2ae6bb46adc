"""Compiles the Triton kernels for an NVIDIA GPU on a machine without one, as the op wrappers launch them.

Within compile_for(capability), every wrapper of xpu_coopt.backends.triton.kernels and .linear runs on CPU tensors
and each launch it makes compiles down to a cubin for sm_<capability> instead of running: through Triton's
own launch path (JITFunction.warmup), so it gets the argument specialisation a real launch gets (pointer
alignment, integers divisible by 16) and the same code. CI uses it to prove the launches compile;
scripts/decode_kernel_resources.py to read registers and spills, which decide a kernel's occupancy, and
the instructions of a loop's body (SASS).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any
from unittest import mock

from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

import xpu_coopt.backends.triton.kernels as kernels
import xpu_coopt.backends.triton.linear as linear

# The module each wrapper looks its kernels up in, and their names.
KERNEL_NAMES = (
    (kernels, ("rms_norm_kernel", "fused_add_rms_norm_kernel", "silu_and_mul_kernel", "rotary_kv_write_kernel",
               "attention_prefill_kernel", "segment_attention_decode_kernel", "combine_splits_kernel",
               "paged_attention_kernel")),
    (linear, ("skinny_linear_kernel",)),
)  # fmt: skip
REGISTERS_PER_SM = 65536  # every NVIDIA GPU from sm_50 to sm_120
REGISTER_ALLOCATION_UNIT = 256  # registers are given to a warp in multiples of this
# Shared memory an SM's blocks can hold, by compute capability, and what the driver reserves per block
# (CUDA C++ Programming Guide, compute capabilities table; ncu reports 233.47 KB and 1.02 KB on an H100).
SHARED_MEMORY_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 87: 164 * 1024, 89: 100 * 1024, 90: 228 * 1024}
SHARED_MEMORY_RESERVED_PER_BLOCK = 1024
H100_MULTIPROCESSORS = 132  # H100 SXM


@dataclasses.dataclass
class Launch:
    """One launch a wrapper made, compiled: the kernel, its grid and constexpr arguments, Triton's compiled
    kernel."""

    name: str
    grid: tuple[int, ...]
    constexprs: dict[str, Any]
    compiled: Any  # triton.compiler.CompiledKernel


class _OfflineDriver:
    """What Triton asks of a driver to compile, not to launch. The device id is the capability, so each
    target gets its own JIT cache."""

    def __init__(self, capability: int) -> None:
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


class _CompileOnly:
    """Stands in for kernel[grid]: compiles the launch (Triton's warmup) and records it."""

    def __init__(self, kernel, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages", "maxnreg")}
            self.launches.append(Launch(self.kernel.fn.__name__, tuple(grid), constexprs, compiled))

        return launch


@contextlib.contextmanager
def compile_for(capability: int, multiprocessors: int = H100_MULTIPROCESSORS) -> Iterator[list[Launch]]:
    """Within it, the wrappers in xpu_coopt.backends.triton.kernels and .linear compile their launches for
    sm_<capability> (on CPU tensors, without TRITON_INTERPRET) instead of running them; yields the list of
    launches, filled as they are made. multiprocessors: the GPU's size, which split decoding depends on."""
    if kernels.INTERPRETED:
        raise RuntimeError("compile_for needs a process without TRITON_INTERPRET=1")
    launches: list[Launch] = []
    with contextlib.ExitStack() as stack:
        for module, names in KERNEL_NAMES:
            for name in names:
                stack.enter_context(
                    mock.patch.object(module, name, _CompileOnly(getattr(module, name), launches))
                )
        # The launches then choose (FP8 instructions, splits) as on a GPU of this capability and size.
        target = kernels.GpuFacts(divmod(capability, 10), multiprocessors)
        stack.enter_context(mock.patch.object(kernels, "_gpu", lambda device: target))
        stack.callback(driver.set_active, getattr(driver, "_active", None))  # the driver it replaces
        driver.set_active(_OfflineDriver(capability))
        yield launches


@dataclasses.dataclass
class Resources:
    """What one compiled kernel holds per thread and per block, read from its cubin."""

    registers: int
    stack_bytes: int  # local memory per thread: register spills in these kernels
    shared_bytes: int  # dynamic shared memory per block
    num_warps: int

    def blocks_per_sm(self, capability: int) -> dict[str, int]:
        """How many blocks of this kernel an SM holds, as its registers and its shared memory allow."""
        if capability not in SHARED_MEMORY_PER_SM:
            raise ValueError(
                f"shared memory per SM of sm_{capability} unknown: one of {sorted(SHARED_MEMORY_PER_SM)}"
            )
        per_warp = -(-self.registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
        per_block = self.shared_bytes + SHARED_MEMORY_RESERVED_PER_BLOCK
        return {
            "registers": REGISTERS_PER_SM // (per_warp * self.num_warps),
            "shared": SHARED_MEMORY_PER_SM[capability] // per_block,
        }


def _tool_output(compiled, tool: str, *options: str) -> str:
    """What one of Triton's bundled CUDA tools (cuobjdump, nvdisasm) prints for the compiled cubin."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(compiled.asm["cubin"])
        return subprocess.run(
            [getattr(knobs.nvidia, tool).path, *options, path], capture_output=True, text=True, check=True
        ).stdout


@dataclasses.dataclass
class Loop:
    """One loop of a kernel's machine code (SASS): its body's instructions, counted by opcode."""

    instructions: int
    opcodes: collections.Counter[str]


def loops(compiled) -> list[Loop]:
    """The loops of a compiled kernel, in code order: each backward branch closes one, from its target
    label to the branch. Counts are static (a loop body's instructions once), the measure of how much
    work a kernel issues per iteration when comparing variants of one loop."""
    labels: dict[str, int] = {}
    instructions: list[str] = []
    for line in _tool_output(compiled, "nvdisasm", "-c").splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            labels[label[1]] = len(instructions)
        elif instruction := re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line):
            instructions.append(re.sub(r"^@!?U?P\w+\s+", "", instruction[1]))  # without its predicate
    found = []
    for end, instruction in enumerate(instructions):
        branch = re.match(r"BRA\s+`?\(?(\.L_x_\d+)", instruction)
        if branch and labels.get(branch[1], end + 1) <= end:
            body = instructions[labels[branch[1]] : end + 1]
            found.append(Loop(len(body), collections.Counter(text.split()[0] for text in body)))
    return found


def resources(compiled) -> Resources:
    """Registers, stack and shared memory of a compiled kernel, from cuobjdump (bundled with Triton)."""
    usage = _tool_output(compiled, "cuobjdump", "--dump-resource-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{usage}")
    return Resources(
        registers=int(found[1]),
        stack_bytes=int(found[2]),
        shared_bytes=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps,
    )
