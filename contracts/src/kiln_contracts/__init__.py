"""Kiln's wire formats: every message, subject and stream setting."""

from . import subjects
from .gates import BudgetGate, gate_key
from .messages import *  # noqa: F403
from .messages import BY_KIND, MESSAGES, TERMINAL_KINDS, Envelope, stable_id
from .rpc import *  # noqa: F403

__all__ = [
    "BY_KIND",
    "MESSAGES",
    "TERMINAL_KINDS",
    "BudgetGate",
    "Envelope",
    "gate_key",
    "stable_id",
    "subjects",
]
