"""The fusion compiled for every SIMD target this machine runs, from the same source: AVX-512, AVX2 and SSE2
(x86-64) or NEON (arm64), and the scalar fallback. Each build must match the numpy oracle on the shared cases
and report the same faults; its sda_simd_width() proves which pack width it was built with."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sda_local.engine import native
from sda_local.engine.fusion import TEMPERATURE_MODES, NonFiniteLogitsError, fuse_numpy

from fusion_cases import assert_same, oracle_cases

NATIVE = Path(__file__).resolve().parent.parent / "native"
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.split(":", 1)[-1].split())


def targets():
    """(name, compiler flags, expected floats per pack) for each target this CPU can run."""
    flags = cpu_flags()
    found = []
    if platform.machine() in ("x86_64", "AMD64"):
        if {"avx512f", "avx2", "fma"} <= flags:
            found.append(("avx512", ["-mavx512f", "-mavx2", "-mfma"], 16))
        if {"avx2", "fma"} <= flags:
            found.append(("avx2", ["-mavx2", "-mfma"], 8))
        found.append(("sse2", ["-march=x86-64"], 4))
    elif platform.machine() in ("aarch64", "arm64"):
        found.append(("neon", [], 4))
    found.append(("scalar", ["-DSDA_SIMD_SCALAR"], 1))
    return found


@pytest.fixture(scope="module", params=targets(), ids=lambda t: t[0])
def variant(request, tmp_path_factory):
    name, flags, width = request.param
    out = tmp_path_factory.mktemp("simd") / f"libfusion_{name}.so"
    cmd = [CXX, "-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", *flags,
           f"-I{NATIVE / 'src'}", f"-I{NATIVE / 'include'}",
           str(NATIVE / "src" / "fusion.cpp"), str(NATIVE / "src" / "fuse_api.cpp"), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    lib = ctypes.CDLL(str(out))
    native.declare_fusion(lib)
    assert lib.sda_simd_width() == width
    return lib


def fuse_with(lib, z_with, z_without, strength, k=2.0, t0=0.6, temperature_mode="paper"):
    return native.fuse(lib, z_with, z_without, strength, k, t0, TEMPERATURE_MODES[temperature_mode])


@pytest.mark.parametrize("case", list(oracle_cases()), ids=lambda c: c[0])
def test_every_target_matches_the_numpy_oracle(variant, case):
    _, z_with, z_without, strength, kwargs = case
    got = fuse_with(variant, z_with, z_without, strength, **kwargs)
    assert_same(got, fuse_numpy(z_with, z_without, strength, **kwargs))


@pytest.mark.parametrize("row", ["with", "without"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("position", [0, 511, 512, 4098])
def test_every_target_reports_the_fault(variant, row, value, position):
    rng = np.random.default_rng(position)
    z_with = rng.normal(0, 3, 4099).astype(np.float32)
    z_without = (z_with + rng.normal(0, 0.7, 4099)).astype(np.float32)
    (z_with if row == "with" else z_without)[position] = value
    with pytest.raises(NonFiniteLogitsError) as raised:
        fuse_with(variant, z_with, z_without, 0.5)
    assert (raised.value.value, raised.value.row) == ("NaN" if np.isnan(value) else "+inf", row)
