"""Intel's SYCL runtime from Python: find it, build the host launcher, compile and launch kernels.

The SYCL runtime and its runtime compiler come from the pip wheel intel-sycl-rt; the OpenCL CPU device
from intel-opencl-rt. sycl_kernels/host/launcher.cpp, a C ABI over the runtime, is built once with g++
against the wheel's headers and loaded with ctypes. Kernel sources (sycl_kernels/*.cpp) are compiled at
run time for the queue's device (SYCL-RTC) when optimize() picks the SYCL backend (SyclQueue.build_all,
with a progress bar: about 30 s the first time on the CI machine's CPU device); the runtime keeps the
result in a persistent on-disk cache, so later processes load them in about a second.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from xpu_coopt.backends.native_build import build_library
from xpu_coopt.disk_cache import cache_dir
from xpu_coopt.errors import BackendUnavailableError, KernelCompileError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'xpu_coopt[sycl]' (the wheels intel-sycl-rt and intel-opencl-rt)"
ERROR_CAPACITY = 1 << 20  # compiler logs can be long
# build_all's bar shows only after this long: loading all the sources from the persistent cache takes
# about 1.1 s on the CPU device (0.2-0.4 s each), compiling them about 30 s
PROGRESS_DELAY_S = 2.0
# Build options of every kernel source: on Data Center GPU Max (pvc) the GPU compiler may give a kernel
# the large register file (256 GRF) where it needs it; with the default 128, attention_prefill spills
# 960-1216 bytes a thread there (scripts/intel_gpu_compile_check.py compiles every target so).
BUILD_OPTIONS = ("-ftarget-register-alloc-mode=pvc:auto",)


def kernel_source_dir() -> Path:
    """sycl_kernels/: inside the package when installed from a wheel (pyproject.toml maps it to
    xpu_coopt/sycl_kernels), beside it in a source checkout or an editable install."""
    package = Path(__file__).resolve().parents[2]
    for candidate in (package / "sycl_kernels", package.parent / "sycl_kernels"):
        if (candidate / "common.hpp").exists():
            return candidate
    raise BackendUnavailableError(f"the SYCL kernel sources (sycl_kernels/) are missing beside {package}")


def _installed_file(distribution: str, name: str) -> Path | None:
    """The installed file called `name` of a distribution, or None."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == name:
            return Path(str(file.locate())).resolve()
    return None


def sycl_prefix() -> Path:
    """The install prefix holding lib/libsycl.so and include/sycl of the intel-sycl-rt wheel."""
    library = _installed_file("intel-sycl-rt", "libsycl.so")
    if library is None or not (library.parent.parent / "include" / "sycl" / "sycl.hpp").exists():
        raise BackendUnavailableError(f"the SYCL runtime with its headers is not installed: {INSTALL_HINT}")
    return library.parent.parent


def _configure_environment(prefix: Path) -> None:
    """Variables the SYCL runtime reads when it loads: they must be set before the launcher is loaded."""
    opencl_cpu = _installed_file("intel-opencl-rt", "libintelocl.so")
    if opencl_cpu is not None:
        # The wheel's .icd file names a placeholder path; point the OpenCL loader at the library itself.
        known = [p for p in os.environ.get("OCL_ICD_FILENAMES", "").split(":") if p]
        if str(opencl_cpu) not in known:
            os.environ["OCL_ICD_FILENAMES"] = ":".join([str(opencl_cpu), *known])
    os.environ.setdefault("SYCL_CACHE_PERSISTENT", "1")
    os.environ.setdefault("SYCL_CACHE_DIR", str(cache_dir() / "sycl-rtc"))


def _build_launcher(prefix: Path) -> Path:
    """sycl_kernels/host/launcher.cpp built once per (source, runtime, compiler) and kept in the disk
    cache (backends/native_build.py)."""
    flags = [
        "-std=c++17", "-O2", "-shared", "-fPIC", "-DSYCL_DISABLE_FSYCL_SYCLHPP_WARNING",
        f"-I{prefix / 'include'}", f"-I{prefix / 'include' / 'sycl'}",
    ]  # fmt: skip
    libraries = [f"-L{prefix / 'lib'}", "-lsycl", f"-Wl,-rpath,{prefix / 'lib'}"]
    sources = [kernel_source_dir() / "host" / "launcher.cpp"]
    return build_library("launcher", sources, flags, libraries, "xpu_coopt's SYCL launcher", [str(prefix)])


def _declare(lib: ctypes.CDLL) -> None:
    void_p, char_p, size = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    signatures = {
        "xc_queue_create_cpu": (void_p, [char_p, size]),
        "xc_queue_adopt": (void_p, [void_p]),
        "xc_device_name": (ctypes.c_int, [void_p, char_p, size]),
        "xc_bundle_build": (
            void_p,
            [void_p, char_p, ctypes.c_int, void_p, void_p, ctypes.c_int, void_p, char_p, size],
        ),
        "xc_kernel_get": (void_p, [void_p, char_p, char_p, size]),
        "xc_launch": (ctypes.c_int, [void_p, void_p, size, size, ctypes.c_int, void_p, void_p, char_p, size]),
        "xc_queue_wait": (ctypes.c_int, [void_p, char_p, size]),
    }
    for name, (result, arguments) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments


_launcher: ctypes.CDLL | None = None


def launcher() -> ctypes.CDLL:
    """The loaded launcher library (built on first use)."""
    global _launcher
    if _launcher is None:
        prefix = sycl_prefix()
        _configure_environment(prefix)
        lib = ctypes.CDLL(str(_build_launcher(prefix)))
        _declare(lib)
        _launcher = lib
    return _launcher


def _strings(values: Sequence[str]) -> ctypes.Array:
    return (ctypes.c_char_p * len(values))(*(v.encode() for v in values))


class SyclQueue:
    """One SYCL queue with the kernels compiled for its device.

    synchronous: wait for every op's kernels before returning. Needed on the CPU device, whose kernels
    work on torch CPU tensors that the next (eager, synchronous) torch op reads; on an XPU the queue is
    torch's own in-order stream, so ordering is already guaranteed.
    """

    def __init__(self, lib: ctypes.CDLL, handle: int, synchronous: bool) -> None:
        self.lib, self.handle, self.synchronous = lib, handle, synchronous
        self._error = ctypes.create_string_buffer(ERROR_CAPACITY)
        self._bundles: dict[str, int] = {}
        self._kernels: dict[str, int] = {}
        name = ctypes.create_string_buffer(256)
        lib.xc_device_name(handle, name, 256)
        self.device_name = name.value.decode()

    def _message(self) -> str:
        return self._error.value.decode(errors="replace")

    def build(self, source_name: str, source: str) -> int:
        """Compiles SYCL source (which may include the sycl_kernels/*.hpp headers) into a kernel bundle."""
        headers = sorted(kernel_source_dir().glob("*.hpp"))
        logger.info("compiling %s for %s (cached on disk afterwards)", source_name, self.device_name)
        handle = self.lib.xc_bundle_build(
            self.handle, source.encode(), len(headers),
            _strings([h.name for h in headers]), _strings([h.read_text() for h in headers]),
            len(BUILD_OPTIONS), _strings(BUILD_OPTIONS), self._error, ERROR_CAPACITY,
        )  # fmt: skip
        if not handle:
            raise KernelCompileError(
                f"compiling {source_name} for {self.device_name} failed: {self._message()}"
            )
        return handle

    def _bundle(self, source_name: str) -> int:
        if source_name not in self._bundles:
            source = (kernel_source_dir() / source_name).read_text()
            self._bundles[source_name] = self.build(f"sycl_kernels/{source_name}", source)
        return self._bundles[source_name]

    def build_all(self) -> None:
        """Compiles every kernel source now (or loads it from the persistent cache), with a progress bar
        while it takes longer than PROGRESS_DELAY_S: the first use on a device compiles for seconds per
        source, which would otherwise stall the first kernel call without a word."""
        sources = sorted(path.name for path in kernel_source_dir().glob("*.cpp"))
        bar = tqdm(
            sources, desc=f"compiling SYCL kernels for {self.device_name} (cached afterwards)", unit="source",
            delay=PROGRESS_DELAY_S, leave=False,
        )  # fmt: skip
        for source_name in bar:
            self._bundle(source_name)

    def kernel(self, source_name: str, kernel_name: str) -> int:
        """The kernel `kernel_name` of sycl_kernels/`source_name`, compiling the source on first use."""
        if kernel_name not in self._kernels:
            bundle = self._bundle(source_name)
            handle = self.lib.xc_kernel_get(bundle, kernel_name.encode(), self._error, ERROR_CAPACITY)
            if not handle:
                raise KernelCompileError(f"sycl_kernels/{source_name}: {self._message()}")
            self._kernels[kernel_name] = handle
        return self._kernels[kernel_name]

    def launch(self, kernel: int, global_size: int, local_size: int, arguments: Sequence[object]) -> None:
        """Enqueues `kernel` over nd_range(global_size, local_size).

        arguments: torch tensors (passed as their data pointer), None (a null pointer) or ctypes scalars
        (c_int, c_int64, c_float: passed by value), in the kernel's parameter order.
        """
        count = len(arguments)
        pointers = (ctypes.c_void_p * count)()
        sizes = (ctypes.c_size_t * count)()
        for i, argument in enumerate(arguments):
            if isinstance(argument, torch.Tensor):
                pointers[i] = argument.data_ptr()
            elif argument is not None:
                pointers[i], sizes[i] = ctypes.addressof(argument), ctypes.sizeof(argument)
        status = self.lib.xc_launch(
            self.handle, kernel, global_size, local_size, count, pointers, sizes, self._error, ERROR_CAPACITY
        )
        if status:
            raise RuntimeError(f"launching a SYCL kernel on {self.device_name} failed: {self._message()}")

    def finish(self) -> None:
        """Waits for the queue when it is synchronous (see the class docstring)."""
        if self.synchronous and self.lib.xc_queue_wait(self.handle, self._error, ERROR_CAPACITY):
            raise RuntimeError(f"a SYCL kernel on {self.device_name} failed: {self._message()}")


_queues: dict[object, SyclQueue] = {}


def queue_for(device: torch.device) -> SyclQueue:
    """The queue running xpu_coopt's SYCL kernels for tensors on `device`.

    cpu: a queue on the OpenCL CPU device, which reads and writes torch's host memory directly.
    xpu: torch's current stream (its sycl::queue), so kernels order with torch's own work.
    """
    if device.type == "cpu":
        key: object = "cpu"
        if key not in _queues:
            lib = launcher()
            error = ctypes.create_string_buffer(ERROR_CAPACITY)
            handle = lib.xc_queue_create_cpu(error, ERROR_CAPACITY)
            if not handle:
                raise BackendUnavailableError(
                    f"no SYCL CPU device: {error.value.decode()}; the OpenCL CPU runtime comes with {INSTALL_HINT}"
                )
            _queues[key] = SyclQueue(lib, handle, synchronous=True)
        return _queues[key]
    if device.type == "xpu":
        address = torch.xpu.current_stream(device).sycl_queue
        if address not in _queues:
            lib = launcher()
            _queues[address] = SyclQueue(lib, lib.xc_queue_adopt(address), synchronous=False)
        return _queues[address]
    raise BackendUnavailableError(f"the SYCL kernels run on xpu and cpu tensors, not on {device.type}")
