"""benchmarks/gpu_check.sh where there is no GPU: it skips the CUDA build in one line and exits 0 without
writing anything; its argument and environment errors are one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def run(*args, tmp_path, **env):
    # No nvidia-smi and no nvcc, whatever this machine has: the overrides name files that do not exist.
    full_env = dict(os.environ, GPU_CHECK_NVIDIA_SMI=str(tmp_path / "no-nvidia-smi"),
                    GPU_CHECK_NVCC=str(tmp_path / "no-nvcc"), OUT=str(tmp_path / "out"))
    full_env.update(env)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=60)


def lines(proc):
    return (proc.stdout + proc.stderr).strip().splitlines()


@pytest.mark.parametrize("args", [(), ("all",), ("build",), ("run", "big")])
def test_without_a_gpu_it_skips_in_one_line_and_exits_0(tmp_path, args):
    proc = run(*args, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = lines(proc)
    assert line.startswith("gpu_check: no NVIDIA GPU with nvcc here") and "skipped" in line and "--cpu" in line
    assert not (tmp_path / "out").exists()  # nothing built, nothing written


def test_nvcc_without_a_gpu_skips_too(tmp_path):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(0o755)
    proc = run(tmp_path=tmp_path, GPU_CHECK_NVCC=str(nvcc))
    assert proc.returncode == 0 and len(lines(proc)) == 1 and "GPU: none" in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [("bild",), ("--gpu",), ("--cpu", "everything")])
def test_a_bad_argument_is_one_line_and_exit_2(tmp_path, args):
    proc = run(*args, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(lines(proc)) == 1 and "usage: benchmarks/gpu_check.sh" in proc.stderr


def test_cpu_mode_without_sda_local_is_one_line_and_exit_1(tmp_path):
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")  # a python that imports nothing
    fake.chmod(0o755)
    proc = run("--cpu", "models", tmp_path=tmp_path, PYTHON=str(fake))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.strip()]
    assert error == [f"gpu_check: --cpu uses the installed sda-local, but {fake} cannot import llama_cpp and "
                     "sda_local (activate the project's venv or set PYTHON)"]
    assert "Traceback" not in proc.stdout + proc.stderr
