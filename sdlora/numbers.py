"""Reading numbers that users type (weights, flags, config values)."""

from __future__ import annotations

import math


def is_number(text: str) -> bool:
    """Whether float() reads `text` (nan and inf included; check finiteness separately)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def finite_number(text: str) -> float | None:
    """float(text) when it is a finite number, else None."""
    return value if is_number(text) and math.isfinite(value := float(text)) else None
