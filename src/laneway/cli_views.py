"""Rich renderings of what the operator endpoints return, for `cli_ops`: plain
functions from JSON to renderables, so the commands stay about talking to the server."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Column, Table
from rich.text import Text


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _short(ts: float | None) -> str:
    """The time alone for today, the date and minute otherwise: tables stay narrow."""
    if not ts:
        return "-"
    today = time.strftime("%Y-%m-%d") == time.strftime("%Y-%m-%d", time.localtime(ts))
    return time.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M", time.localtime(ts))


def _key_column(name: str) -> Column:
    """Keys and ids are for copying: never cut with an ellipsis, folded if need be."""
    return Column(name, overflow="fold", style="bold", min_width=12)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def sessions_table(rows: list[dict[str, Any]]) -> Table | Text:
    """Most recently updated first; the tenant column only when several tenants show."""
    if not rows:
        return Text("no sessions", style="dim")
    tenants = len({s["tenant"] for s in rows}) > 1
    table = Table(_key_column("session"), "agent", *(["tenant"] if tenants else []), "status",
                  "turns", "updated", title=f"{len(rows)} sessions", title_justify="left")
    for s in sorted(rows, key=lambda s: s.get("updated_at") or 0, reverse=True):
        status = Text(s["status"], style="green" if s["status"] == "running" else "dim")
        if s["queue_depth"]:
            status.append(f" +{s['queue_depth']} queued", style="bold yellow")
        table.add_row(s["key"], s["agent"], *([s["tenant"]] if tenants else []), status,
                      str(s["turns"]), _short(s["updated_at"]))
    return table


def session_view(session: dict[str, Any], turns: list[dict[str, Any]]) -> Group:
    """Header, transcript, memories, then the session's turns with their timings."""
    parts: list[RenderableType] = [
        Text.assemble(("session ", "dim"), (session["key"], "bold"),
                      (f"  agent {session['agent']} · tenant {session['tenant']}", "dim")),
        Text(f"status {session['status']} · queue depth {session['queue_depth']} · "
             f"{session['turns']} turns · created {_when(session['created_at'])} · "
             f"updated {_when(session['updated_at'])}"),
        "",
        Text(f"Transcript ({len(session['messages'])} messages)", style="bold underline"),
        transcript(session["messages"]),
        "",
    ]
    memories = session["memories"]
    parts.append(Text(f"Memories ({len(memories)})", style="bold underline"))
    if memories:
        table = Table("#", "memory", "pinned", "saved")
        for m in memories:
            table.add_row(str(m["id"]), m["text"], "yes" if m["pinned"] else "",
                          _when(m["created_at"]))
        parts.append(table)
    else:
        parts.append(Text("none", style="dim"))
    parts += ["", Text(f"Turns ({len(turns)})", style="bold underline")]
    if not turns:
        parts.append(Text("none", style="dim"))
        return Group(*parts)
    table = Table(_key_column("turn"), "arrived", "status", "queue wait", "duration")
    for t in turns:
        status = t["status"]
        style = "green" if status == "completed" else "yellow" if status in (
            "queued", "running", "awaiting_tools") else "red"
        started, finished = t.get("started_at"), t.get("finished_at")
        duration = _ms((finished - started) * 1000) if started and finished else "-"
        wait = t.get("queue_wait_ms")
        table.add_row(t["id"], _short(t["created_at"]), Text(status, style=style),
                      _ms(wait) if wait is not None else "-", duration)
    parts.append(table)
    return Group(*parts)


def transcript(messages: list[dict[str, Any]]) -> Table:
    """Role | content, with each tool call as `→ name(arguments)` and its result as
    `← name: result`, so a reader can follow the agent loop."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    names: dict[str, str] = {}
    styles = {"user": "cyan", "assistant": "green", "tool": "yellow", "system": "dim"}
    for m in messages:
        role = m.get("role", "?")
        body = Text()
        content = m.get("content")
        if isinstance(content, list):
            content = "\n".join(p.get("text", f"[{p.get('type')}]") for p in content)
        if role == "tool":
            name = names.get(m.get("tool_call_id", ""), m.get("tool_call_id", "?"))
            body.append(f"← {name}: ", style="yellow")
            body.append(_compact(content or ""))
        elif content:
            body.append(content)
        for call in m.get("tool_calls") or []:
            fn = call.get("function", {})
            names[call.get("id", "")] = fn.get("name", "?")
            if body:
                body.append("\n")
            body.append(f"→ {fn.get('name')}", style="yellow")
            body.append(f"({_compact(fn.get('arguments', ''))})")
        table.add_row(Text(role, style=styles.get(role, "")), body)
    return table


def _compact(raw: str) -> str:
    """JSON arguments or results on one readable line; anything else as it is."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value


def lanes_view(rows: list[dict[str, Any]], width: int) -> Table | Text:
    """The tenant column only when several tenants show, the turn id only when it fits."""
    waiting = sum(r["queue_depth"] for r in rows)
    stamp = time.strftime("%H:%M:%S")
    if not rows:
        return Text(f"no busy lanes · {stamp}", style="dim")
    tenants = len({r["tenant"] for r in rows}) > 1
    turn_ids = width >= 110
    table = Table(_key_column("session"), "agent", *(["tenant"] if tenants else []), "state",
                  "queue depth", "oldest wait", "running for", *(["turn"] if turn_ids else []),
                  title=f"{len(rows)} busy lanes, {waiting} waiting · {stamp}",
                  title_justify="left")
    for r in sorted(rows, key=lambda r: (-r["queue_depth"], r["session_key"])):
        age = r.get("turn_age_s") or 0.0
        depth = Text(str(r["queue_depth"]), style="bold yellow" if r["queue_depth"] else "")
        state = Text("running", style="green") if r["running"] else Text("handing over")
        table.add_row(r["session_key"], r["agent"], *([r["tenant"]] if tenants else []), state,
                      depth, _age(r["oldest_wait_s"]) if r.get("oldest_wait_s") else "-",
                      _age(age), *([r.get("turn_id") or "-"] if turn_ids else []))
    return table
