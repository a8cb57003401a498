"""ctypes binding of ``libsda`` (native/): the C++ SDA sampler hook and fusion.

Mirrors llama-cpp-python's split between its ctypes layer and its high-level class: this module only
declares the C ABI of ``native/include/sda.h`` and converts arguments; the engine decides what to call.

``llama_cpp`` is imported before ``libsda`` is loaded, so that libsda's dependency on ``libllama.so.0``
binds to the copy Python already holds (one libllama, one set of global state, per process).
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Tuple

import llama_cpp  # noqa: F401  (must be loaded first, see above)
import numpy as np

ABI_VERSION = 8
# enum sda_status of sda.h: the non-finite codes, as (value, row).
NONFINITE_CODES = {-2: ("NaN", "with"), -3: ("+inf", "with"), -4: ("NaN", "without"), -5: ("+inf", "without")}
ROWS = {"with": 0, "without": 1}  # enum sda_row
_LIBRARY_NAMES = {"linux": "libsda.so", "darwin": "libsda.dylib", "win32": "sda.dll"}


class SDAParams(ctypes.Structure):
    _fields_ = [
        ("strength", ctypes.c_float),
        ("k", ctypes.c_float),
        ("t0", ctypes.c_float),
        ("temperature_mode", ctypes.c_int32),
    ]


class SDASteering(ctypes.Structure):
    _fields_ = [
        ("clip", ctypes.c_float),
        ("plausibility", ctypes.c_float),
        ("echo_run", ctypes.c_int32),
        ("guard_to", ctypes.c_int32),
        ("onset", ctypes.c_int32),
    ]


class SDAInstruction(ctypes.Structure):
    _fields_ = [
        ("tokens", ctypes.POINTER(ctypes.c_int32)),
        ("run_at", ctypes.POINTER(ctypes.c_int32)),
        ("n_tokens", ctypes.c_int32),
        ("capped", ctypes.POINTER(ctypes.c_int32)),
        ("n_capped", ctypes.c_int32),
        ("forbidden", ctypes.POINTER(ctypes.c_int32)),
        ("n_forbidden", ctypes.c_int32),
    ]


class SDAGuards(ctypes.Structure):
    _fields_ = [
        ("guarded", ctypes.POINTER(ctypes.c_int32)),
        ("n_guarded", ctypes.c_int32),
        ("capped", ctypes.POINTER(ctypes.c_int32)),
        ("n_capped", ctypes.c_int32),
        ("forbidden", ctypes.POINTER(ctypes.c_int32)),
        ("n_forbidden", ctypes.c_int32),
    ]


# steering.GUARD_TARGETS -> enum sda_guard_to
GUARD_TARGETS = {"without": 0, "prompt": 1}


class SDAStats(ctypes.Structure):
    _fields_ = [
        ("n_steps", ctypes.c_int64),
        ("sum_js", ctypes.c_double),
        ("sum_temperature", ctypes.c_double),
        ("fusion_seconds", ctypes.c_double),
        ("last_js", ctypes.c_float),
        ("last_temperature", ctypes.c_float),
        ("n_in_place", ctypes.c_int64),
    ]


_float_p = ctypes.POINTER(ctypes.c_float)
_int32_p = ctypes.POINTER(ctypes.c_int32)
_state = {"lib": None, "error": None, "path": None, "tried": False}


def library_path() -> Path:
    """Where the installed libsda is expected (next to this module; SDA_LOCAL_NATIVE_LIB overrides)."""
    override = os.environ.get("SDA_LOCAL_NATIVE_LIB")
    if override:
        return Path(override)
    name = _LIBRARY_NAMES.get(sys.platform, "libsda.so")
    return Path(__file__).resolve().parent.parent / name  # installed beside the package root


def declare_fusion(lib: ctypes.CDLL) -> None:
    """The entry points that need no llama.cpp (native/src/fuse_api.cpp)."""
    lib.sda_abi_version.argtypes = []
    lib.sda_abi_version.restype = ctypes.c_int32
    lib.sda_simd_width.argtypes = []
    lib.sda_simd_width.restype = ctypes.c_int32
    lib.sda_fuse.argtypes = [_float_p, _float_p, ctypes.c_int32, ctypes.POINTER(SDAParams), _float_p, _float_p, _float_p]
    lib.sda_fuse.restype = ctypes.c_int32
    lib.sda_fuse_steered.argtypes = [_float_p, _float_p, ctypes.c_int32, ctypes.POINTER(SDAParams),
                                     ctypes.POINTER(SDASteering), ctypes.POINTER(SDAGuards), _float_p, _float_p,
                                     _float_p]
    lib.sda_fuse_steered.restype = ctypes.c_int32
    lib.sda_log_sum_exp.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.sda_log_sum_exp.restype = ctypes.c_float


def _declare(lib: ctypes.CDLL) -> None:
    declare_fusion(lib)
    lib.sda_sampler_init.argtypes = [ctypes.POINTER(SDAParams), ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]
    lib.sda_sampler_init.restype = ctypes.c_void_p
    lib.sda_sampler_set_source.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    lib.sda_sampler_set_source.restype = None
    lib.sda_sampler_set_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
                                         ctypes.c_int32]
    lib.sda_sampler_set_rows.restype = None
    lib.sda_sampler_set_steering.argtypes = [ctypes.c_void_p, ctypes.POINTER(SDASteering),
                                             ctypes.POINTER(SDAInstruction)]
    lib.sda_sampler_set_steering.restype = ctypes.c_int32
    lib.sda_sampler_get_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(SDAStats)]
    lib.sda_sampler_get_stats.restype = None
    lib.sda_guard_sampler_init.argtypes = []
    lib.sda_guard_sampler_init.restype = ctypes.c_void_p
    lib.sda_sampler_get_fault.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32)]
    lib.sda_sampler_get_fault.restype = ctypes.c_int32
    lib.sda_sampler_inject_fault.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]
    lib.sda_sampler_inject_fault.restype = ctypes.c_int32
    lib.sda_nucleus_sampler_init.argtypes = [ctypes.c_float, ctypes.c_float, ctypes.c_uint32]
    lib.sda_nucleus_sampler_init.restype = ctypes.c_void_p


def library() -> Optional[ctypes.CDLL]:
    """The loaded libsda, or None (with a one-line warning, once) when it cannot be loaded."""
    if not _state["tried"]:
        _state["tried"] = True
        path = library_path()
        _state["path"] = str(path)
        try:
            lib = ctypes.CDLL(str(path))
            lib.sda_abi_version.argtypes, lib.sda_abi_version.restype = [], ctypes.c_int32
            version = lib.sda_abi_version()  # first: a stale library is named as such, not by a missing symbol
            if version != ABI_VERSION:
                raise OSError(f"ABI version {version}, expected {ABI_VERSION}")
            _declare(lib)
            _state["lib"] = lib
        except (OSError, AttributeError) as exc:
            _state["error"] = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            warnings.warn(
                f"sda-local: native fusion unavailable ({_state['error']}); using the slower numpy fusion",
                RuntimeWarning,
                stacklevel=2,
            )
    return _state["lib"]


def load_error() -> Optional[str]:
    library()
    return _state["error"]


def loaded_path() -> Optional[str]:
    return _state["path"] if library() is not None else None


SIMD_NAMES = {16: "AVX-512", 8: "AVX/AVX2", 4: "NEON/SSE2", 1: "scalar"}


def simd() -> Optional[str]:
    """The fusion's SIMD pack, as built: e.g. "AVX-512 (16 floats)"; None without libsda."""
    lib = library()
    if lib is None:
        return None
    width = lib.sda_simd_width()
    return f"{SIMD_NAMES.get(width, 'unknown')} ({width} float{'s' if width > 1 else ''})"


def make_params(strength: float, k: float, t0: float, temperature_mode: int) -> SDAParams:
    return SDAParams(strength, k, t0, temperature_mode)


def make_steering(steering) -> SDASteering:
    """The C struct of a steering.Steering."""
    return SDASteering(steering.clip, steering.plausibility, steering.echo_run, GUARD_TARGETS[steering.guard_to],
                       steering.onset)


def _ids(values) -> Tuple[object, int]:
    """(int32 C array, count) of a sequence of ints; the array must outlive the call that reads it."""
    values = [int(v) for v in values]
    return (ctypes.c_int32 * max(1, len(values)))(*values), len(values)


def set_steering(lib: ctypes.CDLL, sampler: int, steering, guard) -> None:
    """Give an SDA sampler its steering and the instruction as it reads it (instruction.InstructionGuard)."""
    tokens, n_tokens = _ids(guard.flat_tokens)
    run_at, n_run_at = _ids(guard.run_at)
    capped, n_capped = _ids(guard.capped)
    forbidden, n_forbidden = _ids(guard.forbidden)
    if n_run_at not in (0, n_tokens):
        raise ValueError("run_at must have one entry per instruction token and separator")
    instruction = SDAInstruction(tokens, run_at if n_run_at else None, n_tokens, capped, n_capped, forbidden,
                                 n_forbidden)
    if lib.sda_sampler_set_steering(sampler, ctypes.byref(make_steering(steering)), ctypes.byref(instruction)) != 0:
        raise ValueError("sda_sampler_set_steering rejected its arguments")


def fuse_steered(lib: ctypes.CDLL, logits_with: np.ndarray, logits_without: np.ndarray, strength: float, k: float,
                 t0: float, temperature_mode: int, steering, guarded, *, capped=(), forbidden=()
                 ) -> Tuple[np.ndarray, float, float]:
    """Call sda_fuse_steered (``guarded``: the echo guard's token ids at this step; ``capped``, ``forbidden``: the
    instruction's, as in steering.fuse_steered_numpy)."""
    out = np.empty_like(logits_with)
    temperature, js = ctypes.c_float(), ctypes.c_float()
    arrays = [_ids(guarded if guarded is not None else []), _ids(capped), _ids(forbidden)]
    guards = SDAGuards(*(x for pair in arrays for x in pair))
    rc = lib.sda_fuse_steered(
        logits_with.ctypes.data_as(_float_p), logits_without.ctypes.data_as(_float_p), logits_with.size,
        ctypes.byref(make_params(strength, k, t0, temperature_mode)), ctypes.byref(make_steering(steering)),
        ctypes.byref(guards), out.ctypes.data_as(_float_p), ctypes.byref(temperature), ctypes.byref(js))
    if rc in NONFINITE_CODES:
        from .fusion import NonFiniteLogitsError

        raise NonFiniteLogitsError(*NONFINITE_CODES[rc])
    if rc != 0:
        raise ValueError(f"sda_fuse_steered rejected its arguments (code {rc})")
    return out, float(temperature.value), float(js.value)


def fuse(
    lib: ctypes.CDLL,
    logits_with: np.ndarray,
    logits_without: np.ndarray,
    strength: float,
    k: float,
    t0: float,
    temperature_mode: int,
) -> Tuple[np.ndarray, float, float]:
    """Call sda_fuse on two contiguous float32 arrays of equal length."""
    out = np.empty_like(logits_with)
    temperature = ctypes.c_float()
    js = ctypes.c_float()
    params = make_params(strength, k, t0, temperature_mode)
    rc = lib.sda_fuse(
        logits_with.ctypes.data_as(_float_p),
        logits_without.ctypes.data_as(_float_p),
        logits_with.size,
        ctypes.byref(params),
        out.ctypes.data_as(_float_p),
        ctypes.byref(temperature),
        ctypes.byref(js),
    )
    if rc in NONFINITE_CODES:
        from .fusion import NonFiniteLogitsError

        raise NonFiniteLogitsError(*NONFINITE_CODES[rc])
    if rc != 0:
        raise ValueError(f"sda_fuse rejected its arguments (code {rc})")
    return out, float(temperature.value), float(js.value)


def sampler_init(lib: ctypes.CDLL, params: SDAParams, n_vocab: int, source_ctx, source_idx: int) -> int:
    """A new SDA llama_sampler (raw pointer); the chain it is added to owns it."""
    ptr = lib.sda_sampler_init(ctypes.byref(params), n_vocab, source_ctx, source_idx)
    if not ptr:
        raise ValueError("sda_sampler_init rejected its parameters")
    return ptr


def sampler_stats(lib: ctypes.CDLL, sampler: int) -> SDAStats:
    stats = SDAStats()
    lib.sda_sampler_get_stats(sampler, ctypes.byref(stats))
    return stats


def guard_sampler_init(lib: ctypes.CDLL) -> int:
    """A new guard llama_sampler (raw pointer) for plain generation; the chain it is added to owns it."""
    ptr = lib.sda_guard_sampler_init()
    if not ptr:
        raise MemoryError("sda_guard_sampler_init")
    return ptr


def nucleus_sampler_init(lib: ctypes.CDLL, top_p: float, seed: int, temperature: float = 1.0) -> int:
    """A new nucleus llama_sampler (top-p and the seeded draw, raw pointer); the chain it is added to owns it."""
    ptr = lib.sda_nucleus_sampler_init(top_p, temperature, seed)
    if not ptr:
        raise ValueError("sda_nucleus_sampler_init rejected its parameters")
    return ptr


def sampler_fault(lib: ctypes.CDLL, sampler: int) -> Optional[Tuple[str, str, int]]:
    """(value, row, step) of the first non-finite row an SDA or guard sampler met, or None."""
    step = ctypes.c_int32()
    code = lib.sda_sampler_get_fault(sampler, ctypes.byref(step))
    if code in NONFINITE_CODES:
        return (*NONFINITE_CODES[code], step.value)
    return None


def inject_fault(lib: ctypes.CDLL, sampler: int, value: int, step: int, row: str) -> None:
    """TEST ONLY: see sda_sampler_inject_fault in sda.h."""
    if lib.sda_sampler_inject_fault(sampler, value, step, ROWS[row]) != 0:
        raise ValueError("sda_sampler_inject_fault rejected its arguments")


def log_sum_exp(lib: ctypes.CDLL, row: np.ndarray) -> float:
    """log(sum(exp(row))) of a float32 row, natively (+inf / NaN when the row holds one, -inf when every entry
    is -inf). A logit row is passed as it is; anything else is made a contiguous float32 copy first."""
    row = np.ascontiguousarray(row, dtype=np.float32)
    return lib.sda_log_sum_exp(row.ctypes.data, row.size)
