"""What the model sees in a turn: instructions, memories, the transcript cut to the budget,
the new input. Also the transcript rules the model APIs enforce: every assistant tool call
is answered by a tool message right after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from laneway.errors import BadRequest, ContextTooLong
from laneway.store.base import Memory, Message
from laneway.store.tail import Tail
from laneway.tokens import estimate_message

ABANDONED_RESULT = "The client did not return a result for this tool call."


def instructions(system_prompt: str, request_systems: Sequence[str]) -> Message:
    text = "\n\n".join([system_prompt, *request_systems]) if request_systems else system_prompt
    return {"role": "system", "content": text}


def memory_context(memories: Sequence[Memory]) -> Message | None:
    """Recalled memories as system-role context (never as user input)."""
    if not memories:
        return None
    lines = "\n".join(f"- {m.text}" for m in memories)
    return {
        "role": "system",
        "content": "Memories saved in earlier turns that may be relevant:\n" + lines,
    }


def pending_tool_calls(tail: Sequence[Message]) -> dict[str, int]:
    """Client tool calls of the last assistant message still waiting for a result:
    {call id: index in tail of the assistant message}."""
    answered: set[str] = set()
    for i in range(len(tail) - 1, -1, -1):
        message = tail[i]
        role = message.get("role")
        if role == "tool":
            answered.add(message.get("tool_call_id", ""))
        elif role == "assistant":
            calls = message.get("tool_calls") or ()
            return {c["id"]: i for c in calls if c["id"] not in answered}
        else:
            return {}
    return {}


def close_open_calls(messages: Sequence[Message], result: str) -> list[Message]:
    """Tool results for the calls of the last assistant message that have none."""
    answered: set[str] = set()
    for message in reversed(messages):
        role = message.get("role")
        if role == "tool":
            answered.add(message["tool_call_id"])
        elif role == "assistant":
            return [
                {"role": "tool", "tool_call_id": c["id"], "content": result}
                for c in message.get("tool_calls") or ()
                if c["id"] not in answered
            ]
        else:
            return []
    return []


def merge_input(pending: dict[str, int], new_input: Sequence[Message]) -> list[Message]:
    """The new input as it enters the transcript: the client's tool results first, a
    synthetic result for each pending call it did not answer, then its other messages."""
    results = [m for m in new_input if m["role"] == "tool"]
    rest = [m for m in new_input if m["role"] != "tool"]
    if results and new_input[: len(results)] != results:
        raise BadRequest(
            "tool messages must come before the other new messages", param="messages"
        )
    seen: set[str] = set()
    for message in results:
        call_id = message["tool_call_id"]
        if call_id not in pending:
            raise BadRequest(
                f"tool message answers {call_id!r}, which is not a pending tool call of "
                "this session",
                param="messages",
            )
        if call_id in seen:
            raise BadRequest(f"tool call {call_id!r} is answered twice", param="messages")
        seen.add(call_id)
    synthetic = [
        {"role": "tool", "tool_call_id": call_id, "content": ABANDONED_RESULT}
        for call_id in pending
        if call_id not in seen
    ]
    return [*results, *synthetic, *rest]


def build(
    *,
    head: Sequence[Message],
    tail: Tail,
    turn_messages: Sequence[Message],
    context_tokens: int,
    reserve_tokens: int,
    must_start_by: int | None,
    encoded: bool = False,
) -> tuple[list[Any], int]:
    """`head` (instructions and memories) + the windowed transcript + this turn so far, and
    the estimated prompt tokens. With `encoded`, the transcript part is pre-encoded JSON."""
    fixed = sum(map(estimate_message, head)) + sum(map(estimate_message, turn_messages))
    budget = context_tokens - reserve_tokens - fixed
    if budget < 0:
        raise ContextTooLong(
            f"the input needs about {fixed + reserve_tokens} tokens with the reply reserve; "
            f"this agent's context budget is {context_tokens}",
            param="messages",
        )
    cut = tail.cut(budget, must_start_by)
    window = tail.encoded[cut:] if encoded else tail.messages[cut:]
    return [*head, *window, *turn_messages], fixed + tail.tokens_from(cut)


def client_view(message: Message, builtin: frozenset[str]) -> dict[str, Any]:
    """The assistant message as the client sees it: without the gateway's own tool calls."""
    calls = [c for c in message.get("tool_calls") or () if c["function"]["name"] not in builtin]
    view: dict[str, Any] = {
        "role": "assistant",
        "content": message.get("content"),
        "refusal": None,
    }
    if calls:
        view["tool_calls"] = calls
    return view
