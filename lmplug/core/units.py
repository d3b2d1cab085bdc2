"""Parsing of human-friendly sizes (``8GiB``) and durations (``30s``)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: object) -> int:
    """Return a byte count from an int or a string such as ``"8GiB"`` or ``"512 MB"``."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '8GiB'")
    if isinstance(value, int):
        number, unit = float(value), ""
    elif isinstance(value, float):
        number, unit = value, ""
    elif isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        if match is None:
            raise ValueError(f"cannot parse size {value!r}; use a number with a unit like '8GiB'")
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise ValueError(f"a size must be an int or a string like '8GiB', not {type(value).__name__}")
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {unit!r} in {value!r}; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB")
    size = number * _SIZE_UNITS[unit]
    if size < 0 or size != int(size):
        raise ValueError(f"size {value!r} is not a whole, non-negative number of bytes")
    return int(size)


def parse_duration(value: object) -> float:
    """Return seconds from a number or a string such as ``"30s"``, ``"500ms"`` or ``"5m"``."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '30s'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _DURATION_UNITS:
            raise ValueError(f"cannot parse duration {value!r}; use seconds or a unit: ms, s, m, h")
        seconds = float(match.group(1)) * _DURATION_UNITS[unit]
    else:
        raise ValueError(f"a duration must be a number or a string like '30s', not {type(value).__name__}")
    if seconds < 0:
        raise ValueError(f"duration {value!r} is negative")
    return seconds


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""An ``int`` byte count that accepts unit strings in configuration."""

Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A ``float`` number of seconds that accepts unit strings in configuration."""
