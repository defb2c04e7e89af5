"""What a build is waiting on, projected from its events in stream order."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from kiln_contracts import (
    BuildCompleted,
    BuildFailed,
    BuildRequested,
    BuildResumed,
    BuildSleeping,
    SnapshotSaved,
    ToolCall,
    ToolResult,
)
from kiln_gateway import waiting

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def call(call_id: str, tool: str, t: float) -> ToolCall:
    return ToolCall(
        build_id="b", user_id="u", call_id=call_id, iteration=1, tool=tool, input={},
        occurred_at=at(t),
    )  # fmt: skip


def result(call_id: str, t: float) -> ToolResult:
    return ToolResult(
        build_id="b", user_id="u", call_id=call_id, iteration=1, output="ok", occurred_at=at(t)
    )


def run(*events: object) -> dict[str, object] | None:
    state = waiting.NOTHING
    for event in events:
        state = waiting.after(state, event)  # type: ignore[arg-type]
    return waiting.of(state, at(100))


def test_a_running_build_waits_on_the_sandbox_for_its_calls_then_on_the_agent() -> None:
    started = BuildRequested(build_id="b", user_id="u", tier="pro", idea_brief="x", occurred_at=T0)
    assert run(started) == {"service": "agent", "what": "the model", "since": T0, "seconds": 100}
    two = run(started, call("c1", "bash", 5), call("c2", "write_file", 6))
    assert two is not None and two["service"] == "sandbox" and two["since"] == at(5)
    assert two["what"] == "tool calls bash (c1), write_file (c2)"
    one = run(started, call("c1", "bash", 5), call("c2", "write_file", 6), result("c1", 7))
    assert one is not None and one["what"] == "tool call write_file (c2)" and one["since"] == at(5)
    # a duplicate result, then the last one: the agent's turn (the model call), since then
    back = run(
        started, call("c1", "bash", 5), call("c2", "bash", 6), result("c1", 7), result("c1", 7),
        result("c2", 9),
    )  # fmt: skip
    assert back == {"service": "agent", "what": "the model", "since": at(9), "seconds": 91.0}


def test_sleeping_waits_on_the_budget_and_a_resume_on_the_agent() -> None:
    asleep = BuildSleeping(
        build_id="b", user_id="u", reason="budget", wake_at=at(60), occurred_at=at(10)
    )
    found = run(asleep)
    assert found is not None and found["service"] == "budget" and "wakes at" in str(found["what"])
    woke = run(asleep, BuildResumed(build_id="b", user_id="u", reason="reset", occurred_at=at(61)))
    assert woke is not None and (woke["service"], woke["since"]) == ("agent", at(61))


def test_a_completed_build_waits_on_its_final_snapshot_a_failed_one_on_nothing() -> None:
    done = BuildCompleted(
        build_id="b", user_id="u", summary="s", iterations=3, cost_micro_usd=1, occurred_at=at(20)
    )
    final = SnapshotSaved(
        build_id="b", user_id="u", snapshot_id="s", iteration=3, reason="final", files=1,
        bytes_total=1, bytes_uploaded=1, occurred_at=at(21),
    )  # fmt: skip
    assert run(done) == {
        "service": "snapshot", "what": "the final snapshot", "since": at(20), "seconds": 80.0
    }  # fmt: skip
    assert run(done, final) is None
    assert run(call("c1", "bash", 1), final, done) is None  # stored before the end was seen
    failed = BuildFailed(
        build_id="b", user_id="u", reason="stalled", iterations=1, cost_micro_usd=1,
        occurred_at=at(5),
    )  # fmt: skip
    assert run(call("c1", "bash", 1), failed) is None


def test_the_row_names_a_bounded_number_of_calls() -> None:
    state = waiting.NOTHING
    for n in range(50):
        state = waiting.after(state, call(f"c{n}", "bash", n))
    assert len(json.loads(state)["calls"]) == waiting.MAX_CALLS
