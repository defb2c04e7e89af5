"""The scripted model answers the user's messages from the conversation alone, and does a step
the platform cut short again, once."""

from __future__ import annotations

from typing import Any

from kiln_devstack.model.script import next_turn
from kiln_devstack.model.textstats import SUMMARY


def user(*blocks: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def assistant(content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def said(words: str) -> dict[str, Any]:
    return {"type": "text", "text": words}


def answered(
    turn: list[dict[str, Any]], output: str = "ok", is_error: bool = False
) -> dict[str, Any]:
    return user(
        *[
            {
                "type": "tool_result",
                "tool_use_id": b["id"],
                "content": output,
                "is_error": is_error,
            }
            for b in turn
            if b["type"] == "tool_use"
        ]
    )


def calls(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in content if b["type"] == "tool_use"]


def test_a_request_is_done_first_then_the_work_goes_on_where_it_was() -> None:
    talk: list[dict[str, Any]] = [user(said("Build the app."))]
    plan, _ = next_turn(talk, "d1")
    talk += [assistant(plan), answered(plan)]
    # the user writes while the package is written: the message follows the results
    write, _ = next_turn(talk, "d2")
    results = answered(write)
    results["content"].append(said("add a file NOTES.md with hello there"))
    talk += [assistant(write), results]
    ask, stop = next_turn(talk, "d3")
    assert stop == "tool_use"
    [call] = calls(ask)
    assert call["input"] == {"path": "NOTES.md", "content": "hello there\n"}
    talk += [assistant(ask), answered(ask)]
    test, _ = next_turn(talk, "d4")  # back to the script: its tests run next
    assert [c["input"].get("command") for c in calls(test)] == [
        "python -m unittest discover -s tests -v"
    ]


def test_a_request_after_the_work_ended_is_done_then_summarised() -> None:
    talk: list[dict[str, Any]] = [
        user(said("Build the app.")),
        assistant([said(SUMMARY)]),
        user(
            said("(Kiln) This build ended (completed). It continues now."),
            said("please write TODO.md"),
            said("add a file a.txt with 'x'"),
        ),
    ]
    ask, _ = next_turn(talk, "e1")
    assert [(c["input"]["path"], c["input"]["content"]) for c in calls(ask)] == [
        ("TODO.md", "Written as the user asked: TODO.md\n"),
        ("a.txt", "x\n"),
    ]
    talk += [assistant(ask), answered(ask)]
    done, stop = next_turn(talk, "e2")
    assert stop == "end_turn" and done[0]["text"] == "Done: wrote TODO.md, a.txt as you asked."


def test_other_words_are_acknowledged() -> None:
    ended = [user(said("Build the app.")), assistant([said(SUMMARY)]), user(said("thanks!"))]
    content, stop = next_turn(ended, "f1")
    assert stop == "end_turn" and "thanks!" in content[0]["text"]
    working: list[dict[str, Any]] = [user(said("Build the app."))]
    plan, _ = next_turn(working, "f2")
    results = answered(plan)
    results["content"].append(said("looks good"))
    content, stop = next_turn([*working, assistant(plan), results], "f3")
    assert stop == "tool_use" and content[0]["text"] == "Noted your message: looks good"


LOST = "the sandbox went away while running this call (gone); a fresh one is used for the next call"
INTERRUPTED = "the previous run of this call was interrupted (the sandbox service restarted)"


def test_a_step_cut_short_is_done_again_once_and_a_failed_tool_stops_the_script() -> None:
    talk: list[dict[str, Any]] = [user(said("Build the app."))]
    plan, _ = next_turn(talk, "g1")
    talk += [assistant(plan), answered(plan)]
    write, _ = next_turn(talk, "g2")
    talk += [assistant(write), answered(write, LOST, is_error=True)]
    again, stop = next_turn(talk, "g3")  # the same files written again, under new ids
    assert stop == "tool_use"
    assert [c["input"] for c in calls(again)] == [c["input"] for c in calls(write)]
    assert {c["id"] for c in calls(again)}.isdisjoint(c["id"] for c in calls(write))
    talk += [assistant(again), answered(again, INTERRUPTED, is_error=True)]
    stopped, stop = next_turn(talk, "g4")  # cut short twice: it stops there
    assert stop == "end_turn" and "failed unexpectedly" in stopped[0]["text"]

    first: list[dict[str, Any]] = [user(said("Build the app."))]
    plan, _ = next_turn(first, "h1")
    first += [assistant(plan), answered(plan, LOST, is_error=True)]
    redo, _ = next_turn(first, "h2")  # the first step lost: the script starts again
    assert [c["name"] for c in calls(redo)] == [c["name"] for c in calls(plan)]

    failed: list[dict[str, Any]] = [user(said("Build the app."))]
    plan, _ = next_turn(failed, "i1")
    failed += [assistant(plan), answered(plan)]
    write, _ = next_turn(failed, "i2")
    failed += [assistant(write), answered(write, "permission denied", is_error=True)]
    ended, stop = next_turn(failed, "i3")  # a tool's own failure is not done again
    assert stop == "end_turn" and "permission denied" in ended[0]["text"]
