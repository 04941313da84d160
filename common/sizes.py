"""Human-readable byte sizes: '256K', '1M', '2G' (powers of 1024)."""

import re

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: "str | int") -> int:
    """Parse a size such as '1M' or 4096 into bytes; raise ValueError if malformed or negative."""
    if isinstance(text, bool):
        raise ValueError(f"Invalid size {text!r}.")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"Invalid size {text}: a size cannot be negative.")
        return text
    if not isinstance(text, str):
        raise ValueError(f"Invalid size {text!r}: expected a number with an optional K, M or G suffix.")
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(
            f"Invalid size {text!r}: expected a number with an optional K, M or G suffix (e.g. 256K, 1M, 2G)."
        )
    number, unit = match.groups()
    value = float(number) * _UNITS[unit.upper()]
    if value != int(value):
        raise ValueError(f"Invalid size {text!r}: it is not a whole number of bytes.")
    return int(value)


def format_size(num_bytes: float) -> str:
    """Format a byte count for people: '1.5 MiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
