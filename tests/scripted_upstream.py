"""A scripted, strict, OpenAI-compatible Chat Completions server for end-to-end tests.

The gateway's e2e tests put this behind the gateway instead of a real model. Replies are
deterministic and steered by ``[directive]`` tokens in the last user message; conversations the
real API would refuse get the same 400; every call is recorded so tests can assert what the model
received and whether two calls for one conversation (its ``[conv=ID]`` token) ever overlapped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Self

import orjson
from aiohttp import web

_CONV_RE = re.compile(r"\[conv=([^\]]+)\]")
_DIRECTIVE_RE = re.compile(
    r"\[(conv|delay|chunk_delay|fail|reply|huge|call)=|\[(hang|broken_stream|bad_json)\]"
)
_ROLES = ("system", "developer", "user", "assistant", "tool")
_CALL_NAME_RE = re.compile(r"([^\s\]]+)\s*")
_DECODER = json.JSONDecoder()
Json = dict[str, Any]


@dataclass
class Call:
    """One chat-completions request as the model saw it; ``ended`` is None while in flight."""

    conv: str
    messages: list[Json]
    tools: list[str]
    stream: bool
    body: Json
    started: float
    ended: float | None = None
    status: int = 0


@dataclass
class _Script:
    """Directives found in the last user message."""

    delay: float = 0.0
    chunk_delay: float = 0.0
    fail: int | None = None
    hang: bool = False
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, JSON arguments)
    broken_stream: bool = False
    bad_json: bool = False
    reply: str | None = None
    huge: int | None = None


@dataclass
class _Exchange:
    """One request being answered, and what has been sent for it so far."""

    request: web.Request
    call: Call
    resp: web.StreamResponse | None = None
    status: int = 0


class _BadRequest(Exception):
    """Becomes an OpenAI-style 400 ``invalid_request_error``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def _require(ok: object, message: str, param: str | None = None, code: str | None = None) -> None:
    if not ok:
        raise _BadRequest(message, param, code)


def _error_body(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def _dig(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...``, or None where a level is missing or not an object."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _text(content: Any) -> str:
    """Text of a string content, or of the ``text`` parts of a content-part list."""
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(t for t in parts if isinstance(t, str))
    return content if isinstance(content, str) else ""


def _conv_of(messages: Any) -> str:
    for m in messages if isinstance(messages, list) else []:
        if isinstance(m, dict) and (found := _CONV_RE.search(_text(m.get("content")))):
            return found.group(1)
    return "none"


def _scan_call(text: str, pos: int, script: _Script) -> int:
    """Parse ``NAME {json}]`` or ``NAME]`` at ``pos``; returns the index after the ``]``."""
    head = _CALL_NAME_RE.match(text, pos)
    if head is None:
        raise _BadRequest("[call=] needs a tool name", "messages", "bad_directive")
    tool, pos = head.group(1), head.end()
    args: Any = {}
    if text.startswith("{", pos):
        try:  # raw_decode stops at the object's end, so brackets inside strings are fine
            args, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise _BadRequest(f"[call={tool}]: {exc}", "messages", "bad_directive") from exc
        pos += len(text[pos:]) - len(text[pos:].lstrip())
    _require(text.startswith("]", pos), f"[call={tool}] is not closed", "messages")
    script.calls.append((tool, orjson.dumps(args).decode()))
    return pos + 1


def _scan(text: str) -> tuple[str, _Script]:
    """Split a message text into (its text without directives, stripped; the directives)."""
    script, out, pos = _Script(), [], 0
    while (m := _DIRECTIVE_RE.search(text, pos)) is not None:
        out.append(text[pos : m.start()])
        name, pos = m.group(1), m.end()
        if name is None:
            setattr(script, m.group(2), True)
            continue
        if name == "call":
            pos = _scan_call(text, pos, script)
            continue
        end = text.find("]", pos)
        _require(end >= 0, f"unterminated [{name}=] directive", "messages", "bad_directive")
        value, pos = text[pos:end], end + 1
        try:
            if name in ("delay", "chunk_delay"):
                setattr(script, name, float(value))
            elif name in ("fail", "huge"):
                setattr(script, name, int(value))
            elif name == "reply":
                script.reply = value
        except ValueError as exc:
            raise _BadRequest(f"bad [{name}={value}]", "messages", "bad_directive") from exc
    out.append(text[pos:])
    return "".join(out).strip(), script


def _check_content(content: Any, p: str, required: bool) -> None:
    if content is None:
        _require(not required, f"Missing required parameter: '{p}.content'.", f"{p}.content")
        return
    parts = content if isinstance(content, list) and content else [None]
    _require(
        isinstance(content, str) or all(isinstance(x, dict) and "type" in x for x in parts),
        f"Invalid '{p}.content': expected a string or an array of content parts.",
        f"{p}.content",
        "invalid_type",
    )


def _tool_call_ids(calls: Any, p: str) -> set[str]:
    ids = []
    for k, c in enumerate(calls if isinstance(calls, list) and calls else [None]):
        ok = _dig(c, "type") == "function" and isinstance(_dig(c, "id"), str)
        ok = ok and isinstance(_dig(c, "function", "name"), str)
        ok = ok and isinstance(_dig(c, "function", "arguments"), str)
        _require(ok, f"Invalid '{p}.tool_calls[{k}]'.", f"{p}.tool_calls", "invalid_value")
        ids.append(c["id"])
    _require(len(set(ids)) == len(ids), f"Duplicate tool call id in '{p}'.", f"{p}.tool_calls")
    return set(ids)


def _check_answered(group: set[str], answered: set[str], i: int) -> None:
    missing = ", ".join(sorted(group - answered))
    _require(
        not missing,
        "An assistant message with 'tool_calls' must be followed by tool messages responding to "
        "each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        + missing,
        f"messages.[{i}].role",
    )


def _validate(body: Any) -> None:
    """Refuse what the real API refuses (the part of it that gateway bugs would trip)."""
    _require(isinstance(body, dict), "The request body must be a JSON object.")
    model, msgs = body.get("model"), body.get("messages")
    _require(isinstance(model, str) and model, "you must provide a model parameter", "model")
    _require(isinstance(msgs, list) and msgs, "'messages' must be a non-empty array.", "messages")
    group: set[str] = set()  # tool call ids of the assistant message being answered
    answered: set[str] = set()
    for i, m in enumerate(msgs):
        p, role = f"messages[{i}]", _dig(m, "role")
        _require(role in _ROLES, f"Invalid '{p}.role': {role!r}.", f"{p}.role", "invalid_value")
        if role == "tool":
            tcid = m.get("tool_call_id")
            _require(isinstance(tcid, str), f"Missing '{p}.tool_call_id'.", f"{p}.tool_call_id")
            _check_content(m.get("content"), p, required=True)
            _require(
                tcid in group,
                "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                f"message with 'tool_calls' (no pending call {tcid!r}).",
                f"{p}.role",
            )
            _require(tcid not in answered, f"Duplicate answer to {tcid!r}.", f"{p}.tool_call_id")
            answered.add(tcid)
            continue
        _check_answered(group, answered, i)
        calls = m.get("tool_calls") if role == "assistant" else None
        group, answered = (set() if calls is None else _tool_call_ids(calls, p)), set()
        _check_content(m.get("content"), p, required=calls is None)
    _check_answered(group, answered, len(msgs))
    tools = body.get("tools")
    _require(tools is None or (isinstance(tools, list) and tools), "Invalid 'tools'.", "tools")
    for k, t in enumerate(tools or []):
        ok = _dig(t, "type") == "function" and isinstance(_dig(t, "function", "name"), str)
        _require(ok and _dig(t, "function", "name"), f"Invalid 'tools[{k}]'.", f"tools[{k}]")
    n = body.get("n")
    _require(n is None or (n == 1 and not isinstance(n, bool)), "Only n=1 is supported.", "n")
    _require(body.get("stream") in (None, True, False), "'stream' must be a boolean.", "stream")
    _require(
        body.get("stream_options") is None or body.get("stream") is True,
        "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        "stream_options",
    )


def _pieces(s: str, n: int = 3) -> list[str]:
    size = max(1, -(-len(s) // n))
    return [s[i : i + size] for i in range(0, len(s), size)]


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class ScriptedUpstream:
    """The server, in a daemon thread with its own loop, so sync and async tests can share it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._lock = threading.Lock()  # guards the records below, read from test threads
        self._calls: list[Call] = []
        self._live: dict[str, int] = {}
        self._peak: dict[str, int] = {}
        self._disconnects = 0
        self._seq = 0  # never reset, so tool call ids stay unique across the server's life
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._handlers: set[asyncio.Task[Any]] = set()  # used on the server loop only
        self._closing = False
        self._error: Exception | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("ScriptedUpstream already started")
        ready, self._error = threading.Event(), None
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=30)
        self._thread = self._loop = self._stopping = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        with asyncio.Runner() as runner:  # cancels leftover tasks and closes the loop cleanly
            runner.run(self._serve(ready))

    async def _serve(self, ready: threading.Event) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        self._closing = False
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        # handler_cancellation: a client that goes away cancels its handler; that is how a
        # disconnect during [hang] or [delay] gets noticed.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        try:
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port).start()
            self.port = runner.addresses[0][1]
        except Exception as exc:  # noqa: BLE001 - start() re-raises it in the caller's thread
            self._error = exc
        ready.set()
        try:
            if self._error is None:
                await self._stopping.wait()
        finally:
            self._closing = True  # calls cut short by stop() are not client disconnects
            for task in self._handlers:
                task.cancel()
            await runner.cleanup()

    def calls(self, conv: str | None = None) -> list[Call]:
        with self._lock:
            return [dataclasses.replace(c) for c in self._calls if conv in (None, c.conv)]

    def max_concurrency(self, conv: str, *, abandoned: bool = True) -> int:
        """The most calls of `conv` in flight at once. With `abandoned=False`, calls whose
        client hung up are left out: a gateway that abandons a call (an interrupt) closes
        its connection, and cannot wait for the model to notice before the next turn's
        call, which may reach the model first."""
        with self._lock:
            if abandoned:
                return self._peak.get(conv, 0)
            kept = [c for c in self._calls
                    if c.conv == conv and (c.ended is None or c.status != 0)]
        edges = sorted([(c.started, 1) for c in kept]
                       + [(c.ended if c.ended is not None else math.inf, -1) for c in kept])
        live = peak = 0
        for _, step in edges:  # at a tie an end sorts first: back to back is not overlap
            live += step
            peak = max(peak, live)
        return peak

    def in_flight(self) -> int:
        with self._lock:
            return sum(self._live.values())

    def disconnects(self) -> int:
        with self._lock:
            return self._disconnects

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()
            self._peak.clear()
            self._disconnects = 0  # _live stays: calls still running will land there

    def _end(self, ex: _Exchange, disconnected: bool = False) -> None:
        """Land a call. Also called just before the last write, so that a client holding the
        whole response never sees its call in flight; later calls only update the status."""
        with self._lock:
            if ex.call.ended is None:
                ex.call.ended = time.monotonic()
                self._live[ex.call.conv] -= 1
            ex.call.status = 0 if disconnected else ex.status
            self._disconnects += disconnected

    def _next(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    async def _models(self, _request: web.Request) -> web.Response:
        data = [{"id": "scripted", "object": "model", "created": 0, "owned_by": "tests"}]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        try:
            body: Any = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        data = body if isinstance(body, dict) else {}
        msgs, tools = data.get("messages"), data.get("tools")
        names = [_dig(t, "function", "name") for t in tools] if isinstance(tools, list) else []
        call = Call(
            conv=_conv_of(msgs),
            messages=list(msgs) if isinstance(msgs, list) else [],
            tools=[name for name in names if isinstance(name, str)],
            stream=data.get("stream") is True,
            body=data,
            started=started,
        )
        with self._lock:
            self._calls.append(call)
            live = self._live[call.conv] = self._live.get(call.conv, 0) + 1
            self._peak[call.conv] = max(self._peak.get(call.conv, 0), live)
        ex, disconnected, task = _Exchange(request, call), False, asyncio.current_task()
        assert task is not None  # aiohttp runs every handler in a task
        self._handlers.add(task)
        try:
            await self._answer(ex, body)
        except asyncio.CancelledError:  # the client went away (handler_cancellation), or stop();
            disconnected = call.ended is None and not self._closing  # after our last write, a
            raise  # cancel is just the client hanging up
        except ConnectionError:  # a write found the client gone
            disconnected = True
        finally:
            self._handlers.discard(task)
            self._end(ex, disconnected)
        return ex.resp if ex.resp is not None else web.Response(status=499)

    async def _send(self, ex: _Exchange, status: int, data: bytes) -> None:
        ex.status = status
        ex.resp = web.Response(status=status, body=data, content_type="application/json")
        await ex.resp.prepare(ex.request)
        self._end(ex)
        await ex.resp.write_eof()  # here, not in aiohttp, so a failed write counts as a disconnect

    async def _answer(self, ex: _Exchange, body: Any) -> None:
        try:
            _validate(body)
            msgs: list[Json] = body["messages"]
            last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
            text, script = _scan(_text(msgs[last]["content"])) if last >= 0 else ("", _Script())
            content, tool_calls, finish = self._reply(body, msgs, last, text, script, ex.call.conv)
        except _BadRequest as e:
            err = _error_body(str(e), "invalid_request_error", e.param, e.code)
            return await self._send(ex, 400, err)
        if script.delay > 0:
            await asyncio.sleep(script.delay)
        if script.hang:
            await asyncio.get_running_loop().create_future()  # until the client goes away
        if script.fail is not None:
            kind = "server_error" if script.fail >= 500 else "invalid_request_error"
            err = _error_body(f"scripted failure {script.fail}", kind, None, None)
            return await self._send(ex, script.fail, err)
        out_text = " ".join([content or ""] + [c["function"]["arguments"] for c in tool_calls])
        prompt = sum(len(_text(m.get("content"))) for m in msgs) // 4 + 1
        words = len(out_text.split())
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": words,
            "total_tokens": prompt + words,
        }
        cid, model = f"chatcmpl-scripted{self._next()}", body["model"]
        base = {"id": cid, "created": int(time.time()), "model": model, "system_fingerprint": None}
        if body.get("stream") is True:
            opts = body.get("stream_options")
            with_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            deltas = _deltas(content, tool_calls)
            return await self._stream(
                ex, base, deltas, finish, usage if with_usage else None, script
            )
        message: Json = {"role": "assistant", "content": content, "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        out = orjson.dumps(
            {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
        )
        if script.bad_json:
            out = b'{"id": "chatcmpl-bad", not json at all'
        elif script.broken_stream:
            out = out[: len(out) // 2]
        await self._send(ex, 200, out)

    def _reply(
        self, body: Json, msgs: list[Json], last: int, text: str, script: _Script, conv: str
    ) -> tuple[str | None, list[Json], str]:
        """(content, tool_calls, finish_reason) that the script asks for."""
        results = [_text(m.get("content")).strip() for m in msgs[last + 1 :] if m["role"] == "tool"]
        if script.calls and not results:
            fns = [{"name": name, "arguments": args} for name, args in script.calls]
            calls = [
                {"id": f"call_{conv}_{self._next()}", "type": "function", "function": f}
                for f in fns
            ]
            return None, calls, "tool_calls"
        if script.huge is not None:
            content = "x" * script.huge
        elif script.reply is not None:
            content = script.reply
        else:
            seen = " | ".join(_scan(_text(m["content"]))[0] for m in msgs if m["role"] == "user")
            content = f"ECHO {text} :: SEEN {seen}"
            content += f" :: TOOLS {' | '.join(results)}" if results else ""
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and len(content.split()) > limit:
            return " ".join(content.split()[:limit]), [], "length"
        return content, [], "stop"

    async def _stream(
        self,
        ex: _Exchange,
        base: Json,
        deltas: list[Json],
        finish: str,
        usage: Json | None,
        script: _Script,
    ) -> None:
        ex.status, ex.resp = 200, web.StreamResponse(headers={"Cache-Control": "no-cache"})
        ex.resp.content_type = "text/event-stream"
        await ex.resp.prepare(ex.request)
        head = {**base, "object": "chat.completion.chunk"}
        if usage is not None:
            head["usage"] = None  # include_usage: null on every chunk but the extra last one

        def chunk(delta: Json, reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return _sse({**head, "choices": [choice]})

        if script.bad_json:
            await ex.resp.write(b"data: {not json\n\n")
        elif script.broken_stream:
            for delta in deltas[:2]:
                await ex.resp.write(chunk(delta))
            self._end(ex)
            if ex.request.transport is not None:
                ex.request.transport.close()  # no terminating chunk, no [DONE]
            return
        else:
            for i, out in enumerate([*map(chunk, deltas), chunk({}, finish)]):
                if i and script.chunk_delay > 0:
                    await asyncio.sleep(script.chunk_delay)
                await ex.resp.write(out)
            if usage is not None:
                await ex.resp.write(_sse({**head, "choices": [], "usage": usage}))
        self._end(ex)
        await ex.resp.write(b"data: [DONE]\n\n")
        await ex.resp.write_eof()


def _deltas(content: str | None, tool_calls: list[Json]) -> list[Json]:
    """Stream deltas the way OpenAI sends them: role first, then content or tool call pieces."""
    role = {"role": "assistant", "content": None if content is None else "", "refusal": None}
    deltas: list[Json] = [role, *({"content": s} for s in _pieces(content or ""))]
    for i, c in enumerate(tool_calls):
        fn = {"name": c["function"]["name"], "arguments": ""}
        start = {"index": i, "id": c["id"], "type": "function", "function": fn}
        deltas.append({"tool_calls": [start]})
        deltas += [
            {"tool_calls": [{"index": i, "function": {"arguments": a}}]}
            for a in _pieces(c["function"]["arguments"])
        ]
    return deltas
