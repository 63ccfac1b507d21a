"""Transcript rules the model APIs enforce, at the unit level: open tool calls get results,
abandoned client calls too, and the context window cuts only before a user message."""

from __future__ import annotations

import pytest

from laneway.agent import context
from laneway.agent.loop import INTERRUPTED_TOOL, AgentLoop, TurnInput
from laneway.config import AgentConfig
from laneway.errors import BadRequest, ContextTooLong
from laneway.store.base import SessionRef, SessionState
from laneway.store.tail import Tail

CALLS = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
         {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]


def _stored(*messages: dict[str, object], tokens: int = 10) -> Tail:
    return Tail([dict(m) for m in messages], [tokens] * len(messages))


def test_close_open_calls() -> None:
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": CALLS},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    assert context.close_open_calls(messages, "stop") == [
        {"role": "tool", "tool_call_id": "c2", "content": "stop"}
    ]
    assert context.close_open_calls(messages[:1], "stop") == []


def test_salvage_keeps_partial_and_closes_calls() -> None:
    state = SessionState(SessionRef("t", "a", "k"))
    no_model = None  # salvage never calls the model
    loop = AgentLoop(AgentConfig("a"), no_model, state,  # type: ignore[arg-type]
                     TurnInput(systems=[], new_input=[{"role": "user", "content": "go"}]))
    loop.messages.append({"role": "assistant", "content": None, "tool_calls": CALLS})
    saved = loop.salvage()
    assert [m["role"] for m in saved] == ["user", "assistant", "tool", "tool"]
    assert all(m["content"] == INTERRUPTED_TOOL for m in saved[2:])
    loop.messages = loop.messages[:1]
    loop.partial = ["Once upon", " a time"]
    assert loop.salvage()[-1] == {"role": "assistant", "content": "Once upon a time", "interrupted": True}


def test_merge_input_answers_abandoned_calls_and_checks_results() -> None:
    pending = {"c1": 1, "c2": 1}
    merged = context.merge_input(pending, [{"role": "tool", "tool_call_id": "c1", "content": "r"},
                                           {"role": "user", "content": "next"}])
    assert [m.get("tool_call_id") for m in merged] == ["c1", "c2", None]
    assert merged[1]["content"] == context.ABANDONED_RESULT
    with pytest.raises(BadRequest):
        context.merge_input(pending, [{"role": "tool", "tool_call_id": "zz", "content": "r"}])
    with pytest.raises(BadRequest):
        context.merge_input(pending, [{"role": "user", "content": "a"},
                                      {"role": "tool", "tool_call_id": "c1", "content": "r"}])


def test_window_cuts_before_a_user_message() -> None:
    tail = _stored(
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": None, "tool_calls": CALLS[:1]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "2"},
        {"role": "assistant", "content": "b"},
    )
    assert [m["content"] for m in tail.window(30)] == ["2", "b"]
    assert len(tail.window(60)) == 6
    assert tail.window(5) == []
    assert [m["content"] for m in tail.window(60, must_start_by=1)][0] == "1"
    with pytest.raises(ContextTooLong):
        tail.window(15, must_start_by=1)
    tail.trim(25)
    assert [m["content"] for m in tail.messages] == ["2", "b"] and tail.tokens == 20
