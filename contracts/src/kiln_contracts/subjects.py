"""Subjects and stream settings: the bus's layout, in one place.

Every build event lives on ``kiln.build.<build_id>.<kind>`` in one JetStream stream, so a build's
whole history is one subject filter and each service's durable consumer filters the kinds it handles.
"""

from __future__ import annotations

from typing import Final

from .messages import Envelope

STREAM: Final = "KILN"
STREAM_SUBJECTS: Final = ("kiln.build.>", "kiln.schedule.>")
DLQ_STREAM: Final = "KILN_DLQ"
DLQ_SUBJECTS: Final = ("kiln.dlq.>",)

# How long the server remembers a Nats-Msg-Id to drop duplicate publishes.
DUPLICATE_WINDOW_S: Final = 600.0
# Largest message accepted on the stream (tool output is truncated well below this).
MAX_MSG_BYTES: Final = 1024 * 1024
# How long a build's history is kept: longer than a budget cycle (a month), which the budget
# service rebuilds its counters from when its Redis has lost them.
MAX_AGE_S: Final = 32 * 24 * 3600.0

# The budget gates (kiln_contracts.gates): a JetStream key-value bucket, one key per user, written
# only by the budget service. A gate is kept this long after its last write (a closed one never
# lasts longer than a budget cycle).
BUDGET_GATES: Final = "KILN_BUDGET_GATES"
BUDGET_GATES_MAX_AGE_S: Final = 40 * 24 * 3600.0
BUDGET_GATES_MAX_VALUE_BYTES: Final = 4096

# Request/reply (core NATS, not persisted): the file exchange between snapshot and sandbox, and
# a user's allowance, which the budget service answers the gateway.
SANDBOX_MANIFEST: Final = "kiln.rpc.sandbox.manifest"
SANDBOX_UPLOAD: Final = "kiln.rpc.sandbox.upload"
SNAPSHOT_RESTORE_PLAN: Final = "kiln.rpc.snapshot.restore_plan"
BUDGET_STATUS: Final = "kiln.rpc.budget.status"


def subject(build_id: str, kind: str) -> str:
    return f"kiln.build.{build_id}.{kind}"


def subject_of(msg: Envelope) -> str:
    return subject(msg.build_id, msg.kind)


def kind_filter(kind: str) -> str:
    """The filter that matches one kind of message of every build."""
    return f"kiln.build.*.{kind}"


def build_filter(build_id: str) -> str:
    """The filter that matches a build's whole history."""
    return f"kiln.build.{build_id}.>"


def schedule_subject(build_id: str, name: str) -> str:
    """Where a message schedule for a build lives (it fires onto a kiln.build.* subject)."""
    return f"kiln.schedule.{build_id}.{name}"


def dlq_subject(service: str, kind: str) -> str:
    return f"kiln.dlq.{service}.{kind}"


def parse(subj: str) -> tuple[str, str]:
    """(build_id, kind) of a build subject; ValueError for anything else."""
    parts = subj.split(".")
    if len(parts) != 4 or parts[0] != "kiln" or parts[1] != "build":
        raise ValueError(f"not a build subject: {subj!r}")
    return parts[2], parts[3]
