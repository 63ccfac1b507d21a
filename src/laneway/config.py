"""Settings from flags, `LANEWAY_*` environment variables and a TOML file.

Precedence: a flag (or its environment variable) beats the config file, which beats the
default. Agents are `[agents.NAME]` tables in the file; each inherits the global values it
does not set, so one flag such as `--context-tokens` changes every agent at once.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

POLICIES = ("enqueue", "reject", "interrupt", "collect")
MEMORY_SCOPES = ("session", "agent")
ON_DISCONNECT = ("continue", "cancel")
DEFAULT_TENANT = "default"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class ConfigError(Exception):
    """A setting is missing or invalid; the CLI prints it and exits."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """One agent: the model behind it and how its sessions behave."""

    name: str
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    upstream: str | None = None
    upstream_model: str | None = None
    upstream_api_key: str | None = None
    context_tokens: int = 8192
    max_output_tokens: int = 1024
    memory_scope: str = "session"
    recall_limit: int = 5
    lane_policy: str = "enqueue"
    max_queue_depth: int = 16
    max_queue_wait_s: float = 300.0
    max_tool_iterations: int = 8
    on_disconnect: str = "continue"
    #: A turn running longer is stopped (504 turn_timeout) and its lane freed.
    max_turn_s: float = 600.0


# Settings every agent inherits from the top level unless its table sets them.
_INHERITED = (
    "upstream",
    "upstream_model",
    "upstream_api_key",
    "context_tokens",
    "lane_policy",
    "max_queue_depth",
    "max_queue_wait_s",
    "max_turn_s",
)


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8470
    data_dir: Path = field(default_factory=lambda: Path.home() / ".laneway")
    config: Path | None = None
    upstream: str | None = None
    upstream_model: str | None = None
    upstream_api_key: str | None = None
    store: str | None = None
    #: PostgreSQL: pooled connections per replica (turn writes have `WRITERS` more); None:
    #: the store's `POOL_SIZE` (6, whose comment says why).
    store_pool_size: int | None = None
    lanes: str = "local"
    #: Redis lanes: how long a holder's lease lasts without renewal (a crashed replica's
    #: lanes free themselves within it).
    lane_lease_s: float = 10.0
    api_keys: dict[str, str] = field(default_factory=dict)
    admin_keys: list[str] = field(default_factory=list)
    max_queue_depth: int = 16
    max_queue_wait_s: float = 300.0
    upstream_timeout_s: float = 120.0
    max_body_bytes: int = 4 * 1024 * 1024
    # Input limits: each a clear 400 when exceeded.
    max_messages: int = 2048
    max_message_chars: int = 1_000_000
    max_tools: int = 128
    max_tools_bytes: int = 256 * 1024
    max_tokens_cap: int = 65536
    #: A model reply larger than this fails the turn (502) instead of filling memory.
    max_reply_bytes: int = 8 * 1024 * 1024
    # Per tenant, per replica: waiting requests (429 tenant_queue_full) and requests a
    # minute (429 rate_limit_exceeded; 0 = no limit).
    max_queued_per_tenant: int = 1024
    rate_limit_per_minute: int = 0
    context_tokens: int = 8192
    lane_policy: str = "enqueue"
    max_turn_s: float = 600.0
    #: Turns running at once across all sessions (protects the upstream); 0 = no limit.
    max_concurrent_turns: int = 256
    #: How long an Idempotency-Key keeps answering with its first result.
    idempotency_ttl_s: float = 86400.0
    queue_keepalive_s: float = 15.0
    log_level: str = "info"
    agents: dict[str, AgentConfig] = field(default_factory=dict)

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{self.data_dir / 'laneway.db'}"

    def agent(self, model: str) -> AgentConfig | None:
        """The agent a request's `model` names: `NAME` or `laneway/NAME`."""
        name = model[8:] if model.startswith("laneway/") else model
        return self.agents.get(name)


def parse_api_keys(values: list[str]) -> dict[str, str]:
    """`KEY` (default tenant) or `TENANT=KEY` → {key: tenant}."""
    keys: dict[str, str] = {}
    for value in values:
        tenant, sep, key = value.partition("=")
        if not sep:
            tenant, key = DEFAULT_TENANT, value
        if not key or not tenant:
            raise ConfigError(f"invalid --api-key {value!r}: use KEY or TENANT=KEY")
        keys[key] = tenant
    return keys


def load(overrides: dict[str, Any]) -> Settings:
    """Build settings: defaults, then the TOML file, then the non-None overrides."""
    overrides = {k: v for k, v in overrides.items() if v is not None and v != []}
    settings = Settings()
    path = overrides.get("config")
    file_agents: dict[str, dict[str, Any]] = {}
    if path is not None:
        file_values = _read_toml(Path(path))
        file_agents = file_values.pop("agents", {})
        _apply(settings, file_values, source=str(path))
    _apply(settings, overrides, source="flags")
    settings.data_dir = Path(settings.data_dir).expanduser()
    settings.agents = _build_agents(settings, file_agents)
    validate(settings)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def _apply(settings: Settings, values: dict[str, Any], *, source: str) -> None:
    known = {f.name for f in fields(Settings)} - {"agents"}
    for raw_name, value in values.items():
        name = raw_name.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{source}: unknown setting {raw_name!r}")
        if name == "api_keys":
            value = _api_keys_value(value, source)
        elif name == "admin_keys" and isinstance(value, str):
            value = [value]
        setattr(settings, name, value)


def _api_keys_value(value: Any, source: str) -> dict[str, str]:
    if isinstance(value, dict):  # TOML: [api_keys] tenant = "key" or ["k1", "k2"]
        keys: dict[str, str] = {}
        for tenant, key_or_keys in value.items():
            for key in [key_or_keys] if isinstance(key_or_keys, str) else key_or_keys:
                keys[str(key)] = str(tenant)
        return keys
    if isinstance(value, list):
        return parse_api_keys([str(v) for v in value])
    raise ConfigError(f"{source}: api_keys must be a table or a list")


def _build_agents(settings: Settings, tables: dict[str, dict[str, Any]]) -> dict[str, AgentConfig]:
    inherited = {name: getattr(settings, name) for name in _INHERITED}
    known = {f.name for f in fields(AgentConfig)}
    agents: dict[str, AgentConfig] = {}
    for name, table in {"default": {}, **tables}.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[agents.{name}] must be a table")
        options = {k.replace("-", "_"): v for k, v in table.items()}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"[agents.{name}]: unknown settings {sorted(unknown)}")
        values = {**inherited, **{k: v for k, v in options.items() if v is not None}}
        agents[name] = AgentConfig(name=name, **values)
    return agents


def validate(settings: Settings) -> None:
    if not settings.api_keys and not _is_loopback(settings.host):
        raise ConfigError(
            f"refusing to listen on {settings.host} without an API key: "
            "pass --api-key KEY (or bind to 127.0.0.1)"
        )
    if not settings.lanes.startswith(("local", "redis://", "rediss://", "unix://")):
        raise ConfigError(f"--lanes must be 'local' or a redis:// URL, not {settings.lanes!r}")
    if not settings.store_url.startswith(("sqlite:", "postgresql:", "postgres:")):
        raise ConfigError("--store must be sqlite:///PATH or postgresql://...")
    for agent in settings.agents.values():
        if agent.lane_policy not in POLICIES:
            raise ConfigError(f"agent {agent.name}: lane_policy must be one of {POLICIES}")
        if agent.memory_scope not in MEMORY_SCOPES:
            raise ConfigError(f"agent {agent.name}: memory_scope must be one of {MEMORY_SCOPES}")
        if agent.context_tokens < 256:
            raise ConfigError(f"agent {agent.name}: context_tokens must be at least 256")
        if agent.max_queue_depth < 0 or agent.max_queue_wait_s <= 0 or agent.max_turn_s <= 0:
            raise ConfigError(f"agent {agent.name}: queue and turn limits must be positive")
        if agent.on_disconnect not in ON_DISCONNECT:
            raise ConfigError(f"agent {agent.name}: on_disconnect must be one of {ON_DISCONNECT}")
        if agent.upstream not in (None, "local") and not (
            agent.upstream.startswith(("http://", "https://")) and urlsplit(agent.upstream).hostname
        ):
            raise ConfigError(f"agent {agent.name}: upstream must be 'local' or an http(s):// URL")
    if settings.store_pool_size is not None and settings.store_pool_size < 1:
        raise ConfigError("store_pool_size must be at least 1")
    if settings.max_concurrent_turns < 0:
        raise ConfigError("max_concurrent_turns must be 0 (no limit) or more")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

