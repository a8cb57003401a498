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
from .errors import ContextOverflowError, ModelError

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
        self._piece_buf = ctypes.create_string_buffer(256)
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
            buf = self._piece_buf
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
    def meta(self, key: str) -> Optional[str]:
        """A GGUF metadata value as text, or None when the file has no such key."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode("utf-8"), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def attention_shape(self) -> Tuple[int, int, int, int]:
        """(layers, KV heads, K head size, V head size): what one KV cell holds (engine/kvcache.py)."""
        model = self.model
        n_head = max(1, llama_cpp.llama_model_n_head(model))
        default = llama_cpp.llama_model_n_embd(model) // n_head
        arch = self.meta("general.architecture") or ""

        def size(name: str) -> int:
            value = self.meta(f"{arch}.attention.{name}")
            return int(value) if value and value.isdigit() else default

        return (llama_cpp.llama_model_n_layer(model), llama_cpp.llama_model_n_head_kv(model), size("key_length"),
                size("value_length"))

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
