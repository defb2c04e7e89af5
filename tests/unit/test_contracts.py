"""The wire formats: strict, frozen, enveloped, and their JSON Schema files up to date."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import ValidationError

from kiln_contracts import BY_KIND, MESSAGES, BuildRequested, ToolCall, stable_id, subjects
from kiln_contracts.schemas import SCHEMA_DIR, render


def test_schema_files_are_up_to_date():
    rendered = render()
    stale = [
        name
        for name, text in rendered.items()
        if not (SCHEMA_DIR / name).exists() or (SCHEMA_DIR / name).read_text() != text
    ]
    assert not stale, f"run `make schemas`: stale or missing {stale}"
    on_disk = {str(p.relative_to(SCHEMA_DIR)) for p in SCHEMA_DIR.rglob("*.json")}
    assert on_disk - set(rendered) <= {"asyncapi.json"}, "schema files without a message"


def test_every_message_has_a_unique_kind_and_the_envelope():
    assert len(BY_KIND) == len(MESSAGES)
    for model in MESSAGES:
        fields = set(model.model_fields)
        assert {"event_id", "build_id", "user_id", "occurred_at", "schema_version"} <= fields
        assert {"causation_id"} <= fields


def test_round_trip_and_strictness():
    msg = BuildRequested(build_id="b1", user_id="u1", idea_brief="a todo app")
    again = BuildRequested.model_validate_json(msg.model_dump_json())
    assert again == msg
    with pytest.raises(ValidationError):
        BuildRequested.model_validate({**json.loads(msg.model_dump_json()), "surprise": 1})
    with pytest.raises(ValidationError):
        BuildRequested.model_validate({**json.loads(msg.model_dump_json()), "schema_version": 2})
    with pytest.raises(ValidationError):
        msg.idea_brief = "changed"  # type: ignore[misc]


@pytest.mark.parametrize("bad", ["", "a.b", "a*", "a>", "a b", "x" * 65, ".", "-lead"])
def test_ids_that_would_break_subjects_are_refused(bad):
    with pytest.raises(ValidationError):
        BuildRequested(build_id=bad, user_id="u", idea_brief="x")


def test_caused_carries_build_user_and_causation():
    req = BuildRequested(build_id="b1", user_id="u1", idea_brief="x")
    call = req.caused(ToolCall, call_id="c1", iteration=1, tool="bash", input={"command": "ls"})
    assert (call.build_id, call.user_id, call.causation_id) == ("b1", "u1", req.event_id)
    assert subjects.subject_of(call) == "kiln.build.b1.tool_call"


def test_stable_ids_are_deterministic_and_distinct():
    assert stable_id("b", "tool_call", "c1") == stable_id("b", "tool_call", "c1")
    assert stable_id("b", "tool_call", "c1") != stable_id("b", "tool_result", "c1")
    assert isinstance(stable_id("x"), uuid.UUID)


def test_subject_parse():
    assert subjects.parse("kiln.build.b1.tool_call") == ("b1", "tool_call")
    with pytest.raises(ValueError):
        subjects.parse("kiln.dlq.agent.tool_call")


def test_asyncapi_document_is_up_to_date():
    from kiln_runtime.asyncapi import render as render_asyncapi

    on_disk = (SCHEMA_DIR / "asyncapi.json").read_text()
    assert on_disk == render_asyncapi(), "run `make schemas`: asyncapi.json is stale"
    doc = json.loads(on_disk)
    assert doc["asyncapi"].startswith("3.")
    assert "agent:tool_result" in json.dumps(doc["operations"])


def test_a_budget_gate_is_closed_until_a_time_and_opens_by_itself():
    from datetime import UTC, datetime, timedelta

    from kiln_contracts import BudgetGate

    with pytest.raises(ValidationError):
        BudgetGate(user_id="u1", state="closed")  # closed says until when
    reset = datetime(2025, 4, 1, tzinfo=UTC)
    gate = BudgetGate(
        user_id="u1",
        state="closed",
        until=reset,
        reason="daily allowance used up",
        spent_micro_usd=1_200,
        allowance_micro_usd=1_000,
    )
    assert gate.closed_at(reset - timedelta(seconds=1)) and not gate.closed_at(reset)
    assert not BudgetGate.opened("u1").closed_at(reset)
    assert BudgetGate.model_validate_json(gate.model_dump_json()) == gate
    refusal = gate.refusal()
    assert "spent 1200 of 1000 micro-USD" in refusal and "2025-04-01T00:00:00+00:00" in refusal
    assert "POST /v1/budget/top-up" in refusal


def test_a_top_up_is_on_its_users_budget_subject_with_a_stable_id():
    from kiln_contracts import TopUpRequested, budget_id

    command = TopUpRequested.of("alice", "t1", 5_000_000)
    assert command.event_id == TopUpRequested.of("alice", "t1", 1).event_id  # one top-up id
    assert command.event_id != TopUpRequested.of("bob", "t1", 5_000_000).event_id
    assert subjects.subject_of(command) == f"kiln.build.{budget_id('alice')}.top_up_requested"
    assert budget_id("alice").startswith("budget-") and len(budget_id("x" * 64)) == 39
    again = TopUpRequested.model_validate_json(command.model_dump_json())
    assert again == command
    with pytest.raises(ValidationError, match="budget_id"):
        TopUpRequested(build_id="b1", user_id="alice", topup_id="t1", amount_micro_usd=1)
    with pytest.raises(ValidationError):
        TopUpRequested.of("alice", "t1", 0)


def test_a_user_message_has_a_stable_id_per_message_and_a_number():
    from kiln_contracts import SendUserMessage

    msg = SendUserMessage.of("b1", "alice", "m1", 1, "please write NOTES.md")
    assert msg.event_id == SendUserMessage.of("b1", "alice", "m1", 1, "other").event_id
    assert msg.event_id != SendUserMessage.of("b1", "alice", "m2", 2, "x").event_id
    assert subjects.subject_of(msg) == "kiln.build.b1.send_user_message"
    assert SendUserMessage.model_validate_json(msg.model_dump_json()) == msg
    for bad in ({"seq": 0}, {"text": ""}, {"message_id": "a.b"}):
        with pytest.raises(ValidationError):
            SendUserMessage(**{**msg.model_dump(), **bad})


def test_terminal_events_say_which_run_they_end():
    from kiln_contracts import BuildCompleted, BuildContinued

    done = BuildCompleted(build_id="b1", user_id="u", summary="s", iterations=3, cost_micro_usd=1)
    assert done.continuation == 0  # the first run; the field may be absent on the wire
    assert BuildCompleted.model_validate({**done.model_dump(), "continuation": 2}).continuation == 2
    with pytest.raises(ValidationError):
        BuildContinued(
            build_id="b1", user_id="u", continuation=0, after="completed", message_id="m",
            iterations=3, cost_micro_usd=1,
        )  # fmt: skip
