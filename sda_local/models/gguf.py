"""A GGUF model loaded once through llama.cpp's C API (llama-cpp-python's ctypes layer).

Owns the ``llama_model`` that every decoding context of an engine shares, plus what the engine needs
from the vocabulary: tokenisation, token pieces, end-of-generation tokens, chat-template metadata.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import llama_cpp

from . import hardware
from ..errors import ContextOverflowError, ModelError

GGUF_MAGIC = b"GGUF"


class _LlamaLog:
    """Routes llama.cpp's log: printed when verbose, else only the last error lines are kept for messages."""

    def __init__(self):
        self.verbose = False
        self.recent_errors: List[str] = []

        @llama_cpp.llama_log_callback
        def callback(level, text, _user_data):
            message = text.decode("utf-8", errors="replace") if text else ""
            if self.verbose:
                os.write(2, message.encode("utf-8", errors="replace"))
            elif level == 3 and message.strip():  # GGML_LOG_LEVEL_ERROR
                self.recent_errors = (self.recent_errors + [message.strip()])[-3:]

        self._callback = callback  # keep the ctypes thunk alive
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def last_error(self) -> str:
        return self.recent_errors[-1] if self.recent_errors else ""


_log: Optional[_LlamaLog] = None


def llama_log(verbose: bool) -> _LlamaLog:
    global _log
    if _log is None:
        llama_cpp.llama_backend_init()
        _log = _LlamaLog()
    _log.verbose = verbose
    return _log


def check_gguf_file(path: Path) -> None:
    """Fail with a one-line ModelError unless ``path`` is a readable file starting with the GGUF magic."""
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"not a GGUF model file: {path}")


# GGUF value types (gguf.h): the scalar ones as struct formats; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: Path, wanted) -> Dict[str, object]:
    """The metadata values of the keys ``wanted`` (a set of names), read from the file's header alone:
    no weights are read or mapped. Arrays of numbers come back as lists; other arrays are skipped."""
    import struct

    def read(f, fmt):
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise ModelError(f"truncated GGUF header: {path}")
        return struct.unpack("<" + fmt, data)[0]

    def string(f):
        return f.read(read(f, "Q")).decode("utf-8", errors="replace")

    def value(f, kind, keep):
        if kind in _GGUF_SCALARS:
            return read(f, _GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return string(f)
        if kind != _GGUF_ARRAY:
            raise ModelError(f"unknown GGUF value type {kind} in {path}")
        item, count = read(f, "I"), read(f, "Q")
        if item in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[item]
            data = f.read(struct.calcsize("<" + fmt) * count)
            return list(struct.unpack(f"<{count}{fmt}", data)) if keep else None
        for _ in range(count):  # strings (a vocabulary) or nested arrays: walked over
            value(f, item, False)
        return None

    check_gguf_file(path)
    out: Dict[str, object] = {}
    with open(path, "rb") as f:
        f.read(4)
        if read(f, "I") < 2:
            raise ModelError(f"GGUF version 1 is not supported: {path}")
        read(f, "Q")  # tensors
        for _ in range(read(f, "Q")):
            key = string(f)
            kept = value(f, read(f, "I"), key in wanted)
            if key in wanted:
                out[key] = kept
    return out


def attention_shape_of(path: Path) -> Tuple[Tuple[int, ...], int, int]:
    """(KV heads of each layer, K head size, V head size), from the GGUF header: what one KV cell of each layer
    holds (engine/kvcache.py). Layers without attention (recurrent ones of a hybrid model) have 0 KV heads."""
    arch = read_gguf_metadata(path, {"general.architecture"}).get("general.architecture", "")
    keys = {f"{arch}.{k}" for k in ("block_count", "embedding_length", "attention.head_count",
                                    "attention.head_count_kv", "attention.key_length", "attention.value_length")}
    meta = read_gguf_metadata(path, keys)

    def get(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    n_layer = int(get("block_count", 0))
    n_head = get("attention.head_count", 1)
    n_head = max(n_head) if isinstance(n_head, list) else n_head
    head_kv = get("attention.head_count_kv", n_head)
    per_layer = [int(h) for h in head_kv] if isinstance(head_kv, list) else [int(head_kv)] * n_layer
    default = int(get("embedding_length", 0)) // max(1, int(n_head))
    return tuple(per_layer[:n_layer]), int(get("attention.key_length", default)), int(get("attention.value_length", default))


# Tokens llama.cpp's special-token parsing matches (llama-vocab.cpp, tokenizer_st_partition), and the
# attributes that make one swallow the whitespace before / after it.
SPECIAL_TOKEN_ATTRS = (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
                       | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN)
TOKEN_ATTR_LSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP
TOKEN_ATTR_RSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP


class GGUFModel:
    """A loaded model: weights, vocabulary and metadata. Close it (or use ``with``) to free the weights."""

    def __init__(self, path, *, n_gpu_layers: int = 0, verbose: bool = False, repack: Optional[str] = None):
        self.path = Path(path)
        check_gguf_file(self.path)
        self._log = llama_log(verbose)
        params = hardware.model_params(n_gpu_layers, repack)
        self.repack = bool(params.use_extra_bufts)
        self._log.recent_errors = []
        model = llama_cpp.llama_model_load_from_file(str(self.path).encode("utf-8"), params)
        if not model:
            detail = self._log.last_error() or "truncated or corrupt file?"
            raise ModelError(f"cannot load model {self.path}: {detail}")
        self.model = model
        # Freed by close(), or else at interpreter exit while llama_cpp is still importable (a __del__ run
        # during module teardown finds llama_cpp's functions already gone). Finalizers run newest first, so
        # contexts made on this model (see new_context) are freed before it.
        self._finalizer = weakref.finalize(self, llama_cpp.llama_model_free, model)
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos_id = int(llama_cpp.llama_vocab_bos(self.vocab))  # -1 (LLAMA_TOKEN_NULL) when there is none
        self._pieces: Dict[int, bytes] = {}
        self._attrs: Dict[int, int] = {}
        self._eog_tokens: Optional[List[int]] = None
        template = llama_cpp.llama_model_chat_template(model, None)
        self.chat_template: Optional[str] = template.decode("utf-8") if template else None

    # -- vocabulary -----------------------------------------------------------------------------
    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = llama_cpp.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", errors="replace") if text else ""

    def token_attributes(self, token: int) -> int:
        """llama_token_attr bits of ``token`` (LLAMA_TOKEN_ATTR_*)."""
        cached = self._attrs.get(token)
        if cached is None:
            cached = self._attrs[token] = int(llama_cpp.llama_vocab_get_attr(self.vocab, token))
        return cached

    @property
    def bos_token(self) -> str:
        return self.token_text(llama_cpp.llama_vocab_bos(self.vocab))

    @property
    def eos_token(self) -> str:
        return self.token_text(llama_cpp.llama_vocab_eos(self.vocab))

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> List[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, -n, add_bos, special)
        if n < 0:
            raise ContextOverflowError("the prompt could not be tokenised (too long)")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            # A buffer of its own: the call releases the GIL, and threads (batch lines, the server's judge, the
            # scheduler) ask for pieces at once; a shared one mixed their bytes and cached the mix for good.
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            cached = buf.raw[:n]
            self._pieces[token] = cached
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def eog_tokens(self) -> List[int]:
        """Every end-of-generation token (computed once; used to forbid them when ignoring EOS)."""
        if self._eog_tokens is None:
            self._eog_tokens = [t for t in range(self.n_vocab) if self.is_eog(t)]
        return self._eog_tokens

    # -- contexts -------------------------------------------------------------------------------
    def attention_shape(self) -> Tuple[Tuple[int, ...], int, int]:
        """(KV heads of each layer, K head size, V head size): see ``attention_shape_of``."""
        return attention_shape_of(self.path)

    def new_context(self, *, n_ctx: int, n_batch: int, n_ubatch: int, n_threads: int, n_seq_max: int = 1,
                    kv_unified: bool = False, kv=None):
        """A llama.cpp context; ``kv``: engine.kvcache.KVConfig (None: llama.cpp's defaults, f16 and auto)."""
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_ubatch
        params.n_seq_max = n_seq_max
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.kv_unified = kv_unified
        params.no_perf = True
        if kv is not None:
            kv.apply(params)
        self._log.recent_errors = []
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            detail = self._log.last_error() or "out of memory?"
            raise ModelError(f"cannot create a llama.cpp context (n_ctx={n_ctx}): {detail}")
        return ctx

    def close(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()  # runs llama_model_free once; later calls do nothing
        self.model = None
