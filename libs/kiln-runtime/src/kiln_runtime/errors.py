"""How a handler tells the bus what to do with a message it could not handle."""

from __future__ import annotations


class PermanentError(Exception):
    """The message can never be handled: it goes to the dead-letter subject with this reason."""


class RetryLater(Exception):
    """A transient condition: redeliver the message after ``delay_s`` seconds."""

    def __init__(self, reason: str, delay_s: float = 1.0) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


class Conflict(RetryLater):
    """Optimistic concurrency lost: another replica advanced the same build first; retry at once."""

    def __init__(self, reason: str = "version conflict") -> None:
        super().__init__(reason, delay_s=0.0)
