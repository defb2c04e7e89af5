"""Kiln's wire formats: every message, subject and stream setting, the snapshot manifest and the
snapshot bucket's key layout."""

from . import bucket, subjects
from .gates import BudgetGate, gate_key
from .messages import *  # noqa: F403
from .messages import BY_KIND, MESSAGES, TERMINAL_KINDS, Envelope, budget_id, stable_id
from .rpc import *  # noqa: F403

__all__ = [
    "BY_KIND",
    "MESSAGES",
    "TERMINAL_KINDS",
    "BudgetGate",
    "Envelope",
    "bucket",
    "budget_id",
    "gate_key",
    "stable_id",
    "subjects",
]
