"""Value checks shared by the config dataclasses: unknown keys, finite numbers, seeds, integers.
Each failure is a ConfigError naming the value, the rule and a fix."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from .errors import ConfigError


def _check_keys(cls: type, d: dict[str, Any], what: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {what} keys {unknown}; allowed: {sorted(known)}")


MAX_SEED = 2**32 - 1


def check_seed(name: str, value: Any) -> int:
    """A seed is an integer in [0, 2**32 - 1] (what every generator used here accepts)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} {value!r} is not an integer in [0, 2**32 - 1]; e.g. {name} 0")
    return value


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not a finite number; give e.g. {name}=0.5")
    return float(value)


def _check_int(name: str, value: Any, low: int, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} {value!r} must be an integer >= {low}; e.g. {name} {example}")
