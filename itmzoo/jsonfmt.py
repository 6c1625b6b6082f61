"""JSON as itmzoo writes it: floats rounded to 10 significant digits (``244.6``, not ``244.60000000000002``)."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

__all__ = ["dumps", "round_floats"]

SIGNIFICANT_DIGITS = 10


def round_floats(x: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """A copy of `x` (dicts, lists, tuples, scalars) with every finite float rounded to `digits` significant digits.

    Float sums such as ``80.0 + 95.0 + 69.6`` print as ``244.60000000000002``; rounding to 10 digits
    hides that noise and keeps every figure a metric or a loss can mean.
    """
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else x
    if isinstance(x, Mapping):
        return {k: round_floats(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [round_floats(v, digits) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # numpy / torch scalars
        return round_floats(x.item(), digits)
    return x


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` of `round_floats(obj)`."""
    return json.dumps(round_floats(obj), **kwargs)
