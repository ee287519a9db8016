"""The tests that compare two kernels, rerun at forced CPU dispatch levels.

Which float32 rounding a kernel gives an element depends on the CPU: ATen picks AVX-512,
AVX2 or plain C++ kernels, MKL and oneDNN pick their own matrix-product kernels. The suite
runs at the machine's own level; here the kernel-comparing tests run again in a subprocess
at AVX2 and at ``default`` (no ATen vector kernels, MKL at SSE4.2), so a machine with
AVX-512 checks that their tolerances hold on the CPUs below it too.

Forcing a lower level always works. ``ATEN_CPU_CAPABILITY=avx2`` is taken at its word (torch
does not check the CPU), so that level runs only where the CPU has AVX2 and FMA;
``MKL_ENABLE_INSTRUCTIONS`` and ``ONEDNN_MAX_CPU_ISA`` never select more than the CPU has
(MKL falls back to the CPU's own level, and honours the variable on Intel CPUs only).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEVELS = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
    "default": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
    },
}
# every test that compares two kernels (fast path vs autograd, a beta tensor vs a float
# beta, batched vs one at a time, chunked vs whole); not the thread test, the matmul
# timing, the float64 gradcheck or the chunking test at a batch it checks to 1e-5 anyway
TARGETS = [
    "tests/test_toy_fast.py",
    "tests/test_losses.py::test_a_beta_tensor_is_a_float_beta_per_sample_bitwise",
    "tests/test_losses.py::test_a_zero_dim_beta_tensor_is_a_number",
    "tests/test_toy_train.py::test_batched_equals_one_at_a_time",
    "tests/test_dispatch_levels.py::test_forced_level_in_effect",
]
DESELECT = (
    "not reproducible_with_threads and not matmul_log and not gradcheck "
    "and not sweep_chunking_does_not_change_a_number[8]"
)
EXPECT = "MINDDSPO_EXPECT_CPU_CAPABILITY"


def _cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
        return {"avx2", "fma"} <= set(flags.split())
    import torch

    return "ATEN_CPU_CAPABILITY" not in os.environ and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    )


@pytest.mark.timeout(900)  # a subprocess suite; default dispatch is ~3x slower on a busy machine
@pytest.mark.parametrize("level", LEVELS)
def test_kernel_comparisons_hold_at_forced_dispatch_level(level, tmp_path):
    if level == "avx2" and not _cpu_has_avx2():
        pytest.skip("the CPU has no AVX2+FMA: forcing ATen to AVX2 would not be safe")
    env = {
        **os.environ,
        **LEVELS[level],
        EXPECT: level.upper(),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-k", DESELECT, "--basetemp", str(tmp_path / "t"), *TARGETS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    tail = "\n".join(r.stdout.strip().splitlines()[-25:])
    assert r.returncode == 0, f"at {level} dispatch:\n{tail}\n{r.stderr[-2000:]}"
    assert " passed" in tail and " skipped" not in tail.splitlines()[-1], tail


def test_forced_level_in_effect():
    """Inside the subprocess above: torch really dispatches at the forced level."""
    want = os.environ.get(EXPECT)
    if want is None:
        pytest.skip(f"runs only under {EXPECT} (set by the test above)")
    import torch

    assert torch.backends.cpu.get_cpu_capability() == want
