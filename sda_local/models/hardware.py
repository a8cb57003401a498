"""What this CPU is, and whether llama.cpp may repack the weights for it.

llama.cpp's CPU backend can load weights into "extra buffer types" that repack them for faster kernels
(``llama_model_params.use_extra_bufts``). On Intel AMX CPUs (Sapphire Rapids and later) that includes the AMX
buffer type, whose matmul crashes every multi-token decode in the llama.cpp that llama-cpp-python 0.3.36 vendors
(upstream issue #20824: segmentation fault in ``ggml_backend_amx_mul_mat``). Loading without extra buffer types
avoids it at no measurable decode cost on small models, so ``repack="auto"`` turns repacking off exactly where
AMX is present, and leaves llama.cpp's default elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional, Tuple

from ..errors import InputError

REPACK_MODES = ("auto", "on", "off")
REPACK_ENV = "SDA_LOCAL_REPACK"
# /proc/cpuinfo flags worth reporting: the SIMD level the fusion and llama.cpp kernels run at, and AMX.
_REPORTED_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                   "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CpuReport:
    model: str
    flags: Tuple[str, ...]  # of _REPORTED_FLAGS, as the kernel reports them (Linux); empty elsewhere
    llama_features: Tuple[str, ...]  # llama.cpp's compiled-in CPU features that are on (e.g. AVX2, AMX_INT8)
    amx: bool  # the CPU has AMX, or llama.cpp was compiled with its AMX kernels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flags"], d["llama_features"] = list(self.flags), list(self.llama_features)
        return d


def _cpuinfo() -> Tuple[str, List[str]]:
    model, flags = "", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value.split()
                if model and flags:
                    break
    except OSError:
        pass
    if not model:
        import platform

        model = platform.processor() or platform.machine()
    return model, flags


def _llama_features() -> List[str]:
    """Feature names that llama.cpp's system info marks as 1 (what its CPU backend was compiled with)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    features = []
    for segment in info.replace("|", "\n").splitlines():
        name, sep, value = segment.partition(" = ")
        if sep and value.strip() == "1":
            features.append(name.rpartition(" : ")[2].strip())  # "CPU : SSE3 = 1": the backend name goes
    return features


_report: Optional[CpuReport] = None


def cpu_report() -> CpuReport:
    global _report
    if _report is None:
        model, flags = _cpuinfo()
        features = _llama_features()
        amx = any(f.startswith("amx") for f in flags) or any(f.startswith("AMX") for f in features)
        _report = CpuReport(model, tuple(f for f in _REPORTED_FLAGS if f in flags), tuple(features), amx)
    return _report


def check_repack(mode: Optional[str]) -> str:
    """The repack mode asked for: the argument, else $SDA_LOCAL_REPACK, else "auto"."""
    value = mode if mode is not None else os.environ.get(REPACK_ENV, "auto")
    value = str(value).strip().lower()
    if value not in REPACK_MODES:
        source = "repack" if mode is not None else REPACK_ENV
        raise InputError(f"{source} must be one of {', '.join(REPACK_MODES)}, got {value!r}")
    return value


def use_repack(mode: Optional[str] = None) -> bool:
    """Whether models are loaded with llama.cpp's extra (repacking) buffer types: "auto" = not on AMX CPUs."""
    mode = check_repack(mode)
    if mode == "auto":
        return not cpu_report().amx
    return mode == "on"


def repack_decision(mode: Optional[str] = None) -> dict:
    mode = check_repack(mode)
    enabled = use_repack(mode)
    if mode != "auto":
        reason = f"repack={mode}"
    elif enabled:
        reason = "no AMX on this CPU: llama.cpp's default"
    else:
        reason = "AMX CPU: off, avoiding llama.cpp's AMX matmul crash (upstream #20824)"
    return {"mode": mode, "use_extra_bufts": enabled, "reason": reason}


def model_params(n_gpu_layers: int = 0, repack: Optional[str] = None):
    """llama_model_params with sda-local's defaults: layer offload and the repack decision."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = int(n_gpu_layers)
    params.use_extra_bufts = use_repack(repack)
    return params


@contextlib.contextmanager
def llama_cpp_repack(repack: Optional[str] = None) -> Iterator[None]:
    """Make ``llama_cpp.Llama`` (which has no repack argument) load with the repack decision, while inside.

    ``Llama.__init__`` starts from ``llama_model_default_params()``; this wraps that function for the duration.
    """
    import llama_cpp.llama_cpp as low

    enabled = use_repack(repack)
    original = low.llama_model_default_params

    def default_params():
        params = original()
        params.use_extra_bufts = enabled
        return params

    low.llama_model_default_params = default_params
    try:
        yield
    finally:
        low.llama_model_default_params = original


def run_llama_cpp_server(argv: List[str], repack: Optional[str] = None) -> None:
    """``python -m llama_cpp.server`` with the repack decision applied to the models it loads."""
    import runpy

    with llama_cpp_repack(repack):
        sys.argv = ["llama_cpp.server", *argv]
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":  # python -m sda_local.models.hardware server ARGS...: llama-cpp-python's server, AMX-safe
    if sys.argv[1:2] == ["server"]:
        run_llama_cpp_server(sys.argv[2:])
    else:
        import json

        print(json.dumps({"cpu": cpu_report().to_dict(), "repack": repack_decision()}, indent=2))
