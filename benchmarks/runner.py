"""The runner: starts the scripted upstream, the load generator and the targets, runs the
steps of a plan, and stops everything it started by PID, also on error or Ctrl-C.

The machine is noisy (2 cores, shared), so a figure is never one measurement: every round
runs each target once per scenario, in an order that rotates from round to round, and a
result is the median over rounds of paired figures (target minus direct, target / direct
from the same round).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Self

import orjson

from benchmarks import phases
from benchmarks.loadgen import Job
from benchmarks.procs import Proc, Procs, cpu_seconds, cpu_ticks_seconds, store_seconds
from benchmarks.targets import ALL, Launcher, Server

PHASES = ("matrix", "handoff", "history", "stored", "rss")


@dataclass(frozen=True, slots=True)
class Cell:
    """One load scenario of the latency matrix."""

    concurrency: int
    delay_ms: int
    stream: bool

    @property
    def name(self) -> str:
        return f"c{self.concurrency}-d{self.delay_ms}" + ("-stream" if self.stream else "")

    @property
    def label(self) -> str:
        return f"c{self.concurrency} · {self.delay_ms} ms · {'stream' if self.stream else 'json'}"


CELLS = tuple(Cell(c, d, s) for c in (1, 32) for d in (0, 50) for s in (False, True))


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run does; `plan()` builds the quick and full ones."""

    mode: str
    rounds: int
    targets: tuple[str, ...]
    phases: tuple[str, ...]
    c1_requests: int  # c1, model delay 0
    c1_slow_requests: int  # c1, model delay 50 ms
    c32_requests: int
    warm_requests: int
    handoff_requests: int  # all on one key, 32 in flight
    history_turns: tuple[int, int]
    history_requests: int
    stored_sessions: tuple[int, int]
    stored_requests: int
    rss_sessions: int
    profile: bool

    def requests(self, cell: Cell) -> int:
        if cell.concurrency > 1:
            return self.c32_requests
        return self.c1_slow_requests if cell.delay_ms else self.c1_requests


def plan(
    mode: str = "quick",
    *,
    rounds: int | None = None,
    targets: tuple[str, ...] = ALL,
    only: tuple[str, ...] = PHASES,
    profile: bool = False,
    scale: float = 1.0,
) -> Plan:
    """`scale` shrinks every request count (the smoke test runs quick mode at a fraction)."""
    for name in targets:
        if name not in ALL:
            raise ValueError(f"unknown target {name!r}; known: {', '.join(ALL)}")
    for name in only:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; known: {', '.join(PHASES)}")
    full = mode == "full"

    def n(count: int) -> int:
        return max(4, int(count * scale))

    return Plan(
        mode=mode,
        rounds=rounds or (5 if full else 2),
        targets=tuple(dict.fromkeys(("direct", *targets))),  # direct is every ratio's base
        phases=only,
        c1_requests=n(400 if full else 60),
        c1_slow_requests=n(60 if full else 12),
        c32_requests=n(1600 if full else 128),
        warm_requests=n(200 if full else 48),
        handoff_requests=n(400 if full else 96),
        history_turns=(10, 10_000 if full else 1_000),
        history_requests=n(100 if full else 20),
        stored_sessions=(1_000, 1_000_000) if full else (100, 10_000),
        stored_requests=n(150 if full else 20),
        rss_sessions=10_000 if full else max(64, int(300 * scale)),
        profile=profile,
    )


@dataclass(frozen=True, slots=True)
class Step:
    label: str
    run: Callable[[], None]


class LoadGen:
    """The load generator process, driven one job at a time over its stdin and stdout."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    def submit(self, job: Job | list[Job]) -> None:
        """One job, or a list of jobs to run in lockstep (`loadgen.run_paired`)."""
        stdin = self.proc.popen.stdin
        assert stdin is not None
        spec = [dataclasses.asdict(j) for j in job] if isinstance(job, list) else \
            dataclasses.asdict(job)
        stdin.write(orjson.dumps(spec) + b"\n")
        stdin.flush()

    def ready(self, timeout_s: float = 0.0) -> bool:
        stdout = self.proc.popen.stdout
        assert stdout is not None
        return bool(select.select([stdout], [], [], timeout_s)[0])

    def collect(self) -> Any:
        stdout = self.proc.popen.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator died:\n{self.proc.output()}")
        result = orjson.loads(line)
        if isinstance(result, dict) and "fatal" in result:
            raise RuntimeError(f"the load generator failed: {result['fatal']}")
        return result

    def run(self, job: Job) -> dict[str, Any]:
        self.submit(job)
        result: dict[str, Any] = self.collect()
        return result

    def run_paired(self, jobs: list[Job]) -> list[dict[str, Any]]:
        self.submit(jobs)
        results: list[dict[str, Any]] = self.collect()
        return results


class Bench:
    """One run: `with Bench(plan) as bench: for step in bench.steps(): step.run()`, then
    `bench.result()`. Leaving the block stops every process the run started."""

    def __init__(
        self,
        plan: Plan,
        *,
        root: Path | None = None,
        laneway_src: Path | None = None,
        base_src: Path | None = None,
        profile_out: Path | None = None,  # the results' path: py-spy's files go beside it
    ) -> None:
        self.plan = plan
        self.root = root or Path(__file__).resolve().parent.parent
        self.workdir = Path(tempfile.mkdtemp(prefix="laneway-bench-"))
        self.procs = Procs(self.workdir)
        self.run_id = secrets.token_hex(3)
        self.laneway_src = laneway_src
        self.base_src = base_src
        self.profile_out = profile_out
        self.servers: dict[str, Server] = {}
        self.skipped: dict[str, str] = {}
        self.scaled: list[str] = []  # the targets `phases.seed` gave seeded servers
        self.raw: dict[str, Any] = {"matrix": {}, "handoff": {}, "history": {}, "stored": {},
                                    "rss": {}, "profile": {}}
        self.started = time.time()
        self.upstream: Proc | None = None
        self.loadgen: LoadGen | None = None
        self.launcher: Launcher | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            env = {"PYTHONPATH": str(self.root)}
            upstream = self.procs.spawn(
                "upstream", [sys.executable, "-m", "benchmarks.upstream"], env=env, pipe=True
            )
            assert upstream.popen.stdout is not None
            ready = upstream.popen.stdout.readline().decode().split()
            if ready[:1] != ["ready"]:
                raise RuntimeError(f"the upstream did not start:\n{upstream.output()}")
            self.upstream = upstream
            base = f"http://127.0.0.1:{ready[1]}"
            self.launcher = Launcher(self.procs, self.workdir, base, self.root, self.laneway_src,
                                     self.base_src)
            self.loadgen = LoadGen(
                self.procs.spawn("loadgen", [sys.executable, "-m", "benchmarks.loadgen"],
                                 env=env, pipe=True)
            )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        failed = kind is not None and not issubclass(kind, KeyboardInterrupt)
        self.close(keep_logs=failed)

    def close(self, keep_logs: bool = False) -> None:
        """Stop everything; the work directory (data dirs, logs) goes unless a step failed."""
        try:
            self.procs.stop_all()
            if self.launcher is not None:
                self.launcher.cleanup()
        finally:
            if keep_logs:
                print(f"laneway bench: logs kept in {self.workdir}", file=sys.stderr)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the plan ------------------------------------------------------------------------

    def steps(self) -> list[Step]:
        p = self.plan
        steps = [Step("starting targets", self._start_targets)]
        if "matrix" in p.phases:
            steps.append(Step("warming up", self._warm))
            for r in range(p.rounds):
                for cell in CELLS:
                    steps.append(Step(f"round {r + 1}/{p.rounds} · {cell.label}",
                                      partial(self._matrix, r, cell)))
        if "handoff" in p.phases:
            steps += [Step(f"hand-off · round {r + 1}/{p.rounds}", partial(phases.handoff, self, r))
                      for r in range(p.rounds)]
        if p.profile:
            steps.append(Step("profiling laneway under load (py-spy)", partial(phases.profile, self)))
        steps.append(Step("stopping targets", self._stop_targets))
        scaled = any(t in p.targets for t in phases.SCALED)
        if scaled and {"history", "stored"} & set(p.phases):
            steps.append(Step("seeding sessions", partial(phases.seed, self)))
        for name in ("history", "stored"):
            if scaled and name in p.phases:
                run = getattr(phases, name)
                steps += [Step(f"{name} · round {r + 1}/{p.rounds}", partial(run, self, r))
                          for r in range(p.rounds)]
        if "rss" in p.phases:
            steps += [Step(f"peak RSS · {t}", partial(phases.rss, self, t))
                      for t in p.targets if t != "direct"]
        steps.append(Step("stopping", self._stop_targets))
        return steps

    def result(self) -> dict[str, Any]:
        from benchmarks.stats import summarise

        return summarise(self)

    def meta(self) -> dict[str, Any]:
        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        return {
            "mode": self.plan.mode,
            "rounds": self.plan.rounds,
            "nproc": os.cpu_count(),
            "cpu": cpu,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "laneway_commit": _commit(self.root),
            "laneway_src": str(self.laneway_src or self.root / "src"),
            "base_src": str(self.base_src) if self.base_src else None,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)),
            "duration_s": round(time.time() - self.started, 1),
            "targets": {t: self.skipped.get(t, "ok") for t in self.plan.targets},
            "plan": dataclasses.asdict(self.plan),
        }

    # -- helpers used by the phases ------------------------------------------------------

    def load(self, server: Server, job: Job) -> dict[str, Any]:
        """Run `job` against `server`; adds the CPU the server and the upstream spent."""
        assert self.loadgen is not None
        loadgen = self.loadgen
        return self._charged([server], lambda: [loadgen.run(job)])[0]

    def load_paired(self, runs: list[tuple[Server, Job]]) -> list[dict[str, Any]]:
        """Jobs in lockstep (`loadgen.run_paired`), each against a server of its own, so
        that each server's CPU is its job's."""
        assert self.loadgen is not None
        servers = [server for server, _ in runs]
        if len({id(server) for server in servers}) != len(servers):
            raise ValueError("paired jobs need a server each")
        loadgen = self.loadgen
        return self._charged(servers, lambda: loadgen.run_paired([job for _, job in runs]))

    def _charged(
        self, servers: list[Server], run: Callable[[], list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """`run()`'s results, each with the CPU its server spent (once the work the run left
        behind is done: `Server.settle_s`) and its share of the upstream's."""
        assert self.upstream is not None
        stores_before = [_store(server) for server in servers]  # read outside the CPU window
        pids = [server.proc.pid if server.proc else None for server in servers]
        before = [(cpu_seconds(pid), cpu_ticks_seconds(pid)) if pid else (0.0, 0.0)
                  for pid in pids]
        upstream_before = cpu_seconds(self.upstream.pid)
        services_before = [sum(cpu_seconds(p) for p in s.services) for s in servers]
        results = run()
        time.sleep(max(server.settle_s for server in servers))
        services = [sum(cpu_seconds(p) for p in s.services) - b
                    for s, b in zip(servers, services_before)]
        after = [(cpu_seconds(pid), cpu_ticks_seconds(pid)) if pid else (0.0, 0.0)
                 for pid in pids]
        upstream_cpu = cpu_seconds(self.upstream.pid) - upstream_before
        for result, server, b_store in zip(results, servers, stores_before):
            result.update(_store_ms(b_store, _store(server)))
        calls = max(1, sum(result["ok"] for result in results))
        for result, b, a, service in zip(results, before, after, services):
            ok = max(1, result["ok"])
            result["cpu_s"] = a[0] - b[0]
            result["cpu_ms_per_turn"] = result["cpu_s"] * 1000 / ok
            result["cpu_ms_per_turn_ticks"] = (a[1] - b[1]) * 1000 / ok
            result["upstream_cpu_ms_per_call"] = upstream_cpu * 1000 / calls
            result["services_cpu_ms_per_turn"] = service * 1000 / ok
        return results

    def job(self, server: Server, *, warm: bool = True, **kwargs: Any) -> Job:
        return Job(url=server.chat_url, warm_url=server.models_url if warm else "", **kwargs)

    def running(self, names: tuple[str, ...] = ALL, r: int = 0) -> list[str]:
        """The running targets among `names`, in plan order rotated by round `r` (no
        target always goes first or last: the machine's noise drifts within a round)."""
        found = [t for t in self.plan.targets if t in names and t in self.servers]
        shift = r % len(found) if found else 0
        return found[shift:] + found[:shift]

    # -- steps ---------------------------------------------------------------------------

    def _start_targets(self) -> None:
        """Start every target that can run here; record why the others cannot."""
        assert self.launcher is not None
        for name in self.plan.targets:
            reason = self.launcher.unavailable(name)
            if reason is None:
                try:
                    self.servers[name] = self.launcher.start(name)
                except RuntimeError as e:
                    if name == "laneway":
                        raise
                    reason = f"did not start: {_last_line(str(e))}"
            if reason is not None:
                self.skipped[name] = reason
        if not ({"matrix", "handoff"} & set(self.plan.phases) or self.plan.profile):
            self._stop_targets()

    def _warm(self) -> None:
        for name in self.running():
            server = self.servers[name]
            self.load(server, self.job(server, requests=self.plan.warm_requests, concurrency=8,
                                       key=f"{self.run_id}-warm-{name}"))

    def _matrix(self, r: int, cell: Cell) -> None:
        for name in self.running(r=r):
            server = self.servers[name]
            job = self.job(server, requests=self.plan.requests(cell),
                           concurrency=cell.concurrency, stream=cell.stream,
                           delay_ms=cell.delay_ms, key=f"{self.run_id}-{name}-{cell.name}-r{r}")
            result = self.load(server, job)
            self.raw["matrix"].setdefault(cell.name, {}).setdefault(name, []).append(result)

    def _stop_targets(self) -> None:
        assert self.launcher is not None
        for name, server in list(self.servers.items()):
            if name != "direct":
                self.launcher.stop(server)
        self.servers = {"direct": self.launcher.direct()}


def _store(server: Server) -> dict[str, tuple[float, float]] | None:
    return store_seconds(server.base + server.metrics_path) if server.metrics_path else None


def _store_ms(before: dict[str, tuple[float, float]] | None,
              after: dict[str, tuple[float, float]] | None) -> dict[str, float]:
    """The mean latency of each store call over a run (`store_load_ms`,
    `store_commit_ms`), from laneway's counters before and after it."""
    if not before or not after:
        return {}
    out = {}
    for op, (count, total) in after.items():
        b_count, b_total = before.get(op, (0.0, 0.0))
        if count > b_count:
            out[f"store_{op}_ms"] = (total - b_total) * 1000 / (count - b_count)
    return out


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else text[:200]


def _commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "describe", "--always", "--dirty"],
                             check=False, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"
