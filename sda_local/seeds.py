"""Sampling seeds that always reproduce.

llama.cpp's dist sampler reads 0xFFFFFFFF (``LLAMA_DEFAULT_SEED``) as "pick a random seed", so that one
uint32 would silently give a different answer every run. Valid seeds are 0 .. 2^32 - 2, and seeds derived
from a base (eval's seed + item index, chat's seed + turn) wrap modulo 2^32 - 1 so they never land on it.
"""

from __future__ import annotations

from .errors import InputError

MAX_SEED = 2**32 - 2  # 2^32 - 1 is LLAMA_DEFAULT_SEED: random
SEED_RANGE = f"0..{MAX_SEED}"


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` if it is a reproducible seed, else a one-line InputError naming the valid range."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        hint = " (4294967295 means 'random' to llama.cpp)" if seed == MAX_SEED + 1 else ""
        raise InputError(f"{name} must be an integer in {SEED_RANGE}{hint}, got {seed!r}")
    return seed


def derive_seed(base: int, n: int) -> int:
    """The seed ``n`` steps after ``base`` (item n, turn n), kept in 0..MAX_SEED."""
    return (int(base) + int(n)) % (MAX_SEED + 1)
