"""The compute dtype is measured, and the environment can override it."""

from __future__ import annotations

import pytest
import torch

from mm15.hardware import autocast, bf16_matmul_is_fast, fast_dtype


def test_fast_dtype_follows_the_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MM15_DTYPE", raising=False)
    expected = torch.bfloat16 if bf16_matmul_is_fast() else torch.float32
    assert fast_dtype() == expected


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
