"""Client commands: `laneway sessions list|show|rm`, `laneway lanes`, `laneway chat`.

They talk to a running gateway over its HTTP API (`laneway.ops`), with the same API keys
as any client, so they work against a remote server as well as a local one. Failures are
one red line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Coroutine
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from laneway.cli_views import lanes_view, session_view, sessions_table
from laneway.ops import DEFAULT_URL, OpsClient, OpsError

T = TypeVar("T")

Url = Annotated[
    str, typer.Option("--url", envvar="LANEWAY_URL", help="The gateway's base URL.")
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LANEWAY_API_KEY", show_default=False,
                 help="API key (an admin key sees every tenant)."),
]
Agent = Annotated[str | None, typer.Option("--agent", help="Agent of the session.")]
Tenant = Annotated[str | None, typer.Option("--tenant", help="Tenant (admin keys only).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the server's JSON instead.")]


def register(app: typer.Typer) -> None:
    """Add the client commands to the `laneway` command."""
    sessions = typer.Typer(no_args_is_help=True, add_completion=False,
                           help="List, show and delete the sessions of a running gateway.")
    sessions.command("list")(sessions_list)
    sessions.command("show")(sessions_show)
    sessions.command("rm")(sessions_rm)
    app.add_typer(sessions, name="sessions")
    app.command("lanes")(lanes)
    app.command("chat")(chat)


def _out() -> Console:
    return Console(highlight=False)


def _fail(e: OpsError) -> NoReturn:
    Console(stderr=True).print(f"laneway: {e}", style="red", markup=False, soft_wrap=True)
    raise typer.Exit(1)


def _run(coro: Coroutine[Any, Any, T], runner: asyncio.Runner | None = None) -> T:
    """Run a command's client code; an `OpsError` becomes a message and exit code 1."""
    try:
        return runner.run(coro) if runner is not None else asyncio.run(coro)
    except OpsError as e:
        _fail(e)


# -- sessions ------------------------------------------------------------------------------


def sessions_list(
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    limit: Annotated[int, typer.Option(help="Sessions per page (1-200).")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Page after this cursor.")] = None,
    agent: Annotated[str | None, typer.Option(help="Only this agent's sessions.")] = None,
    tenant: Tenant = None,
    busy: Annotated[bool | None, typer.Option("--busy/--idle", show_default=False,
                                              help="Only busy (or idle) sessions.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Follow every page.")] = False,
    as_json: AsJson = False,
) -> None:
    """List sessions, newest first within a page; one page unless --all."""

    async def fetch() -> tuple[list[dict[str, Any]], str | None]:
        rows: list[dict[str, Any]] = []
        async with OpsClient(url, api_key) as client:
            page_cursor = cursor
            while True:
                page = await client.sessions(limit=limit, cursor=page_cursor, agent=agent,
                                             tenant=tenant, busy=busy)
                rows += page["data"]
                page_cursor = page.get("next_cursor")
                # the server filters --busy/--idle within a page: keep going to fill one
                short = busy is not None and len(rows) < limit
                if not ((every or short) and page_cursor):
                    return rows, page_cursor

    rows, next_cursor = _run(fetch())
    out = _out()
    if as_json:
        out.print_json(data={"data": rows, "next_cursor": next_cursor})
        return
    out.print(sessions_table(rows))
    if next_cursor:  # the same listing, from where this one stopped
        flags = [f"--limit {limit}" if limit != 20 else "", f"--agent {agent}" if agent else "",
                 f"--tenant {tenant}" if tenant else "",
                 "" if busy is None else "--busy" if busy else "--idle"]
        more = " ".join(f for f in [*flags, f"--cursor {next_cursor}"] if f)
        out.print(f"more: laneway sessions list {more}", style="dim", markup=False)


def sessions_show(
    key: Annotated[str, typer.Argument(help="The session key.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    agent: Agent = None,
    tenant: Tenant = None,
    as_json: AsJson = False,
) -> None:
    """A session: status, transcript (tool calls included), memories, turn timings."""

    async def fetch() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with OpsClient(url, api_key) as client:
            session = await client.session(key, agent=agent, tenant=tenant)
            turns = await client.turns(key, agent=session["agent"], tenant=session["tenant"])
            return session, turns

    session, turns = _run(fetch())
    out = _out()
    if as_json:
        out.print_json(data={**session, "turn_list": turns})
        return
    out.print(session_view(session, turns))


def sessions_rm(
    key: Annotated[str, typer.Argument(help="The session key.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    agent: Agent = None,
    tenant: Tenant = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete a session and everything it holds (waits for its running turn to end)."""
    if not yes:
        typer.confirm(f"Delete session {key!r}, its transcript and memories?", abort=True)

    async def delete() -> None:
        async with OpsClient(url, api_key) as client:
            await client.delete_session(key, agent=agent, tenant=tenant)

    _run(delete())
    _out().print(f"deleted session {key}", markup=False)


# -- lanes ---------------------------------------------------------------------------------


def lanes(
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.1)] = 1.0,
    count: Annotated[int | None, typer.Option(help="With --watch: stop after N refreshes.",
                                              min=1)] = None,
) -> None:
    """Busy lanes: which sessions run a turn, how many requests wait, for how long."""
    out = _out()
    if not watch:
        out.print(lanes_view(_run(_fetch_lanes(url, api_key)), out.width))
        return
    try:
        _run(_watch(out, url, api_key, interval, count))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends


async def _fetch_lanes(url: str, api_key: str | None) -> list[dict[str, Any]]:
    async with OpsClient(url, api_key, timeout_s=10) as client:
        return await client.lanes()


async def _watch(out: Console, url: str, api_key: str | None, interval: float,
                 count: int | None) -> None:
    """A live table on a terminal; one table per refresh when the output is a pipe or a
    file, like `top -b`. After the first success, a failure is shown and retried."""
    async with OpsClient(url, api_key, timeout_s=max(interval, 5)) as client:
        good: Table | Text = lanes_view(await client.lanes(), out.width)
        view: Table | Text | Group = good
        live = Live(view, console=out, auto_refresh=False) if out.is_terminal else None
        if live is None:
            out.print(view)
        else:
            live.start()
        try:
            shown = 1
            while count is None or shown < count:
                await asyncio.sleep(interval)
                try:
                    view = good = lanes_view(await client.lanes(), out.width)
                except OpsError as e:
                    if e.status == 401:
                        raise
                    view = Group(good, Text(f"{e} (retrying)", style="red"))
                shown += 1
                if live is None:
                    out.print(view)
                else:
                    live.update(view, refresh=True)
        finally:
            if live is not None:
                live.stop()


# -- chat ----------------------------------------------------------------------------------


def chat(
    key: Annotated[str | None, typer.Argument(help="Session key; a new session if omitted.",
                                              show_default=False)] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    model: Annotated[str, typer.Option(help="The agent to talk to.")] = "default",
) -> None:
    """Chat with a session in the terminal, replies streamed. /exit or Ctrl-D leaves."""
    with contextlib.suppress(ImportError):  # line editing and history for input()
        import readline  # noqa: F401
    out = _out()
    err = Console(stderr=True)
    with asyncio.Runner() as runner:
        client = OpsClient(url, api_key)
        runner.run(client.__aenter__())
        try:
            models = _run(client.models(), runner)
            if model.removeprefix("laneway/") not in models:
                err.print(f"laneway: no agent {model!r}; agents: {', '.join(models)}",
                          style="red", markup=False)
                raise typer.Exit(1)
            out.print(f"laneway chat · agent {model} · "
                      f"{'session ' + key if key else 'new session'} · /exit or Ctrl-D to leave",
                      style="dim", markup=False)
            while True:
                try:
                    line = input("you> ")
                except (EOFError, KeyboardInterrupt):
                    out.print()
                    return
                if line.strip() in ("/exit", "/quit"):
                    return
                if not line.strip():
                    continue
                try:
                    key = runner.run(_turn(out, client, line, key, model))
                except OpsError as e:
                    if e.status in (None, 401):  # gone or refused: no point going on
                        _fail(e)
                    err.print(f"error: {e}", style="red", markup=False, soft_wrap=True)
                except KeyboardInterrupt:
                    out.print("\n(stopped; the turn finishes on the server)", style="dim")
        finally:
            runner.run(client.__aexit__(None, None, None))


async def _turn(out: Console, client: OpsClient, text: str, key: str | None,
                model: str) -> str | None:
    """Stream one reply; returns the session key (a new session's comes back here)."""
    queued = -1
    started = False
    async for event in client.chat(text, session_key=key, model=model):
        if event.kind == "session":
            if key is None and event.value:
                out.print(f"(session {event.value})", style="dim", markup=False)
            key = event.value or key
        elif event.kind == "queued" and event.value != queued:
            queued = event.value
            out.print(f"(queued, position {queued})", style="dim")
        elif event.kind == "delta":
            if not started:
                out.print(Text(f"{model}> ", style="bold green"), end="")
                started = True
            out.print(event.value, end="", markup=False, soft_wrap=True)
        elif event.kind == "tool_calls":
            out.print(f"\n(tool calls: {json.dumps(event.value)})", style="yellow", markup=False)
        elif event.kind == "error":
            out.print()
            out.print(f"error: {event.value}", style="red", markup=False)
        elif event.kind == "finish":
            out.print()
            if event.value not in (None, "stop"):
                out.print(f"(finish: {event.value})", style="dim", markup=False)
    return key
