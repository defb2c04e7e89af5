"""Where a fork starts (``kiln_gateway.forks.origin``), with fakes: the newest snapshot taken at the
iteration or before; a fork of a fork before its own fork point is a fork of its source; a
snapshot retention deleted, a rejected build and an iteration past the build's are refused; a fork is projected at its fork point."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kiln_contracts import BuildRequested, ForkOrigin
from kiln_contracts.manifest import Manifest
from kiln_gateway import forks
from kiln_gateway.model import Build, Projection
from kiln_gateway.ports import Checkpoint, StoredSnapshot
from kiln_gateway.projection import evolve

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def build(build_id: str, iteration: int, status: str = "completed", **fork: Any) -> Build:
    return Build(
        build_id=build_id, user_id="u1", tier="pro", idea_brief="x", understanding_qna=[],
        limits={}, created_at=T0, updated_at=T0,
        state=Projection(status=status, iteration=iteration), **fork,
    )  # fmt: skip


def manifest(build_id: str, snapshot_id: str, iteration: int, minutes: int = 0) -> Manifest:
    at = T0 + timedelta(minutes=minutes)
    return Manifest(
        snapshot_id=snapshot_id, build_id=build_id, user_id="u1", iteration=iteration,
        reason="files_changed", checkpoint_at=at, created_at=at, files=0, bytes_total=0,
        bytes_uploaded=0, entries=[],
    )  # fmt: skip


class Files:
    def __init__(self, manifests: dict[str, list[Manifest]], pruned: dict[str, int]) -> None:
        self.by_build, self.pruned_at = manifests, pruned

    async def manifest(self, build_id: str, snapshot_id: str) -> Manifest | None:
        return next(
            (m for m in self.by_build.get(build_id, []) if m.snapshot_id == snapshot_id), None
        )

    async def snapshots(self, build_id: str) -> list[StoredSnapshot]:
        return [StoredSnapshot(m, m.created_at) for m in self.by_build.get(build_id, [])]

    async def pruned(self, build_id: str) -> int | None:
        return self.pruned_at.get(build_id)


class Store:
    def __init__(self, *builds: Build) -> None:
        self.builds = {b.build_id: b for b in builds}

    async def get(self, build_id: str) -> Build | None:
        return self.builds.get(build_id)


SOURCE = build("src", 9)
FILES = Files(
    {
        "src": [
            manifest("src", "s2", 2),
            manifest("src", "s5", 5),
            manifest("src", "s5-later", 5, minutes=1),  # the same iteration, taken later
            manifest("src", "s8", 8),
        ],
        "fk": [manifest("fk", "fk-first", 6), manifest("fk", "fk-7", 7)],
    },
    {},
)


async def origin(b: Build, files: Files = FILES, **asked: Any) -> ForkOrigin:
    return await forks.origin(Store(SOURCE, b), files, b, **asked)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("iteration", "snapshot"),
    [(0, None), (1, None), (2, "s2"), (4, "s2"), (5, "s5-later"), (7, "s5-later"), (9, "s8")],
)
async def test_the_newest_snapshot_at_the_iteration_or_before(iteration: int, snapshot: str):
    got = await origin(SOURCE, iteration=iteration)
    assert got == ForkOrigin(build_id="src", iteration=iteration, snapshot_id=snapshot)


async def test_at_a_snapshot_its_iteration_and_unknown_ones_refused() -> None:
    assert (await origin(SOURCE, snapshot_id="s5")).iteration == 5
    with pytest.raises(forks.ForkRefused) as err:
        await origin(SOURCE, snapshot_id="nope")
    assert (err.value.status, err.value.kind) == (404, "unknown-snapshot")


async def test_a_fork_of_a_fork_before_its_fork_point_is_a_fork_of_its_source() -> None:
    fork = build("fk", 8, fork_of="src", fork_iteration=6, fork_snapshot_id="s5-later")
    assert await origin(fork, iteration=3) == ForkOrigin(
        build_id="src", iteration=3, snapshot_id="s2"
    )
    assert await origin(fork, iteration=6) == ForkOrigin(
        build_id="fk", iteration=6, snapshot_id="fk-first"
    )
    assert (await origin(fork, iteration=8)).snapshot_id == "fk-7"


async def test_refusals() -> None:
    cases = [
        (dict(b=SOURCE, iteration=10), 422, "iteration-out-of-range"),
        (dict(b=build("r", 0, status="rejected"), iteration=0), 409, "conflict"),
        (dict(b=build("w", 4, status="running"), iteration=4), 409, "iteration-in-progress"),
        (
            dict(b=SOURCE, iteration=4, files=Files(FILES.by_build, {"src": 3})),
            410,
            "snapshot-gone",
        ),
    ]
    for asked, status, kind in cases:
        with pytest.raises(forks.ForkRefused) as err:
            await origin(**asked)
        assert (err.value.status, err.value.kind) == (status, kind)
    running = build("w", 4, status="running")
    assert (await origin(running, iteration=3)).iteration == 3  # an earlier one: no wait
    # pruned up to 3, but the newest at 6 (iteration 5's) is kept: exact
    kept = Files(FILES.by_build, {"src": 3})
    assert (await origin(SOURCE, files=kept, iteration=6)).snapshot_id == "s5-later"


class Events:
    def __init__(self, *checkpoints: tuple[int, str]) -> None:
        self.items = [Checkpoint(seq=i + 1, iteration=it, snapshot_id=s) for i, (it, s) in
                      enumerate(checkpoints)]  # fmt: skip

    async def checkpoints(self, build_id: str) -> list[Checkpoint]:
        return list(self.items)


async def test_a_snapshot_asked_for_but_not_written_yet_is_waited_for_never_skipped() -> None:
    events = Events((2, "s2"), (5, "s5"), (5, "s5-later"), (6, "s6"), (8, "s8"), (9, "s9"))

    async def at(iteration: int) -> ForkOrigin:
        return await forks.origin(Store(SOURCE), FILES, SOURCE, iteration=iteration, events=events)  # type: ignore[arg-type]

    assert (await at(5)).snapshot_id == "s5-later"
    assert (await at(8)).snapshot_id == "s8"
    # iteration 6's checkpoint has no snapshot and a newer one exists: it was superseded
    with pytest.raises(forks.ForkRefused) as gone:
        await at(7)
    assert (gone.value.status, gone.value.kind) == (410, "snapshot-gone")
    # iteration 9's is not written yet: retry
    with pytest.raises(forks.ForkRefused) as pending:
        await at(9)
    assert (pending.value.status, pending.value.kind) == (503, "snapshot-pending")
    # ... and once it is, it is the one
    FILES.by_build["src"].append(manifest("src", "s9", 9))
    try:
        assert (await at(9)).snapshot_id == "s9"
    finally:
        FILES.by_build["src"].pop()


def test_a_fork_is_projected_at_the_iteration_it_was_forked_at() -> None:
    origin = ForkOrigin(build_id="src", iteration=4, snapshot_id="s2")
    forked = BuildRequested(build_id="fk", user_id="u1", idea_brief="x", fork=origin)
    state = evolve(Projection(), forked, 1)
    assert (state.status, state.iteration) == ("running", 4)
    plain = BuildRequested(build_id="b", user_id="u1", idea_brief="x")
    assert evolve(Projection(), plain, 1).iteration == 0
