"""Seeds derived from the run seed: one per process, one per generated image.

`derive_seed(seed, "train", method, rank)` is a pure function of its arguments (NumPy's
SeedSequence hashing), so a process or an image gets the same stream whatever else runs.
"""
from __future__ import annotations

import zlib

import numpy as np


def _word(key) -> int:
    if isinstance(key, (int, np.integer)):
        return int(key) & 0xFFFFFFFF
    return zlib.crc32(str(key).encode())


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed for (seed, *keys)."""
    words = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF] + [_word(k) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))
