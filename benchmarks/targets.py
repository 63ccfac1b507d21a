"""The servers a run compares, each in front of the one scripted upstream:

  direct            the upstream itself (the baseline: what a client without a gateway sees)
  bare              `benchmarks/passthrough.py`, the floor
  laneway           `laneway serve`, embedded: SQLite + in-process lanes
  laneway-base      the same, run from another source tree (`--base-src`): an earlier build
                    measured in the same rounds, so a change is judged against its base
                    under the same machine noise
  laneway-pg-redis  `laneway serve --store postgresql://... --lanes redis://...?prefix=P`,
                    once that backend exists (a run that cannot start it says so and leaves
                    it out); a database of its own, dropped at the end, and a random Redis
                    key prefix, whose keys are deleted at the end
  laneway-pg-redis-base  the same from `--base-src`, with a database of its own: a change to
                    the distributed backend judged against its base in the same rounds
  litellm           LiteLLM's proxy, when it is importable
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.procs import Proc, Procs, free_port, roots, wait_http

ALL = ("direct", "bare", "laneway", "laneway-base", "laneway-pg-redis", "laneway-pg-redis-base",
       "litellm")
LANEWAY = ("laneway", "laneway-base", "laneway-pg-redis", "laneway-pg-redis-base")
PG_BENCH = "postgresql://postgres@127.0.0.1:5432"
PG_ADMIN = f"{PG_BENCH}/postgres"
REDIS = "redis://127.0.0.1:6379/0"
SERVICES = frozenset({"postgres", "redis-server"})
CHECKPOINT_S = 1.1  # laneway's SQLite checkpointer: 0.5 s after a commit, polled each 0.5 s


@dataclass
class Server:
    name: str
    base: str  # http://127.0.0.1:PORT
    proc: Proc | None  # None: direct, no gateway process to charge
    ready_path: str = "/v1/models"
    #: Shared services the target works through (PostgreSQL, Redis): their CPU is reported
    #: apart, as it also counts whatever else uses them meanwhile.
    services: list[int] = field(default_factory=list)
    #: Seconds to wait after a run before reading the CPU, for the work the run leaves
    #: behind to be done and counted with it: embedded laneway checkpoints its SQLite WAL on
    #: a thread, at most a second after the last commit.
    settle_s: float = 0.0
    #: Where laneway's Prometheus metrics are: a run reads its store calls' latency there.
    metrics_path: str | None = None
    #: The distributed backend's PostgreSQL database.
    database: str | None = None

    @property
    def chat_url(self) -> str:
        return self.base + "/v1/chat/completions"

    @property
    def models_url(self) -> str:
        return self.base + "/v1/models"


@dataclass
class Launcher:
    """Starts targets in front of `upstream` (http://HOST:PORT, no /v1)."""

    procs: Procs
    workdir: Path
    upstream: str
    root: Path  # the directory holding `benchmarks/`
    laneway_src: Path | None = None  # run `laneway serve` from this source tree instead
    base_src: Path | None = None  # the source tree of the `-base` targets
    databases: list[str] = field(default_factory=list)  # Postgres databases to drop at the end
    redis_prefix: str = field(default_factory=lambda: f"laneway-bench-{secrets.token_hex(4)}:")
    redis_used: bool = False

    def direct(self) -> Server:
        return Server("direct", self.upstream, None)

    def start(self, name: str, tag: str = "") -> Server:
        """Start target `name`; `tag` tells several instances of one target apart."""
        label = f"{name}{'-' + tag if tag else ''}"
        if name == "direct":
            return self.direct()
        if name == "bare":
            port = free_port()
            argv = [sys.executable, "-m", "benchmarks.passthrough", "--upstream", self.upstream,
                    "--port", str(port)]
            proc = self.procs.spawn(label, argv, env={"PYTHONPATH": str(self.root)})
            return self._ready(Server(name, f"http://127.0.0.1:{port}", proc))
        if name in ("laneway", "laneway-base"):
            src = self.base_src if name == "laneway-base" else None
            return self.laneway(label, self.workdir / label, src=src)
        if name in ("laneway-pg-redis", "laneway-pg-redis-base"):
            src = self.base_src if name.endswith("-base") else None
            return self.laneway(label, self.workdir / label, self.distributed(), src=src)
        if name == "litellm":
            port = free_port()
            config = self.workdir / f"{label}.yaml"
            config.write_text(_LITELLM_CONFIG.format(upstream=self.upstream))
            argv = [sys.executable, "-m", "litellm.proxy.proxy_cli", "--host", "127.0.0.1",
                    "--port", str(port), "--config", str(config), "--num_workers", "1"]
            # Its own table of model prices, not the copy LiteLLM fetches from GitHub at start.
            proc = self.procs.spawn(label, argv, env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"})
            return self._ready(Server(name, f"http://127.0.0.1:{port}", proc), timeout_s=120)
        raise ValueError(f"unknown target {name!r}; known: {', '.join(ALL)}")

    def distributed(self, lanes: str = "") -> list[str]:
        """`laneway serve`'s options for the distributed backend: a new database (dropped by
        `cleanup`) and this run's Redis key prefix, or a prefix under it named `lanes` (for
        servers that must not share lanes: the same key on each is another session)."""
        database = f"laneway_bench_{secrets.token_hex(4)}"
        _postgres(f"CREATE DATABASE {database}")
        self.databases.append(database)
        self.redis_used = True
        prefix = self.redis_prefix + (f"{lanes}:" if lanes else "")
        return ["--store", f"{PG_BENCH}/{database}", "--lanes", f"{REDIS}?prefix={prefix}"]

    def laneway(
        self, label: str, data_dir: Path, extra: list[str] | None = None, src: Path | None = None
    ) -> Server:
        port = free_port()
        argv = [sys.executable, "-m", "laneway", "serve", "--port", str(port),
                "--data-dir", str(data_dir), "--upstream", self.upstream + "/v1",
                "--upstream-model", "bench", "--max-queue-depth", "100000",
                "--log-level", "warning", *(extra or [])]
        src = src or self.laneway_src
        proc = self.procs.spawn(label, argv, env={"PYTHONPATH": str(src)} if src else {})
        server = Server("laneway", f"http://127.0.0.1:{port}", proc, "/healthz",
                        settle_s=CHECKPOINT_S, metrics_path="/metrics")
        if "--store" in argv:  # the distributed backend (`distributed`)
            server.database = argv[argv.index("--store") + 1].rsplit("/", 1)[1]
            server.services = roots(SERVICES)
            server.settle_s = 0.0  # no checkpointer: PostgreSQL writes on its own
        return self._ready(server)

    def stop(self, server: Server) -> None:
        if server.proc is not None:
            self.procs.stop(server.proc)

    def unavailable(self, name: str) -> str | None:
        """Why target `name` cannot run here, or None; cheap checks only (see `start`)."""
        if name == "litellm" and importlib.util.find_spec("litellm") is None:
            return "LiteLLM is not installed (pip install 'litellm[proxy]')"
        if name.endswith("-base") and self.base_src is None:
            return "no --base-src given"
        if name.startswith("laneway-pg-redis"):
            try:
                _postgres("SELECT 1")
            except Exception as e:  # noqa: BLE001 - any failure means: no Postgres to use
                return f"no PostgreSQL at {PG_ADMIN}: {type(e).__name__}"
        return None

    def cleanup(self) -> None:
        """Drop the Postgres databases and delete the Redis keys this run created."""
        for database in self.databases:
            _postgres(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        self.databases.clear()
        if self.redis_used:
            import redis

            client = redis.Redis.from_url(REDIS)
            try:
                keys = list(client.scan_iter(match=self.redis_prefix + "*", count=1000))
                for i in range(0, len(keys), 1000):
                    client.delete(*keys[i : i + 1000])
            finally:
                client.close()
            self.redis_used = False

    def _ready(self, server: Server, timeout_s: float = 60.0) -> Server:
        assert server.proc is not None
        wait_http(server.proc, server.base + server.ready_path, timeout_s)
        return server


#: The load's model name routed to the scripted upstream. LiteLLM's proxy refuses to start
#: without a master key unless told to; the load sends none.
_LITELLM_CONFIG = """\
model_list:
  - model_name: default
    litellm_params:
      model: openai/bench
      api_base: {upstream}/v1
      api_key: bench
general_settings:
  dangerously_permit_weak_or_unset_master_key: true
"""


def postgres_backends(server: Server) -> list[int]:
    """The PIDs of the PostgreSQL processes serving the distributed `server`'s database (its
    connections): their CPU is that server's alone, where the postmaster's whole tree counts
    every database's."""
    assert server.database is not None
    rows = _postgres("SELECT pid FROM pg_stat_activity WHERE datname = $1", server.database)
    return [row[0] for row in rows]


def _postgres(statement: str, *args: object) -> list[Any]:
    """Run `statement` as the admin; its rows. Without arguments it goes as a simple query
    (`CREATE DATABASE` and `DROP DATABASE` are commands, not statements to prepare)."""
    async def run() -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        try:
            if not args:
                await conn.execute(statement)
                return []
            return list(await conn.fetch(statement, *args))
        finally:
            await conn.close()

    return asyncio.run(run())
