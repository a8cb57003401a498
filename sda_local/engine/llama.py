"""The llama.cpp objects the engine runs on, each owned by one small class (as llama-cpp-python's
``_internals.py`` owns its model, context, batch and sampler): ``Context`` (a llama_context: decode, logits,
its KV cache's sequences), ``Batch`` (a llama_batch) and ``SamplerChain`` (a llama_sampler chain and the
samplers in it). Each frees its object once, by ``close()`` or when it is collected; above this module the
engine does not call llama.cpp's C API (the model itself is ``models.gguf.GGUFModel``; libsda's samplers are
``native.py``'s and join a chain here).
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import weakref
from pathlib import Path
from typing import Sequence, Tuple

import llama_cpp
import numpy as np

from ..errors import ModelError
from ..models.gguf import GGUFModel

TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
assert TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)

Row = Tuple[object, int]  # (llama_context pointer, output index): one logit row, for llama_get_logits_ith


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


DEVICE_TYPES = ("CPU", "GPU", "IGPU", "ACCEL", "META")  # enum ggml_backend_dev_type, in order


@functools.lru_cache(maxsize=None)
def devices() -> Tuple[Tuple[str, str], ...]:
    """(name, type) of every device ggml registered in this build (CPU, CUDA0, Metal, BLAS, ...), from its
    device registry (llama.cpp's system info leaves out backends without a feature list, such as BLAS). Empty
    when the registry cannot be read."""
    # The ggml beside the libllama llama-cpp-python loaded (LLAMA_CPP_LIB_PATH included): the registry is
    # libggml's, the device accessors libggml-base's (found through it by dlsym, but not by Windows'
    # GetProcAddress, so both are asked).
    lib_dir = Path(getattr(llama_cpp.llama_cpp, "_base_path", Path(llama_cpp.__file__).resolve().parent / "lib"))
    prefix, suffix = {"darwin": ("lib", ".dylib"), "win32": ("", ".dll")}.get(sys.platform, ("lib", ".so"))

    def symbol(name, restype, argtypes):
        for lib in libs:
            function = getattr(lib, name, None)
            if function is not None:
                function.restype, function.argtypes = restype, argtypes
                return function
        raise AttributeError(name)

    try:
        libs = [ctypes.CDLL(str(lib_dir / f"{prefix}ggml{suffix}"))]
        try:
            libs.append(ctypes.CDLL(str(lib_dir / f"{prefix}ggml-base{suffix}")))
        except OSError:
            pass
        count = symbol("ggml_backend_dev_count", ctypes.c_size_t, [])
        get = symbol("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t])
        kind_of = symbol("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p])
        name_of = symbol("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p])
    except (OSError, AttributeError):
        return ()
    found = []
    for i in range(count()):
        device = get(i)
        kind = kind_of(device)
        found.append(((name_of(device) or b"?").decode("utf-8", "replace"),
                      DEVICE_TYPES[kind] if 0 <= kind < len(DEVICE_TYPES) else str(kind)))
    return tuple(found)


def logits_row(row: Row, n_vocab: int) -> np.ndarray:
    """A row's logits, in place (valid until that context's next decode)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(*row), shape=(n_vocab,))


class Context:
    """One llama_context on ``model``'s weights; ``kv``: engine.kvcache.KVConfig (None: llama.cpp's defaults)."""

    def __init__(self, model: GGUFModel, *, n_ctx: int, n_batch: int, n_ubatch: int, n_threads: int,
                 n_seq_max: int = 1, kv_unified: bool = False, kv=None):
        ptr = model.new_context(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=n_threads,
                                n_seq_max=n_seq_max, kv_unified=kv_unified, kv=kv)
        # Freed by close(), or when collected (the finalizer holds the model, so a context collected with its
        # engine's garbage is freed before the weights), or at exit before the model (newest first).
        self._finalizer = weakref.finalize(self, _free_context, ptr, model)
        self.ptr = ptr
        self._memory = llama_cpp.llama_get_memory(ptr)
        self.n_vocab = model.n_vocab

    @property
    def n_ubatch(self) -> int:
        return llama_cpp.llama_n_ubatch(self._live())

    def _live(self):
        if self.ptr is None:
            raise ModelError("the llama.cpp context is closed")
        return self.ptr

    def decode(self, batch: "Batch") -> None:
        rc = llama_cpp.llama_decode(self._live(), batch.ptr)
        if rc != 0:
            raise ModelError(f"llama_decode failed (code {rc}): out of context or memory")

    def row(self, index: int) -> Row:
        """Output ``index`` of the last decode, as samplers take it."""
        return self._live(), index

    def logits(self, n_rows: int) -> np.ndarray:
        """The last decode's output rows, in batch order, in place: (n_rows, n_vocab) float32."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._live()), shape=(n_rows, self.n_vocab))

    def forget(self, seq: int, keep: int) -> None:
        """Drop a sequence's cache positions >= keep."""
        self._live()
        llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1)

    def share(self, source: int, target: int, length: int) -> None:
        """Give sequence ``target`` the first ``length`` positions of ``source`` (metadata only in a unified cache)."""
        self._live()
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, 0, length)

    def clear(self) -> None:
        self._live()
        llama_cpp.llama_memory_clear(self._memory, True)

    def close(self) -> None:
        self._finalizer()  # llama_free once; later calls do nothing
        self.ptr = None


def _free_context(ptr, model) -> None:
    llama_cpp.llama_free(ptr)


class Batch:
    """A reusable llama_batch of ``capacity`` tokens, one sequence id each."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.ptr = llama_cpp.llama_batch_init(capacity, 0, 1)
        self._finalizer = weakref.finalize(self, llama_cpp.llama_batch_free, self.ptr)

    def clear(self) -> None:
        """Empty it (every filling starts here: a freed batch is refused, never written)."""
        if self.ptr is None:
            raise ModelError("the llama.cpp batch is freed")
        self.ptr.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append a token; returns its output index (for ``llama_get_logits_ith``) when ``logits``, else -1."""
        b = self.ptr
        i = b.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i if logits else -1

    @property
    def n_tokens(self) -> int:
        return self.ptr.n_tokens

    @property
    def room(self) -> int:
        return self.capacity - self.ptr.n_tokens

    def free(self) -> None:
        self._finalizer()  # llama_batch_free once
        self.ptr = None


class SamplerChain:
    """A llama_sampler chain. It owns the samplers given to it from the call on, also when it fails (a sampler
    that could not be made, None or NULL, is refused and every other one freed): llama.cpp frees them with
    the chain."""

    def __init__(self, samplers: Sequence[object]):
        self.ptr = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._finalizer = weakref.finalize(self, llama_cpp.llama_sampler_free, self.ptr)
        samplers = list(samplers)
        if not all(samplers):
            for sampler in filter(None, samplers):
                free_sampler(sampler)
            self.close()
            raise ModelError("a llama.cpp sampler could not be made")
        for sampler in samplers:
            llama_cpp.llama_sampler_chain_add(self.ptr, _as_sampler(sampler))

    def sample(self, row: Row) -> int:
        """The token the chain samples from a context's output row (LLAMA_TOKEN_NULL, -1, when none)."""
        return llama_cpp.llama_sampler_sample(self.ptr, *row)

    def apply(self, candidates: np.ndarray) -> int:
        """Run the chain over a TOKEN_DATA array (unsorted; changed in place: masks, top-p's order); the token it
        selected, or -1. Read through llama.cpp's own view: a sampler may point it at a buffer of its own."""
        arr = llama_cpp.llama_token_data_array(data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
                                               size=len(candidates), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(arr))
        return arr.data[arr.selected].id if arr.selected >= 0 else -1

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.ptr, token)

    def close(self) -> None:
        self._finalizer()  # the chain and every sampler in it, once


# -- llama.cpp's own samplers (owned by the chain they are given to) -----------------------------------
def temperature(t: float):
    return llama_cpp.llama_sampler_init_temp(t)


def top_p(p: float):
    return llama_cpp.llama_sampler_init_top_p(p, 1)


def draw(seed: int):
    return llama_cpp.llama_sampler_init_dist(seed)


def greedy():
    return llama_cpp.llama_sampler_init_greedy()


def grammar(model: GGUFModel, text: str):
    """A GBNF grammar sampler (root rule ``root``), or None when llama.cpp cannot parse it."""
    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, text.encode("utf-8"), b"root")
    return sampler or None


def free_sampler(sampler) -> None:
    """A sampler that never joined a chain."""
    llama_cpp.llama_sampler_free(_as_sampler(sampler))


def _as_sampler(sampler):
    """libsda's samplers come as addresses, llama.cpp's as pointers."""
    return ctypes.cast(sampler, llama_cpp.llama_sampler_p_ctypes) if isinstance(sampler, int) else sampler


def ban(n_vocab: int, tokens: Sequence[int]):
    """Logit bias -inf on ``tokens`` (the end-of-generation ban of ignore_eos)."""
    biases = (llama_cpp.llama_logit_bias * len(tokens))(*[(t, -math.inf) for t in tokens])
    return llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(tokens), biases)
