"""The agent loop: call the model, run the gateway's own tools, repeat until it answers or
calls a tool only the client can run. It reads the session but never writes it; the
caller commits what `run` returns, so a failure anywhere leaves the session untouched.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from laneway.agent import context
from laneway.agent.tools import BUILTIN_NAMES, BUILTIN_TOOLS, ToolContext, run_builtin
from laneway.config import AgentConfig
from laneway.errors import UpstreamError
from laneway.store.base import Memory, Message, SessionState
from laneway.tokens import estimate_text
from laneway.upstream.base import Upstream

#: Receives ("deltas", [text, ...]) per read from the model and ("tool_calls", [call, ...])
#: while a streamed turn runs. One event per read, not per piece: the turn logs and wakes
#: its followers once for all the pieces that came together.
Emit = Callable[[str, Any], None]

UNKNOWN_TOOL = "error: no tool of that name is available"
INTERRUPTED_TOOL = "The turn was interrupted before this tool call returned."


@dataclass(slots=True)
class TurnInput:
    systems: list[str]
    new_input: list[Message]
    client_tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class TurnOutput:
    messages: list[Message]  # appended to the transcript, the new input included
    reply: Message  # the final assistant message as the client sees it
    finish_reason: str
    usage: dict[str, int]
    status: str  # completed | awaiting_tools


class AgentLoop:
    def __init__(
        self, agent: AgentConfig, upstream: Upstream, state: SessionState, inp: TurnInput
    ) -> None:
        """Check the new input against the session (tool results must answer its open
        calls; abandoned calls get a synthetic result): `BadRequest` before any model call."""
        self.agent = agent
        self.upstream = upstream
        self.state = state
        self.inp = inp
        self.pending = context.pending_tool_calls(state.tail.messages)
        #: The turn's transcript so far and the reply being streamed: what an
        #: interrupted turn keeps (see `salvage`).
        self.messages: list[Message] = context.merge_input(self.pending, inp.new_input)
        self.partial: list[str] = []

    def salvage(self) -> list[Message]:
        """What an interrupted turn keeps: its input, the rounds it finished, the partial
        reply (marked), and a result for every tool call it left open, so the next model
        call still sees a valid conversation."""
        messages = list(self.messages)
        if self.partial:
            messages.append(
                {"role": "assistant", "content": "".join(self.partial), "interrupted": True}
            )
        return [*messages, *context.close_open_calls(messages, INTERRUPTED_TOOL)]

    async def run(
        self, memories: list[Memory], tools: ToolContext, emit: Emit | None = None
    ) -> TurnOutput:
        agent, state, inp, pending = self.agent, self.state, self.inp, self.pending
        turn = self.messages
        head = [context.instructions(agent.system_prompt, inp.systems)]
        recalled = context.memory_context(memories)
        if recalled is not None:
            head.append(recalled)
        client_names = {t["function"]["name"] for t in inp.client_tools or ()}
        offered = [*BUILTIN_TOOLS, *(inp.client_tools or ())] if self.upstream.supports_tools else []
        reserve = int(
            inp.params.get("max_completion_tokens")
            or inp.params.get("max_tokens")
            or agent.max_output_tokens
        )
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for iteration in range(agent.max_tool_iterations + 1):
            messages, prompt_tokens = context.build(
                head=head,
                tail=state.tail,
                turn_messages=turn,
                context_tokens=agent.context_tokens,
                reserve_tokens=reserve,
                must_start_by=min(pending.values()) if pending else None,
                encoded=self.upstream.takes_encoded,
            )
            body: dict[str, Any] = {**inp.params, "messages": messages}
            last = iteration == agent.max_tool_iterations
            if offered:
                body["tools"] = offered
                if last:
                    body["tool_choice"] = "none"
                elif iteration == 0 and inp.tool_choice is not None:
                    body["tool_choice"] = inp.tool_choice
            self.partial = []
            if emit is None:
                assistant, finish, used = await self._complete(body, prompt_tokens)
            else:
                assistant, finish, used = await self._stream(body, emit, prompt_tokens)
            self.partial = []
            for name in usage:
                usage[name] += used.get(name, 0)
            calls = assistant.get("tool_calls")
            if calls and last:
                del assistant["tool_calls"]
                calls = None
            turn.append(assistant)
            if not calls:
                return TurnOutput(turn, context.client_view(assistant, BUILTIN_NAMES), finish,
                                  usage, "completed")
            for_client = [c for c in calls if c["function"]["name"] in client_names
                          and c["function"]["name"] not in BUILTIN_NAMES]
            for call in calls:
                if call in for_client:
                    continue
                name = call["function"]["name"]
                result = (
                    await run_builtin(name, call["function"]["arguments"], tools)
                    if name in BUILTIN_NAMES
                    else UNKNOWN_TOOL
                )
                turn.append({"role": "tool", "tool_call_id": call["id"], "content": result})
            if for_client:
                if emit is not None:
                    emit("tool_calls", for_client)
                return TurnOutput(turn, context.client_view(assistant, BUILTIN_NAMES),
                                  "tool_calls", usage, "awaiting_tools")
        raise AssertionError("unreachable: the last iteration offers no tool")

    async def _complete(
        self, body: dict[str, Any], prompt_tokens: int
    ) -> tuple[Message, str, dict[str, int]]:
        response = await self.upstream.complete(body)
        choice = response["choices"][0]
        message = choice["message"]
        assistant = _assistant(message.get("content"), message.get("tool_calls"))
        usage = response.get("usage") or _estimate_usage(prompt_tokens, assistant)
        return assistant, choice.get("finish_reason") or "stop", usage

    async def _stream(
        self, body: dict[str, Any], emit: Emit, prompt_tokens: int
    ) -> tuple[Message, str, dict[str, int]]:
        parts = self.partial
        calls: dict[int, dict[str, Any]] = {}
        finish = "stop"
        usage: dict[str, int] | None = None
        async for batch in self.upstream.stream(body):
            texts = []
            for chunk in batch:
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices")
                if not choices:
                    continue
                choice = choices[0]
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if text:
                    texts.append(text)
                for piece in delta.get("tool_calls") or ():
                    _merge_call(calls, piece)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
            if texts:
                parts += texts
                emit("deltas", texts)
        content = "".join(parts) if parts else None
        assistant = _assistant(content, [calls[i] for i in sorted(calls)] or None)
        return assistant, finish, usage or _estimate_usage(prompt_tokens, assistant)


def _assistant(content: Any, tool_calls: Any) -> Message:
    if content is not None and not isinstance(content, str):
        raise UpstreamError("the model's reply content is not text")
    message: Message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [_tool_call(c) for c in tool_calls]
    return message


def _tool_call(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise UpstreamError("the model returned a malformed tool call")
    arguments = function.get("arguments")
    return {
        "id": call.get("id") or f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {
            "name": function["name"],
            "arguments": arguments if isinstance(arguments, str) else "{}",
        },
    }


def _merge_call(calls: dict[int, dict[str, Any]], piece: dict[str, Any]) -> None:
    call = calls.setdefault(
        piece.get("index", 0), {"id": None, "function": {"name": "", "arguments": ""}}
    )
    if piece.get("id"):
        call["id"] = piece["id"]
    function = piece.get("function") or {}
    call["function"]["name"] += function.get("name") or ""
    call["function"]["arguments"] += function.get("arguments") or ""


def _estimate_usage(prompt: int, assistant: Message) -> dict[str, int]:
    completion = estimate_text(assistant.get("content") or "")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
