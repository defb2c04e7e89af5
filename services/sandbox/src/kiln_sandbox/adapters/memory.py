"""The process table and the read log in this process's memory, with the Postgres ones'
semantics: for a service without Postgres (one replica; tests, benchmarks). Nothing survives a
restart."""

from __future__ import annotations

from dataclasses import replace

from ..records import LIVE, ProcessRecord


class MemoryProcesses:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], ProcessRecord] = {}

    async def register(
        self, build_id: str, call_id: str, iteration: int, command: str, sandbox_id: str
    ) -> tuple[ProcessRecord, bool]:
        if (found := await self.by_call(build_id, call_id)) is not None:
            return found, False
        n = 1 + sum(1 for b, _ in self.rows if b == build_id)
        record = ProcessRecord(
            build_id, f"bash_{n}", call_id, iteration, command, sandbox_id, "starting"
        )
        self.rows[(build_id, record.process_id)] = record
        return record, True

    async def get(self, build_id: str, process_id: str) -> ProcessRecord | None:
        return self.rows.get((build_id, process_id))

    async def by_call(self, build_id: str, call_id: str) -> ProcessRecord | None:
        return next(
            (r for (b, _), r in self.rows.items() if b == build_id and r.call_id == call_id), None
        )

    async def all(self, build_id: str) -> list[ProcessRecord]:
        found = [r for (b, _), r in self.rows.items() if b == build_id]
        return sorted(found, key=lambda r: int(r.process_id.removeprefix("bash_")))

    async def update(self, record: ProcessRecord) -> None:
        held = self.rows[(record.build_id, record.process_id)]
        self.rows[(record.build_id, record.process_id)] = replace(
            held,
            status=record.status,
            pid=record.pid,
            exit_code=record.exit_code,
            reason=record.reason,
            read_offset=record.read_offset,
            ports=record.ports,
        )

    async def to_report(
        self, build_id: str, sandbox_id: str, call_id: str
    ) -> tuple[list[ProcessRecord], list[ProcessRecord]]:
        lost: list[ProcessRecord] = []
        for r in await self.all(build_id):
            if r.status in LIVE and r.sandbox_id != sandbox_id:
                new = replace(r, status="lost", reason="its sandbox went away")
                self.rows[(build_id, r.process_id)] = new
                lost.append(new)
        ended: list[ProcessRecord] = []
        for r in await self.all(build_id):
            if r.status in ("stopped", "lost") and r.reported_by is None:
                new = replace(r, reported_by=call_id)
                self.rows[(build_id, r.process_id)] = new
                ended.append(new)
        return lost, ended


class MemoryReads:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], str] = {}

    async def saw(self, build_id: str, path: str, sha256: str, call_id: str) -> None:
        self.rows[(build_id, path)] = sha256

    async def last_seen(self, build_id: str, path: str) -> str | None:
        return self.rows.get((build_id, path))
