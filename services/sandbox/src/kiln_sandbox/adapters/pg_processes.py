"""The background processes' table in Postgres (``sandbox.processes``)."""

from __future__ import annotations

import asyncpg

from kiln_runtime.db import waits_out_outages

from ..records import ProcessRecord

SCHEMA = "sandbox"


_PROCESS_COLUMNS = (
    "build_id, process_id, call_id, iteration, command, sandbox_id, status, pid, exit_code, "
    "reason, read_offset, reported_by, ports"
)


def _process(row: asyncpg.Record) -> ProcessRecord:
    return ProcessRecord(
        build_id=row["build_id"],
        process_id=row["process_id"],
        call_id=row["call_id"],
        iteration=row["iteration"],
        command=row["command"],
        sandbox_id=row["sandbox_id"],
        status=row["status"],
        pid=row["pid"],
        exit_code=row["exit_code"],
        reason=row["reason"],
        read_offset=int(row["read_offset"]),
        reported_by=row["reported_by"],
        ports=tuple(row["ports"] or ()),
    )


class PgProcesses:
    """The builds' background processes (table ``processes``). Its statements, most made while a
    tool runs, wait out a database outage (as ``PgReads``' do); ``to_report`` sent again after a
    commit whose answer was lost reports nothing new (the notes of that commit are lost)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @waits_out_outages
    async def register(
        self, build_id: str, call_id: str, iteration: int, command: str, sandbox_id: str
    ) -> tuple[ProcessRecord, bool]:
        while True:
            try:
                row = await self.pool.fetchrow(
                    "INSERT INTO processes (build_id, process_id, seq, call_id, iteration, "
                    "command, sandbox_id, status) "
                    "SELECT $1, 'bash_' || n, n, $2, $3, $4, $5, 'starting' FROM "
                    "(SELECT coalesce(max(seq), 0) + 1 AS n FROM processes WHERE build_id = $1) s "
                    f"ON CONFLICT (build_id, call_id) DO NOTHING RETURNING {_PROCESS_COLUMNS}",
                    build_id,
                    call_id,
                    iteration,
                    command,
                    sandbox_id,
                )
            except asyncpg.UniqueViolationError:
                continue  # another call of the build took that number at the same moment
            if row is not None:
                return _process(row), True
            found = await self._by_call(build_id, call_id)
            if found is not None:
                return found, False

    @waits_out_outages
    async def get(self, build_id: str, process_id: str) -> ProcessRecord | None:
        row = await self.pool.fetchrow(
            f"SELECT {_PROCESS_COLUMNS} FROM processes WHERE build_id = $1 AND process_id = $2",
            build_id,
            process_id,
        )
        return _process(row) if row is not None else None

    @waits_out_outages
    async def by_call(self, build_id: str, call_id: str) -> ProcessRecord | None:
        return await self._by_call(build_id, call_id)

    async def _by_call(self, build_id: str, call_id: str) -> ProcessRecord | None:
        row = await self.pool.fetchrow(
            f"SELECT {_PROCESS_COLUMNS} FROM processes WHERE build_id = $1 AND call_id = $2",
            build_id,
            call_id,
        )
        return _process(row) if row is not None else None

    @waits_out_outages
    async def all(self, build_id: str) -> list[ProcessRecord]:
        rows = await self.pool.fetch(
            f"SELECT {_PROCESS_COLUMNS} FROM processes WHERE build_id = $1 ORDER BY seq", build_id
        )
        return [_process(r) for r in rows]

    @waits_out_outages
    async def update(self, record: ProcessRecord) -> None:
        await self.pool.execute(
            "UPDATE processes SET status = $3, pid = $4, exit_code = $5, reason = $6, "
            "read_offset = $7, ports = $8, ended_at = CASE WHEN $3 IN ('starting', 'running') THEN NULL "
            "ELSE coalesce(ended_at, now()) END "
            "WHERE build_id = $1 AND process_id = $2",
            record.build_id,
            record.process_id,
            record.status,
            record.pid,
            record.exit_code,
            record.reason,
            record.read_offset,
            list(record.ports),
        )

    @waits_out_outages
    async def to_report(
        self, build_id: str, sandbox_id: str, call_id: str
    ) -> tuple[list[ProcessRecord], list[ProcessRecord]]:
        async with self.pool.acquire() as conn, conn.transaction():
            lost = await conn.fetch(
                "UPDATE processes SET status = 'lost', reason = 'its sandbox went away', "
                "ended_at = now() WHERE build_id = $1 AND status IN ('starting', 'running') "
                f"AND sandbox_id <> $2 RETURNING {_PROCESS_COLUMNS}",
                build_id,
                sandbox_id,
            )
            ended = await conn.fetch(
                "UPDATE processes SET reported_by = $2 WHERE build_id = $1 "
                "AND status IN ('stopped', 'lost') AND reported_by IS NULL "
                f"RETURNING {_PROCESS_COLUMNS}",
                build_id,
                call_id,
            )
        return [_process(r) for r in lost], sorted(
            (_process(r) for r in ended), key=lambda r: int(r.process_id.removeprefix("bash_"))
        )
