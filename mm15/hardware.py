"""What this CPU is fast at: bf16 matmuls are 4x faster than fp32 on CPUs with bf16 units, and
about 100x slower on CPUs without them (torch then emulates bf16), so the compute dtype is measured,
never assumed.

``fast_dtype()`` is float32 on an x86 CPU whose flags show no bf16 instructions (AVX512-BF16, AMX-BF16:
torch emulates bf16 there); elsewhere bfloat16 when a small bf16 matmul beats float32, else float32;
``autocast()`` is the matching context manager (a no-op on float32 machines). Two overrides, the inner
one first: ``with compute_dtype(torch.float32):`` for a block of code (a recipe that trains in float32
is evaluated in float32 too), and ``MM15_DTYPE=float32`` or ``bfloat16`` in the environment.

The measurement looks at a matmul only. A whole model can disagree: on a CPU with AMX, the tiny preset
(128-wide decoder, 64-wide encoder) trains about 1.3x faster in float32, because under autocast every
small matmul pays for casts and the elementwise work dominates; SmolLM2-sized models are several times
faster in bf16. Recipes therefore name their dtype per stage (``autocast``), see docs/training.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import time
from collections.abc import Iterator

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Set by ``compute_dtype``; a context variable so that concurrent requests cannot see each other's.
_OVERRIDE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("mm15_dtype", default=None)


def _seconds(a: torch.Tensor, b: torch.Tensor, repeats: int = 3) -> float:
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return time.perf_counter() - start


def _operands(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random n x n matrices from a private generator: measuring must not move torch's global
    random state, which a resumed training run has just restored from its checkpoint."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(n, n, generator=generator).to(dtype) for _ in range(2))  # type: ignore[return-value]


def matmul_rate(dtype: torch.dtype, n: int = 1024, repeats: int = 3, trials: int = 5) -> float:
    """Measured FLOP/s of an ``n``-cubed matmul in ``dtype`` on this machine (the MFU denominator).

    The best of ``trials`` timings of ``repeats`` products: a 1024-cube bf16 product takes about a
    millisecond, and single timings on a 2-core machine differ by over 10% from one minute to the next
    (``benchmarks/matmul.py --trials 1``). Interference can only slow a trial down, so the fastest is
    the closest to what the machine can do, and MFU does not rise because a measurement was unlucky.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    a, b = _operands(n, dtype)
    return 2 * n**3 * repeats / min(_seconds(a, b, repeats) for _ in range(trials))


@functools.cache
def bf16_matmul_is_fast(size: int = 256, trials: int = 5) -> bool:
    """True when a ``size``-cubed bf16 matmul is at least as fast as float32 here.

    Each side is the best of ``trials`` single products, so one product slowed down by the other core
    cannot decide the answer: with one timing each, a float32 product caught by an interruption once
    made bf16 look faster on a CPU that emulates it (5x slower), and a whole benchmark ran in bf16.
    Interference only slows a product down, so bf16 is declared fast as soon as one of its products
    is no slower than float32's best. Costs about 2 ms with bf16 units or AVX-512, 0.2 s on AVX2 alone.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    a, b = _operands(size, torch.float32)
    fp32 = min(_seconds(a, b, repeats=1) for _ in range(trials))
    a, b = a.bfloat16(), b.bfloat16()
    return any(_seconds(a, b, repeats=1) <= fp32 for _ in range(trials))


BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # x86 instructions that compute in bf16


@functools.cache  # fast_dtype() runs per autocast block: read the file once
def x86_cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` on x86 Linux (a "flags" line, which other
    architectures do not have); None elsewhere (not known)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def bf16_is_emulated() -> bool:
    """True on an x86 CPU without bf16 instructions, where torch emulates bf16 (several times slower
    than float32). Read from the CPU's flags rather than timed: with the other core busy, float32's
    two-thread products slowed down more than the emulated ones, and a timing picked bf16 here in 6
    of 10 fresh processes (so two identical evaluations ran in different dtypes)."""
    flags = x86_cpu_flags()
    return flags is not None and not flags & BF16_CPU_FLAGS


def fast_dtype() -> torch.dtype:
    """The compute dtype for autocast on this machine (see the module docstring)."""
    chosen = _OVERRIDE.get()
    if chosen is not None:
        return chosen
    override = os.environ.get("MM15_DTYPE")
    if override:
        if override not in DTYPES:
            raise ValueError(f"MM15_DTYPE must be one of {sorted(DTYPES)}, got {override!r}")
        return DTYPES[override]
    if bf16_is_emulated():
        return torch.float32
    return torch.bfloat16 if bf16_matmul_is_fast() else torch.float32


@contextlib.contextmanager
def compute_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside the block ``fast_dtype()`` (and so ``autocast()``) gives ``dtype``; None keeps the default."""
    if dtype not in (None, *DTYPES.values()):
        raise ValueError(f"compute dtype must be one of {sorted(DTYPES)} or None, got {dtype}")
    token = _OVERRIDE.set(dtype)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None = None) -> Iterator[torch.dtype]:
    """CPU autocast to ``dtype`` (default ``fast_dtype()``); float32 means no autocast. Yields the dtype."""
    dtype = dtype or fast_dtype()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        yield dtype
