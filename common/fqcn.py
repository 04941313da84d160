"""Fully qualified cell names: dot-separated parts of [A-Za-z0-9_~-]."""

import re

_PART = re.compile(r"[A-Za-z0-9_~-]+")
MAX_FQCN_LENGTH = 255


def is_valid_fqcn(name: object) -> bool:
    """Tell whether `name` is a well-formed FQCN."""
    if not isinstance(name, str) or not name or len(name) > MAX_FQCN_LENGTH:
        return False
    return all(_PART.fullmatch(part) for part in name.split("."))


def validate_fqcn(name: object) -> str:
    """Return `name` if it is a well-formed FQCN, else raise ValueError."""
    if not is_valid_fqcn(name):
        raise ValueError(
            f"Invalid FQCN {name!r}: use dot-separated parts made of letters, digits, '_', '~' "
            f"or '-', with no empty part (e.g. 'site-1' or 'site-1.job7')."
        )
    return name  # type: ignore[return-value]
