"""Parsing of resource limits given in Docker's human notation."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_memory(value: int | str | None, name: str = "memory_limit") -> int | None:
    """Bytes from an int or a string like "512m", "4g", "1.5GiB"; None stays None (no limit).

    Raises:
        ValueError: the value is not a positive size, or smaller than Docker's 6 MiB minimum.
    """
    if value is None:
        return None
    if isinstance(value, int):
        size = value
    else:
        match = _MEMORY.match(value)
        if not match:
            raise ValueError(f"{name} {value!r} is not a size; use bytes or a string like '512m' or '4g'")
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 6 * 1024**2:
        raise ValueError(f"{name} {value!r} is below the minimum of 6 MiB")
    return size
