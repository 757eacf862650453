"""What this CPU is fast at: bf16 matmuls are 4x faster than fp32 on CPUs with bf16 units, and
about 100x slower on CPUs without them (torch then emulates bf16), so the compute dtype is measured,
never assumed.

``fast_dtype()`` is bfloat16 when a small bf16 matmul beats float32 on this machine, else float32;
``autocast()`` is the matching context manager (a no-op on float32 machines). ``MM15_DTYPE=float32``
or ``bfloat16`` in the environment overrides the measurement.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _seconds(a: torch.Tensor, b: torch.Tensor, repeats: int = 3) -> float:
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return time.perf_counter() - start


@functools.cache
def bf16_matmul_is_fast(size: int = 256) -> bool:
    """True when a ``size``-cubed bf16 matmul is at least as fast as float32 here (about 10 ms to test)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    fp32 = _seconds(a, b)
    bf16 = _seconds(a.bfloat16(), b.bfloat16())
    return bf16 <= fp32


def fast_dtype() -> torch.dtype:
    """The compute dtype for autocast on this machine (see the module docstring)."""
    override = os.environ.get("MM15_DTYPE")
    if override:
        if override not in DTYPES:
            raise ValueError(f"MM15_DTYPE must be one of {sorted(DTYPES)}, got {override!r}")
        return DTYPES[override]
    return torch.bfloat16 if bf16_matmul_is_fast() else torch.float32


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None = None) -> Iterator[torch.dtype]:
    """CPU autocast to ``dtype`` (default ``fast_dtype()``); float32 means no autocast. Yields the dtype."""
    dtype = dtype or fast_dtype()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        yield dtype
