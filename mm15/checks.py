"""Type checks shared by the typed configs: values read from YAML or JSON arrive as any type, and a
float where an int belongs fails much later with an unrelated error (``topk(): argument 'k'``)."""

from __future__ import annotations

import math
from numbers import Real


def is_int(value: object) -> bool:
    """An int and not a bool (``True`` is an int to Python, never a size, a count or an index here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite real number (int, float, NumPy's scalars), not a bool: NaN and infinities pass no range
    check written as ``a <= x`` consistently, so they are refused here."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
