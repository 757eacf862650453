"""The compute dtype comes from the CPU's flags and a measurement; a block (``compute_dtype``) or the
environment can override it. Importing mm15 turns on PyTorch's huge-page allocation for large CPU
tensors unless told not to."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mm15 import hardware
from mm15.hardware import autocast, compute_dtype, fast_dtype


@pytest.mark.parametrize(
    ("flags", "measured_fast", "expected"),
    [
        # x86 without bf16 instructions: float32 whatever a timing says (under load the emulated bf16
        # product won a timing in 6 of 10 processes).
        (frozenset({"avx2", "avx512f", "avx512_vnni"}), True, torch.float32),
        (frozenset({"avx2", "avx512f", "avx512_bf16"}), True, torch.bfloat16),
        (frozenset({"avx2", "amx_bf16", "amx_tile"}), False, torch.float32),
        (None, True, torch.bfloat16),  # not x86 Linux: the measurement decides
        (None, False, torch.float32),
    ],
)
def test_fast_dtype_follows_the_cpu_flags_then_the_measurement(
    monkeypatch: pytest.MonkeyPatch, flags: frozenset[str] | None, measured_fast: bool, expected: torch.dtype
) -> None:
    monkeypatch.delenv("MM15_DTYPE", raising=False)
    monkeypatch.setattr(hardware, "x86_cpu_flags", lambda: flags)
    monkeypatch.setattr(hardware, "bf16_matmul_is_fast", lambda: measured_fast)
    assert fast_dtype() == expected


def test_this_machines_flags_are_read() -> None:
    flags = hardware.x86_cpu_flags()
    if Path("/proc/cpuinfo").is_file() and "flags" in Path("/proc/cpuinfo").read_text():
        assert flags is not None and "fpu" in flags
    if flags is not None and not flags & hardware.BF16_CPU_FLAGS:
        assert fast_dtype() == torch.float32 or os.environ.get("MM15_DTYPE") == "bfloat16"


@pytest.mark.parametrize(("value", "dtype"), [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, value: str, dtype: torch.dtype) -> None:
    monkeypatch.setenv("MM15_DTYPE", value)
    assert fast_dtype() == dtype
    with autocast() as chosen:
        assert chosen == dtype
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == dtype


def test_bad_override_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MM15_DTYPE", "float16")
    with pytest.raises(ValueError, match="MM15_DTYPE"):
        fast_dtype()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compute_dtype_block_overrides_environment_and_restores(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    monkeypatch.setenv("MM15_DTYPE", "bfloat16" if other == torch.bfloat16 else "float32")
    with compute_dtype(dtype):
        assert fast_dtype() == dtype
        with compute_dtype(other):  # the inner block wins
            assert fast_dtype() == other
        with autocast() as chosen:
            out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
        assert chosen == dtype and out.dtype == dtype
        with compute_dtype(None):  # None: back to the default (here the environment)
            assert fast_dtype() == other
    assert fast_dtype() == other


def test_compute_dtype_rejects_unsupported_dtypes() -> None:
    with pytest.raises(ValueError, match="compute dtype"), compute_dtype(torch.float16):
        pass


def test_compute_dtype_is_per_thread() -> None:
    """A block in one thread (a server request) leaves the others' dtype alone."""
    seen: list[torch.dtype] = []
    default = fast_dtype()
    other = torch.bfloat16 if default == torch.float32 else torch.float32
    with compute_dtype(other):
        thread = threading.Thread(target=lambda: seen.append(fast_dtype()))
        thread.start()
        thread.join()
    assert seen == [default]


def test_matmul_rate_is_the_best_of_its_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    timings = iter([0.5, 0.1, 0.3])
    monkeypatch.setattr(hardware, "_seconds", lambda a, b, repeats: next(timings))
    # The fastest trial (0.1 s for 4 products of 64-cubed matrices) sets the rate.
    assert hardware.matmul_rate(torch.float32, n=64, repeats=4, trials=3) == 2 * 64**3 * 4 / 0.1
    with pytest.raises(ValueError, match="trials must be >= 1, got 0"):
        hardware.matmul_rate(torch.float32, trials=0)


def _timed(monkeypatch: pytest.MonkeyPatch, seconds: list[float]) -> list[torch.dtype]:
    """Make ``_seconds`` return ``seconds`` in order; the returned list records each call's dtype."""
    timings, dtypes = iter(seconds), []

    def fake(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
        dtypes.append(a.dtype)
        return next(timings)

    monkeypatch.setattr(hardware, "_seconds", fake)
    return dtypes


def test_one_slow_float32_product_does_not_make_emulated_bf16_look_fast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # float32 interrupted once (5.0), bf16 emulated at 4x float32's speed: float32 stays the choice,
    # where comparing single timings (5.0 against 4.0) picked bf16.
    calls = _timed(monkeypatch, [5.0, 1.0, 1.0, 1.0, 1.0] + [4.0] * 5)
    assert hardware.bf16_matmul_is_fast.__wrapped__(size=8, trials=5) is False
    assert calls == [torch.float32] * 5 + [torch.bfloat16] * 5


def test_bf16_is_fast_at_its_first_product_no_slower_than_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    # bf16 slowed once (3.0), then 0.3 against float32's best 1.0: fast, and no more products are timed.
    calls = _timed(monkeypatch, [1.0, 2.0, 1.5, 3.0, 0.3, 0.2])
    assert hardware.bf16_matmul_is_fast.__wrapped__(size=8, trials=3) is True
    assert calls == [torch.float32] * 3 + [torch.bfloat16] * 2
    with pytest.raises(ValueError, match="trials must be >= 1, got 0"):
        hardware.bf16_matmul_is_fast.__wrapped__(trials=0)


HUGE_PAGE_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# A child process that imports mm15, touches a 16 MB tensor and prints its env value and the kB of
# anonymous memory the kernel backs with huge pages.
HUGE_PAGE_PROBE = """
import os, re, mm15, torch
x = torch.ones(16 << 20, dtype=torch.uint8)
rollup = open("/proc/self/smaps_rollup").read()
print(os.environ["THP_MEM_ALLOC_ENABLE"], re.search(r"AnonHugePages:\\s+(\\d+)", rollup).group(1))
"""


def _huge_page_probe(setting: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    out = subprocess.run([sys.executable, "-c", HUGE_PAGE_PROBE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    value, kilobytes = out.stdout.split()
    return value, int(kilobytes)


@pytest.mark.skipif(
    not HUGE_PAGE_MODE.exists() or "[madvise]" not in HUGE_PAGE_MODE.read_text(),
    reason="needs Linux with transparent huge pages in madvise mode (only advised memory gets them)",
)
def test_import_turns_on_huge_pages_unless_the_environment_says_no() -> None:
    value, kilobytes = _huge_page_probe(None)
    assert value == "1"
    assert kilobytes >= 2048  # at least one 2 MB page behind the 16 MB tensor
    value, kilobytes = _huge_page_probe("0")
    assert (value, kilobytes) == ("0", 0)


def test_measuring_the_machine_leaves_the_global_random_state_alone() -> None:
    """A resumed run restores torch's RNG from its checkpoint and then measures the MFU denominator:
    drawing the operands from the global generator shifted every random draw after it (MoE router
    jitter gave other losses than the uninterrupted run)."""
    from mm15.hardware import bf16_matmul_is_fast, matmul_rate

    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    matmul_rate(torch.float32, n=64, repeats=1, trials=1)
    bf16_matmul_is_fast.__wrapped__(size=32, trials=1)
    assert torch.equal(torch.rand(4), expected)
