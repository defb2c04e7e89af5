"""Reading a service's numbered migrations: their names, their order, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln_agent.adapters import postgres as agent_pg
from kiln_gateway.adapters import postgres as gateway_pg
from kiln_runtime.db import Migration, read_migrations
from kiln_sandbox.adapters import postgres as sandbox_pg
from kiln_webhooks.adapters import postgres as webhooks_pg


def write(directory: Path, **files: str) -> Path:
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


def test_migrations_are_read_in_the_order_of_their_numbers(tmp_path):
    write(
        tmp_path,
        **{
            "0002_add_x.sql": "ALTER TABLE t ADD COLUMN x text;",
            "0001_initial.sql": "CREATE TABLE t (id int);",
            "0010_tenth.sql": "SELECT 10;",
            **{f"000{n}_step_{n}.sql": f"SELECT {n};" for n in range(3, 10)},
            "README.md": "not a migration",
        },
    )
    found = read_migrations(tmp_path)
    assert [m.version for m in found] == list(range(1, 11))
    assert found[0] == Migration(1, "initial", "CREATE TABLE t (id int);")
    assert found[1] == Migration(2, "add_x", "ALTER TABLE t ADD COLUMN x text;")


@pytest.mark.parametrize(
    "names",
    [
        ["0001_initial.sql", "0003_skipped_two.sql"],  # a gap: a file lost, or misnumbered
        ["0002_no_first.sql"],
        ["0001_initial.sql", "0002_a.sql", "0002_b.sql"],  # two branches took the same number
        ["0001_Initial.sql"],
        ["1_initial.sql"],
        ["0001-initial.sql"],
    ],
)
def test_misnamed_or_misnumbered_migrations_are_refused(tmp_path, names):
    write(tmp_path, **dict.fromkeys(names, "SELECT 1;"))
    with pytest.raises(ValueError):
        read_migrations(tmp_path)


@pytest.mark.parametrize("adapter", [agent_pg, gateway_pg, sandbox_pg, webhooks_pg])
def test_each_service_ships_its_migrations_as_package_data(adapter):
    migrations = adapter.migrations()
    assert migrations[0].version == 1 and migrations[0].name == "initial"
    assert all(m.sql.strip() for m in migrations)
