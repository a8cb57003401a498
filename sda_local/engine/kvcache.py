"""The KV cache's element types and flash attention (llama.cpp's ``--cache-type-k/-v``, ``--flash-attn``), and
what the cache of a run costs in memory.

Every slot has two streams (with and without the instruction) of ``n_ctx`` cells each; the judges that read
distributions (self, expected) add a forcing context of two sequences, of 1024 cells at first, grown up to
``n_ctx`` when a judged input needs it (forcing.py). llama.cpp allocates
every cell at context creation, so the cost is known at load:

    bytes per cell = n_layer * n_head_kv * (head_dim_k * bytes(type_k) + head_dim_v * bytes(type_v))

summed over the layers (their KV head counts may differ; 0 for a hybrid model's recurrent layers, whose state
is not counted). llama.cpp pads a sequence's cells to a multiple of 256. Sliding-window layers (Gemma 3) get
full-size caches, llama.cpp's default (``swa_full``), so the formula holds for them too (checked against
llama.cpp's own log for both catalogue models, ``tests/test_kvcache.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp

from ..errors import InputError

# name -> (ggml type, bytes per element): q8_0 packs 32 values in 34 bytes, q4_0 in 18.
CACHE_TYPES = {
    "f16": (llama_cpp.GGML_TYPE_F16, 2.0),
    "q8_0": (llama_cpp.GGML_TYPE_Q8_0, 34 / 32),
    "q4_0": (llama_cpp.GGML_TYPE_Q4_0, 18 / 32),
}
FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


@dataclass(frozen=True)
class KVConfig:
    """How the KV cache is stored: ``type_k``/``type_v`` of CACHE_TYPES, ``flash_attn`` of FLASH_ATTN."""

    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"

    def check(self) -> "KVConfig":
        for name, value in (("cache type K", self.type_k), ("cache type V", self.type_v)):
            if value not in CACHE_TYPES:
                raise InputError(f"unknown {name} {value!r} (choose from {', '.join(CACHE_TYPES)})")
        if self.flash_attn not in FLASH_ATTN:
            raise InputError(f"unknown flash attention mode {self.flash_attn!r} (choose from {', '.join(FLASH_ATTN)})")
        if self.type_v != "f16" and self.flash_attn == "off":  # llama.cpp's own rule
            raise InputError("a quantized V cache needs flash attention: set it to auto or on")
        return self

    def apply(self, params) -> None:
        """Set llama_context_params' fields."""
        params.type_k = CACHE_TYPES[self.type_k][0]
        params.type_v = CACHE_TYPES[self.type_v][0]
        params.flash_attn_type = FLASH_ATTN[self.flash_attn]


DEFAULT_KV = KVConfig()


def bytes_per_cell(shape, config: KVConfig) -> float:
    """One cell (one token of one sequence) over every layer. ``shape``: gguf_model.attention_shape_of()."""
    heads, head_k, head_v = shape
    return sum(heads) * (head_k * CACHE_TYPES[config.type_k][1] + head_v * CACHE_TYPES[config.type_v][1])


def cells(n_ctx: int) -> int:
    """The cells llama.cpp gives a sequence of ``n_ctx``: padded to a multiple of 256."""
    return -(-n_ctx // 256) * 256


@dataclass(frozen=True)
class KVMemory:
    """What a run's KV caches take (bytes): ``per_slot`` (two streams of n_ctx), ``slots`` of them, and the
    ``forcing`` context the self and expected-scoring judges add when they first run."""

    per_slot: int
    slots: int
    forcing: int  # as created; it grows up to forcing_most for a long judged input
    forcing_most: int
    config: KVConfig
    attention_only: bool = False  # a hybrid model: the recurrent layers' state is not counted

    @property
    def total(self) -> int:
        return self.per_slot * self.slots

    def describe(self) -> str:
        c = self.config
        return (f"KV cache ({c.type_k}/{c.type_v}): {_mib(self.per_slot)} per slot, {_mib(self.total)} for "
                f"{self.slots} slot{'s' if self.slots != 1 else ''}; the self judge adds {_mib(self.forcing)}"
                + (f" (up to {_mib(self.forcing_most)} for long inputs)" if self.forcing_most > self.forcing else "")
                + ("; attention layers only (the recurrent state is not counted)" if self.attention_only else ""))

    def to_dict(self) -> dict:
        return {"per_slot_bytes": self.per_slot, "slots": self.slots, "total_bytes": self.total,
                "forcing_bytes": self.forcing, "forcing_most_bytes": self.forcing_most, "type_k": self.config.type_k, "type_v": self.config.type_v}


def kv_memory(shape, config: KVConfig, *, n_ctx: int, slots: int) -> KVMemory:
    """The caches of ``slots`` slots at ``n_ctx``, and of the judges' forcing context as it starts."""
    from .forcing import START_CELLS

    cell = bytes_per_cell(shape, config)
    forcing = 2 * cells(min(n_ctx, START_CELLS)) * cell
    return KVMemory(per_slot=int(2 * cells(n_ctx) * cell), slots=slots, forcing=int(forcing),
                    forcing_most=int(2 * cells(n_ctx) * cell), config=config, attention_only=0 in shape[0])


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"
