"""The tools the gateway itself offers the model and runs without a round trip to the client.

Memories saved during a turn are held in `ToolContext.saved` and written with the turn in
one transaction, so a failed turn leaves no memory behind; `memory_search` sees them at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from laneway.store.base import MemoryScope, SessionState, Store
from laneway.store.sql import search_terms

MAX_MEMORY_CHARS = 2000

BUILTIN_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "memory_save",
            "description": "Remember a fact for later turns of this conversation "
            "(or of every conversation with this agent, if it shares memories).",
            "parameters": {
                "type": "object",
                "properties": {
                    "text": {"type": "string", "description": "The fact, self-contained."},
                    "pinned": {
                        "type": "boolean",
                        "description": "Always show this memory, not only when relevant.",
                    },
                },
                "required": ["text"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "memory_search",
            "description": "Search the saved memories by keywords.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "session_status",
            "description": "The conversation's session key, number of turns and queue.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]
BUILTIN_NAMES = frozenset(t["function"]["name"] for t in BUILTIN_TOOLS)


@dataclass(slots=True)
class ToolContext:
    store: Store
    #: None for a session-scoped agent whose session is not saved yet: nothing to search.
    scope: MemoryScope | None
    state: SessionState
    queue_depth: Callable[[], Awaitable[int]]
    saved: list[tuple[str, bool]] = field(default_factory=list)


async def run_builtin(name: str, arguments: str, ctx: ToolContext) -> str:
    """Run one built-in tool; a bad call gets an error text the model can read, not a 4xx."""
    try:
        args = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return "error: the arguments are not valid JSON"
    if not isinstance(args, dict):
        return "error: the arguments must be a JSON object"
    if name == "memory_save":
        return _memory_save(args, ctx)
    if name == "memory_search":
        return await _memory_search(args, ctx)
    return await _session_status(ctx)


def _memory_save(args: dict[str, Any], ctx: ToolContext) -> str:
    text = args.get("text")
    if not isinstance(text, str) or not text.strip():
        return "error: `text` must be a non-empty string"
    ctx.saved.append((text.strip()[:MAX_MEMORY_CHARS], bool(args.get("pinned", False))))
    return "saved"


async def _memory_search(args: dict[str, Any], ctx: ToolContext) -> str:
    query = args.get("query")
    if not isinstance(query, str):
        return "error: `query` must be a string"
    stored = [] if ctx.scope is None else await ctx.store.search_memories(ctx.scope, query, 10)
    found = [m.text for m in stored]
    terms = set(search_terms(query))
    found += [text for text, _ in ctx.saved if terms & set(search_terms(text))]
    if not found:
        return "no memories match"
    return "\n".join(f"- {text}" for text in found)


async def _session_status(ctx: ToolContext) -> str:
    state = ctx.state
    return orjson.dumps(
        {
            "session_key": state.ref.key,
            "agent": state.ref.agent,
            "turns": state.turns,
            "messages": state.next_seq,
            "created_at": state.created_at,
            "queued_requests": await ctx.queue_depth(),
        }
    ).decode()
