"""Every SYCL kernel compiles for Arc A770, Arc B580, Data Center GPU Max 1550 and Lunar Lake with no
spill and no change from the committed baseline (scripts/intel_gpu_compile_check.py), where Intel's
offline compiler sits beside the checkout (../shared/toolchains/intel-ocloc)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLCHAIN = ROOT.parent / "shared" / "toolchains" / "intel-ocloc"


@pytest.mark.skipif(
    not (TOOLCHAIN / "setup.sh").exists(),
    reason=f"Intel's offline GPU compiler is not beside the checkout ({TOOLCHAIN.name} under ../shared/toolchains)",
)
def test_every_kernel_compiles_for_intel_gpus_as_the_baseline_says():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "intel_gpu_compile_check.py"), "--jobs", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-6000:]
    assert "no spill, as the baseline" in result.stdout


def _check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "intel_gpu_compile_check", ROOT / "scripts" / "intel_gpu_compile_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_check_reads_double_precision_and_finds_changes(tmp_path):
    """Without the compiler: a SPIR-V module declaring Float64 is found, and a new spill or another SIMD
    width is a difference from the baseline."""
    import struct

    check = _check_module()
    image = tmp_path / "fp64.spv"
    header = [0x07230203, 0x00010400, 0, 100, 0]
    capabilities = [
        (2 << 16) | check.OP_CAPABILITY,
        6,
        (2 << 16) | check.OP_CAPABILITY,
        check.FLOAT64_CAPABILITY,
    ]
    image.write_bytes(struct.pack(f"<{len(header) + len(capabilities)}I", *header, *capabilities))
    assert check.capabilities(image) == {6, check.FLOAT64_CAPABILITY}
    numbers = {"simd": 16, "grf": 128, "slm": 0, "spill": 0, "scratch": 0}
    baseline = {target: {"k": numbers} for target in check.TARGETS}
    found = {target: {"k": dict(numbers)} for target in check.TARGETS}
    assert check.differences(found, baseline) == []
    found["pvc"]["k"].update(spill=64, simd=32)
    rows = check.differences(found, baseline)
    assert ("pvc", "k", "simd", 16, 32) in rows and ("pvc", "k", "spills", 0, 64) in rows
