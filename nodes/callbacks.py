"""The one way the file features call user code: whatever it raises is logged, never propagated."""

import logging
from typing import Any, Callable

log = logging.getLogger(__name__)


def call_user_cb(what: str, cb: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Call `cb(*args, **kwargs)`; log what it raises (naming `what`) and return whether it returned normally."""
    try:
        cb(*args, **kwargs)
        return True
    except Exception:
        log.exception("%s raised an exception (ignored)", what)
        return False
