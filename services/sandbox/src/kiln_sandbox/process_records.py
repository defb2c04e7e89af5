"""A background process's record as the tools read and write it: its end as a script saw it,
and how it is described to the model."""

from __future__ import annotations

from dataclasses import replace

from .records import ProcessRecord, ProcessStatus

# what a process's end, as a script saw it, records: its status and why
ENDS: dict[str, tuple[ProcessStatus, str]] = {
    "exited": ("exited", "exited by itself"),
    "killed": ("killed", "ended without an exit status"),
    "gone": ("lost", "gone from its sandbox"),
}


def ended_as_seen(record: ProcessRecord, seen: str, rc: str) -> ProcessRecord:
    """``record`` ended as a script saw it (``seen``: exited, killed or gone; ``rc`` its exit
    status, or ``-``)."""
    status, reason = ENDS[seen]
    return replace(
        record,
        status=status,
        exit_code=int(rc) if rc.lstrip("-").isdigit() else None,
        reason=reason,
    )


def short(command: str, limit: int = 80) -> str:
    one = " ".join(command.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


def describe(r: ProcessRecord) -> str:
    what = f"{r.process_id} ({short(r.command)})"
    if r.live:
        ports = ", ".join(map(str, r.ports))
        return (
            f"{what}: running"
            + (f", pid {r.pid}" if r.pid else "")
            + (f", listening on port{'s' if len(r.ports) > 1 else ''} {ports}" if ports else "")
        )
    if r.status == "exited":
        return f"{what}: exited with code {r.exit_code}"
    return f"{what}: {r.status} ({r.reason})" if r.reason else f"{what}: {r.status}"
