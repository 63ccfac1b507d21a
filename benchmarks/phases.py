"""The runner's steps beyond the latency matrix: lane hand-off, cost against history length
and stored-session count (on bulk-seeded stores), peak memory with many open sessions, and
a py-spy profile of laneway under load. Each records raw figures in `bench.raw`; `stats`
turns them into results.
"""

from __future__ import annotations

import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from benchmarks.loadgen import Job, percentile
from benchmarks.procs import established, memory_mb
from benchmarks.seed import seed_postgres, seed_sqlite
from benchmarks.targets import LANEWAY, PG_BENCH, Server, postgres_backends

if TYPE_CHECKING:
    from benchmarks.runner import Bench

HISTORY_CHARS = 1600  # ~400 tokens a message: 10 turns already fill the 8k context window
PROFILE_TOP = 25
#: The targets of the history, store-size and profile phases.
SCALED = ("laneway", "laneway-pg-redis")
_ANCHORS = frozenset({"site-packages", "src"})
_STDLIB = re.compile(r"python3\.\d+")
_ENTRY = re.compile(r"\(laneway/(cli|__main__)\.py\)")  # the process's entry: all samples


def handoff(bench: Bench, r: int) -> None:
    """Many requests queued on one key, model delay 0. The upstream times the gap between the
    end of one call and the start of the next: the lane hand-off as the model sees it. On
    direct, one client calling in a loop shows the same gap with no gateway in it."""
    plan = bench.plan
    for name in bench.running(("direct", *LANEWAY), r):
        server = bench.servers[name]
        tag = f"{bench.run_id}-h-{name}-r{r}"
        if name == "direct":
            job = bench.job(server, requests=plan.handoff_requests // 2, concurrency=1,
                            keys="none", tag=tag)
        else:
            job = bench.job(server, requests=plan.handoff_requests, concurrency=32,
                            keys="one", key=tag, tag=tag)
        result = bench.load(server, job)
        gaps = sorted(_upstream(bench, f"/_bench/gaps?tag={tag}")["gaps_ms"])
        bench.raw["handoff"].setdefault(name, []).append({
            "gap_p50_ms": percentile(gaps, 50),
            "gap_p90_ms": percentile(gaps, 90),
            "gaps": len(gaps),
            "period_ms": result["elapsed_s"] * 1000 / max(1, result["ok"]),
            "cpu_ms_per_turn": result["cpu_ms_per_turn"],
            "errors": result["errors"],
            "first_error": result["first_error"],
        })


def seed(bench: Bench) -> None:
    """For each laneway target of the plan (embedded, distributed), four servers: one for each
    side of a comparison (so that each side's CPU is its own server's), short and long
    histories, few and many stored sessions. Each is started once to migrate, stopped, seeded
    in its store, and restarted. A target that cannot run here is left out, as in the
    matrix."""
    launcher = bench.launcher
    assert launcher is not None
    plan = bench.plan
    stores: dict[str, tuple[list[str], int, int]] = {}
    if "history" in plan.phases:
        for which, turns in zip(("short", "long"), plan.history_turns):
            stores[f"history-{which}"] = ([f"h-r{r}" for r in range(plan.rounds)], turns,
                                          HISTORY_CHARS)
    if "stored" in plan.phases:
        for which, count in zip(("small", "large"), plan.stored_sessions):
            stores[f"stored-{which}"] = ([f"seed{i}" for i in range(count)], 1, 60)
    for target in SCALED:
        if target not in plan.targets or launcher.unavailable(target) or target in bench.skipped:
            continue
        for name, (keys, turns, chars) in stores.items():
            label = f"{target}-{name}"
            data_dir = bench.workdir / label
            backend = launcher.distributed(label) if target == "laneway-pg-redis" else []
            migrated = launcher.laneway(f"{label}-migrate", data_dir, backend)
            launcher.stop(migrated)
            if migrated.database:
                seed_postgres(f"{PG_BENCH}/{migrated.database}", keys, turns, chars)
            else:
                seed_sqlite(data_dir / "laneway.db", keys, turns, chars)
            server = launcher.laneway(label, data_dir, backend)
            bench.load(server, bench.job(server, requests=plan.warm_requests // 4,
                                         concurrency=4, key=f"{bench.run_id}-warm-{label}"))
            if server.database:  # the two sides share PostgreSQL: count each its own connections
                server.services = postgres_backends(server)
            bench.servers[label] = server
        bench.scaled.append(target)


def history(bench: Bench, r: int) -> None:
    """Turns on a 10-turn and on a 10,000-turn session, both filling the context window, so
    the model gets as much from either: what differs is the length of the stored history.
    The two run in lockstep, one request each in turn."""
    sides = ("short", "long")
    for target in bench.scaled:
        runs = bench.load_paired([
            (server, bench.job(server, requests=bench.plan.history_requests, concurrency=1,
                               keys="one", key=f"h-r{r}"))
            for server in (bench.servers[f"{target}-history-{which}"] for which in sides)
        ])
        for which, result in zip(sides, runs):
            bench.raw["history"].setdefault(target, {}).setdefault(which, []).append(result)


def stored(bench: Bench, r: int) -> None:
    """Turns on a store holding 1,000 sessions and on one holding 1,000,000, in lockstep: on
    new keys, and on existing sessions touched for the first time (loaded from the store,
    not the cache)."""
    plan = bench.plan
    n = plan.stored_requests
    sides = list(zip(("small", "large"), plan.stored_sessions))
    for target in bench.scaled:
        new, cold = [], []
        for which, count in sides:
            server = bench.servers[f"{target}-stored-{which}"]
            new.append((server, bench.job(server, requests=n, concurrency=1,
                                          key=f"{bench.run_id}-new-{which}-r{r}")))
            cold.append((server, bench.job(server, requests=n, concurrency=1, keys="seq",
                                           key="seed", seq_start=r * n,
                                           seq_stride=max(1, count // (plan.rounds * n)))))
        raw = bench.raw["stored"].setdefault(target, {})
        for kind, runs in (("new", new), ("cold", cold)):
            for (which, _), result in zip(sides, bench.load_paired(runs)):
                raw.setdefault(which, {"new": [], "cold": []})[kind].append(result)


def rss(bench: Bench, target: str) -> None:
    """Peak RSS of a fresh server while `rss_sessions` sessions are open at once: one request
    per new key, as many in flight as the file-descriptor limit allows (a gateway holds two
    sockets for each). The upstream parks every call; once all the requests of a wave are
    connected and no more calls arrive (a gateway may admit only so many at once), the
    parked calls are released, until every session has had its turn."""
    assert bench.launcher is not None and bench.loadgen is not None
    if target in bench.skipped:
        return
    plan = bench.plan
    server = bench.launcher.start(target, tag="rss")
    try:
        assert server.proc is not None
        bench.load(server, bench.job(server, requests=32, concurrency=4,
                                     key=f"{bench.run_id}-rsswarm"))
        idle_mb, _ = memory_mb(server.proc.pid)
        total = plan.rss_sessions
        cap = min(total, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 256) // 2)
        job = bench.job(server, warm=False, requests=total, concurrency=cap, keys="seq",
                        key=f"{bench.run_id}-rss-", gate=True, timeout_s=900)
        connections, held_mb = _hold(bench, job, total, cap, server)
        result = bench.loadgen.collect()
        rss_mb, peak_mb = memory_mb(server.proc.pid)
    finally:
        bench.launcher.stop(server)
    bench.raw["rss"][target] = {
        "idle_mb": idle_mb, "held_mb": held_mb, "peak_mb": peak_mb, "after_mb": rss_mb,
        "sessions": total, "in_flight": cap, "connections": connections,
        "errors": result["errors"],
        "first_error": result["first_error"],
    }


def _hold(bench: Bench, job: Job, total: int, cap: int, server: Server) -> tuple[int, float]:
    """Submit `job` and release parked calls wave after wave (see `rss`). Returns the most
    client connections the server held at once (keep-alive ones included) and its largest
    RSS seen meanwhile."""
    assert bench.loadgen is not None and server.proc is not None
    port = int(server.base.rsplit(":", 1)[1])
    bench.loadgen.submit(job)
    released = connections = 0
    held_mb = 0.0
    last, last_change = -1, time.monotonic()
    while not bench.loadgen.ready(0.1):
        parked = _upstream(bench, "/_bench/parked")["parked"]
        connected = established(server.proc.pid, port)
        connections = max(connections, connected)
        now = time.monotonic()
        if parked != last:
            last, last_change = parked, now
        wave_in = connected >= min(cap, total - released) and now - last_change > 0.3
        if parked and (wave_in or now - last_change > 15):
            held_mb = max(held_mb, memory_mb(server.proc.pid)[0])
            released += _upstream(bench, "/_bench/release")["released"]
    return connections, held_mb


def profile(bench: Bench) -> None:
    """py-spy (sampling, non-blocking) on each laneway target running (embedded, distributed),
    one after the other, through c32 and c1 load."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    names = [name for name in SCALED if name in bench.servers]
    if not names or not Path(spy).exists():
        bench.raw["profile"] = {"skipped": "py-spy or a laneway target is missing"}
        return
    for name in names:
        bench.raw["profile"][name] = _profile(bench, spy, name, bench.servers[name])


def _profile(bench: Bench, spy: str, name: str, server: Server) -> dict[str, Any]:
    assert server.proc is not None
    out = bench.workdir / f"{name}.pyspy.txt"
    proc = bench.procs.spawn(f"py-spy-{name}", [
        spy, "record", "--pid", str(server.proc.pid), "--format", "raw", "--output", str(out),
        "--rate", "400", "--nonblocking"])
    time.sleep(1.0)  # attached by then
    plan = bench.plan
    for concurrency, stream, n in ((32, False, 3 * plan.c32_requests),
                                   (32, True, 2 * plan.c32_requests),
                                   (1, False, 2 * plan.c1_requests)):
        bench.load(server, bench.job(server, requests=n, concurrency=concurrency, stream=stream,
                                     key=f"{bench.run_id}-prof-{name}-{concurrency}{stream}"))
    proc.popen.send_signal(signal.SIGINT)
    try:
        proc.popen.wait(30)
    except subprocess.TimeoutExpired:
        pass
    bench.procs.stop(proc)
    if not out.exists():
        return {"skipped": f"py-spy wrote nothing: {proc.output(500)}"}
    file = out
    if bench.profile_out is not None:  # next to the results: NAME.TARGET.pyspy.txt
        file = bench.profile_out.with_name(f"{bench.profile_out.stem}.{name}.pyspy.txt")
        shutil.copyfile(out, file)
    return {**summarise_profile(out.read_text()), "file": str(file)}


def summarise_profile(raw: str) -> dict[str, Any]:
    """From py-spy's raw output (collapsed stacks): the top functions by self samples, the
    top laneway functions by inclusive samples (what each step of a turn costs with all it
    calls), and self samples by package."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    packages: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1][0]] = own.get(frames[-1][0], 0) + count
        packages[frames[-1][1]] = packages.get(frames[-1][1], 0) + count
        for name in {f[0] for f in frames if f[1] == "laneway" and not _ENTRY.search(f[0])}:
            inclusive[name] = inclusive.get(name, 0) + count

    def top(counts: dict[str, int], n: int = PROFILE_TOP) -> list[dict[str, Any]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
        return [{"function": k, "samples": v, "percent": round(100 * v / max(1, total), 1)}
                for k, v in best]

    return {"samples": total, "top_self": top(own), "top_inclusive": top(inclusive),
            "by_package": top(packages, 15)}


def _frame(frame: str) -> tuple[str, str]:
    """("function (pkg/module.py)", "pkg") from "function (/path/pkg/module.py:LINE)"."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    anchors = [i for i, part in enumerate(parts) if part in _ANCHORS or _STDLIB.fullmatch(part)]
    if anchors:  # site-packages/, src/ or lib/python3.X/: the package comes next
        parts = parts[anchors[-1] + 1 :]
    package = Path(parts[0]).stem if parts else "?"
    short = "/".join(parts[-2:]) if parts else path
    return f"{name} ({short})", package


def _upstream(bench: Bench, path: str) -> dict[str, Any]:
    assert bench.launcher is not None
    with urllib.request.urlopen(bench.launcher.upstream + path, timeout=10) as resp:
        result: dict[str, Any] = orjson.loads(resp.read())
    return result

