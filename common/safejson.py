"""Bounded JSON decoding for everything that arrives from the network.

`json.loads` alone is not safe on a peer's bytes: 5,000 nested brackets raise
RecursionError, a 5,000-digit integer raises ValueError (and costs quadratic time), and a
lone surrogate escape yields a `str` that cannot be encoded again. The flow here:

1. refuse more than `max_bytes` before looking at the data;
2. decode strict UTF-8;
3. measure the nesting depth with one flat, linear scan (no recursion) over quotes,
   escapes and brackets, skipped when the text holds too few brackets to be deep;
4. parse with `json.loads`, whose hooks refuse integers longer than `max_int_digits`,
   over-long or non-finite floats and the NaN/Infinity constants;
5. refuse lone surrogates (only looked for when the text holds a `\\ud` escape).

Every failure, whatever its cause, becomes a single `JsonLimitError` (a ValueError), so a
receive loop catches one exception type.
"""

import functools
import json
import math
import re
from typing import Any, Callable

DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_INT_DIGITS = 64
_MAX_FLOAT_CHARS = 400

_TOKEN = re.compile(r'\\.|["\[\]{}]', re.DOTALL)  # an escape pair, a quote or a bracket
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JsonLimitError(ValueError):
    """The bytes are not JSON within the limits."""


def _int_parser(max_digits: int) -> Callable[[str], int]:
    def parse_int(text: str) -> int:
        digits = len(text) - text.startswith("-")
        if digits > max_digits:
            raise JsonLimitError(f"integer of {digits} digits exceeds the {max_digits}-digit limit")
        return int(text)
    return parse_int


def _parse_float(text: str) -> float:
    if len(text) > _MAX_FLOAT_CHARS:
        raise JsonLimitError(f"number of {len(text)} characters is too long")
    value = float(text)
    if not math.isfinite(value):
        raise JsonLimitError("number is out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise JsonLimitError(f"{name} is not allowed")


@functools.cache
def _decoder(max_int_digits: int) -> json.JSONDecoder:
    """The decoder with the hooks above (json.loads with hooks would build one per call; it keeps no state)."""
    return json.JSONDecoder(parse_int=_int_parser(max_int_digits), parse_float=_parse_float,
                            parse_constant=_parse_constant)


def nests_deeper_than(text: str, limit: int) -> bool:
    """Tell whether JSON `text` nests brackets deeper than `limit`, in one flat, linear scan."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = False
    for match in _TOKEN.finditer(text):
        token = match.group()
        if in_string:
            in_string = token != '"'
        elif token == '"':
            in_string = True
        elif token in ("[", "{"):
            depth += 1
            if depth > limit:
                return True
        elif token in ("]", "}"):
            depth -= 1
    return False


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def decode(data: "bytes | bytearray | memoryview", max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH,
           max_int_digits: int = DEFAULT_MAX_INT_DIGITS) -> Any:
    """Decode JSON from a peer within the limits; raise JsonLimitError for anything else."""
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise JsonLimitError(f"JSON of {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise JsonLimitError("JSON is not valid UTF-8") from None
    if nests_deeper_than(text, max_depth):
        raise JsonLimitError(f"JSON nests deeper than {max_depth} levels")
    try:
        value = _decoder(max_int_digits).decode(text)
    except JsonLimitError:
        raise
    except (ValueError, RecursionError, MemoryError, TypeError) as exc:
        raise JsonLimitError(f"malformed JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise JsonLimitError("JSON holds a lone surrogate escape")
    return value
