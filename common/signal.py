"""A thread-safe flag used to ask long operations to stop."""

import threading
from typing import Any


class Signal:
    """A one-shot trigger with an optional value; `reset()` re-arms it."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.value: Any = None

    def trigger(self, value: Any = None) -> None:
        """Set the signal, remembering `value`."""
        self.value = value
        self._event.set()

    @property
    def triggered(self) -> bool:
        """True once `trigger()` was called and until `reset()`."""
        return self._event.is_set()

    def reset(self) -> None:
        """Clear the signal and its value."""
        self.value = None
        self._event.clear()

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the trigger; return whether it fired."""
        return self._event.wait(timeout)
