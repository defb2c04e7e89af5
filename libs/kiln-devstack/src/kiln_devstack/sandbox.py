"""A stand-in for tests and benchmarks: ``MemoryRegistry``, the sandbox registry in memory, with
the Postgres one's semantics. (The E2B adapter is tested through the real ``e2b`` SDK against
``kiln_devstack.e2b_server``.)
"""

from __future__ import annotations

from dataclasses import replace

from kiln_sandbox.records import SandboxRecord

HOME = "/home/user"


class MemoryRegistry:
    """Which sandbox belongs to which build, in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, SandboxRecord] = {}

    async def get(self, build_id: str) -> SandboxRecord | None:
        return self.rows.get(build_id)

    async def put(self, record: SandboxRecord) -> None:
        held = self.rows.get(record.build_id)
        if held is not None and held.has_processes:
            record = replace(record, has_processes=True)
        self.rows[record.build_id] = record

    async def mark_processes(self, build_id: str) -> None:
        if (held := self.rows.get(build_id)) is not None:
            self.rows[build_id] = replace(held, has_processes=True)

    async def replace(self, record: SandboxRecord, expected: str | None) -> SandboxRecord:
        held = self.rows.get(record.build_id)
        if (held.sandbox_id if held is not None else None) != expected:
            assert held is not None
            return held
        if held is not None and held.has_processes:
            record = replace(record, has_processes=True)
        self.rows[record.build_id] = record
        return record
