"""From raw per-round measurements to results: medians over rounds of paired figures (each
target against direct in the same round), and the rows of the results tables.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.runner import Bench

Rows = list[tuple[str, dict[str, str]]]


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def _paired(runs: list[dict[str, Any]], base: list[dict[str, Any]], key: str, op: str) -> float:
    pairs = list(zip(runs, base))
    if op == "-":
        return median([t[key] - d[key] for t, d in pairs])
    return median([_ratio(t[key], d[key]) for t, d in pairs])


def _cells(matrix: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cell, by_target in matrix.items():
        direct = by_target.get("direct", [])
        out[cell] = {}
        for target, runs in by_target.items():
            figures: dict[str, Any] = {k: median([r[k] for r in runs]) for k in
                       ("p50_ms", "p99_ms", "rps", "ttft_p50_ms", "cpu_ms_per_turn",
                        "upstream_cpu_ms_per_call", "services_cpu_ms_per_turn")}
            for key in ("store_load_ms", "store_commit_ms"):
                if all(key in r for r in runs):
                    figures[key] = median([r[key] for r in runs])
            figures["errors"] = sum(r["errors"] for r in runs)
            figures["first_error"] = next((r["first_error"] for r in runs if r["errors"]), "")
            if target != "direct":
                figures["added_p50_ms"] = _paired(runs, direct, "p50_ms", "-")
                figures["added_p99_ms"] = _paired(runs, direct, "p99_ms", "-")
                figures["added_ttft_p50_ms"] = _paired(runs, direct, "ttft_p50_ms", "-")
                figures["throughput_ratio"] = _paired(runs, direct, "rps", "/")
            out[cell][target] = figures
    return out


def _round_cpu(matrix: dict[str, dict[str, list[dict[str, Any]]]], target: str) -> list[float]:
    """Per round: CPU over every matrix run of the round / turns of the round."""
    rounds: dict[int, list[float]] = {}
    for by_target in matrix.values():
        for r, run in enumerate(by_target.get(target, [])):
            cpu, ok = rounds.setdefault(r, [0.0, 0.0])
            rounds[r] = [cpu + run["cpu_s"], ok + run["ok"]]
    return [cpu * 1000 / ok for cpu, ok in rounds.values() if ok]


def _versus_base(raw: dict[str, Any]) -> dict[str, Any]:
    """laneway against laneway-base (another build, same rounds): each side's median and the
    median of the per-round ratios laneway / base."""
    out: dict[str, Any] = {}
    sides: dict[str, tuple[list[float], list[float]]] = {}
    if raw["matrix"]:
        sides["cpu_ms_per_turn"] = (_round_cpu(raw["matrix"], "laneway-base"),
                                    _round_cpu(raw["matrix"], "laneway"))
    if "laneway" in raw["handoff"] and "laneway-base" in raw["handoff"]:
        base, new = raw["handoff"]["laneway-base"], raw["handoff"]["laneway"]
        for key in ("gap_p50_ms", "cpu_ms_per_turn"):
            sides[f"handoff_{key}"] = ([r[key] for r in base], [r[key] for r in new])
    for key, (base, new) in sides.items():
        out[key] = {"base": median(base), "laneway": median(new),
                    "ratio": median([_ratio(n, b) for n, b in zip(new, base)])}
    return out


def _pooled_cpu(matrix: dict[str, dict[str, list[dict[str, Any]]]], target: str) -> float:
    """CPU over every matrix run of a round / turns of that round; median over rounds."""
    return median(_round_cpu(matrix, target))


def _ratio_key(key: str) -> str:
    """cpu_ms_per_turn -> cpu_ratio, p50_ms -> p50_ratio, services_cpu_ms_per_turn -> ..."""
    return key.replace("_ms", "").replace("_per_turn", "") + "_ratio"


def _versus(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each side, and of the per-round ratios b / a."""
    out: dict[str, Any] = {}
    keys = ["cpu_ms_per_turn", "p50_ms", "p99_ms"]
    if any(r["services_cpu_ms_per_turn"] for r in a + b):  # the PostgreSQL of each side
        keys.append("services_cpu_ms_per_turn")
    for key in keys:
        out[key] = [median([r[key] for r in a]), median([r[key] for r in b])]
        out[_ratio_key(key)] = _paired(b, a, key, "/")
    out["first_ms"] = [a[0]["first_ms"], b[0]["first_ms"]] if a and b else [0.0, 0.0]
    out["errors"] = sum(r["errors"] for r in a + b)
    return out


def summarise(bench: Bench) -> dict[str, Any]:
    raw = bench.raw
    cells = _cells(raw["matrix"])
    summary: dict[str, Any] = {}
    for target in bench.plan.targets:
        if target in bench.skipped:
            continue
        s: dict[str, Any] = {}
        if raw["matrix"]:
            s["cpu_ms_per_turn"] = _pooled_cpu(raw["matrix"], target)
            s["cells"] = {cell: figures[target] for cell, figures in cells.items()
                          if target in figures}
        if target in raw["handoff"]:
            runs = raw["handoff"][target]
            s["handoff"] = {k: median([r[k] for r in runs]) for k in
                            ("gap_p50_ms", "gap_p90_ms", "period_ms", "cpu_ms_per_turn")}
            s["handoff"]["errors"] = sum(r["errors"] for r in runs)
        if target in raw["rss"]:
            s["rss"] = raw["rss"][target]
        summary[target] = s
    result: dict[str, Any] = {"meta": bench.meta(), "summary": summary}
    scale: dict[str, Any] = {}
    for target, h in raw["history"].items():
        scale.setdefault(target, {})["history"] = {"turns": list(bench.plan.history_turns),
                                                   **_versus(h["short"], h["long"])}
    for target, st in raw["stored"].items():
        scale.setdefault(target, {})["stored"] = {
            "sessions": list(bench.plan.stored_sessions),
            "new": _versus(st["small"]["new"], st["large"]["new"]),
            "cold": _versus(st["small"]["cold"], st["large"]["cold"])}
    if scale:
        result["scale"] = scale
    if "laneway" in summary and "laneway-base" in summary:
        result["versus_base"] = _versus_base(raw)
    if raw["profile"]:
        result["profile"] = raw["profile"]
    result["errors"] = _errors(result)
    return result


def _errors(result: dict[str, Any]) -> int:
    total = 0
    for s in result["summary"].values():
        total += sum(c["errors"] for c in s.get("cells", {}).values())
        total += s.get("handoff", {}).get("errors", 0) + s.get("rss", {}).get("errors", 0)
    for scaled in result.get("scale", {}).values():
        total += scaled.get("history", {}).get("errors", 0)
        for side in ("new", "cold"):
            total += scaled.get("stored", {}).get(side, {}).get("errors", 0)
    return total


# -- tables ------------------------------------------------------------------------------

_LATENCY = [("c1-d0", "c1 · 0 ms"), ("c1-d0-stream", "c1 · 0 ms · stream"),
            ("c1-d50", "c1 · 50 ms"), ("c1-d50-stream", "c1 · 50 ms · stream"),
            ("c32-d0", "c32 · 0 ms"), ("c32-d0-stream", "c32 · 0 ms · stream"),
            ("c32-d50", "c32 · 50 ms"), ("c32-d50-stream", "c32 · 50 ms · stream")]


def _f(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def main_rows(result: dict[str, Any]) -> tuple[list[str], Rows]:
    """(targets, rows) of the comparison table; direct shows absolute latencies."""
    summary = result["summary"]
    targets = list(summary)
    rows: Rows = []

    def row(label: str, make: Any) -> None:
        cells = {t: make(t, summary[t]) for t in targets}
        if any(v not in ("", "—") for v in cells.values()):
            rows.append((label, cells))

    def cell(name: str) -> Any:
        return lambda t, s: s.get("cells", {}).get(name)

    row("gateway CPU ms / turn, all cells",
        lambda t, s: "—" if t == "direct" or "cpu_ms_per_turn" not in s
        else _f(s["cpu_ms_per_turn"]))
    row("gateway CPU ms / turn, c32 · 50 ms",
        lambda t, s: "—" if t == "direct" or not cell("c32-d50")(t, s)
        else _f(cell("c32-d50")(t, s)["cpu_ms_per_turn"]))
    row("PostgreSQL + Redis CPU ms / turn, c32 · 50 ms",
        lambda t, s: f"{cell('c32-d50')(t, s)['services_cpu_ms_per_turn']:.2f}"
        if t.startswith("laneway-pg-redis") and cell("c32-d50")(t, s) else "")
    for name, label in (("c1-d0", "c1 · 0 ms"), ("c32-d50", "c32 · 50 ms")):
        def store(t: str, s: dict[str, Any], name: str = name) -> str:
            c = s.get("cells", {}).get(name) or {}
            if "store_load_ms" not in c or "store_commit_ms" not in c:
                return ""
            return f"{c['store_load_ms']:.2f} / {c['store_commit_ms']:.2f}"
        row(f"store load / commit ms (mean), {label}", store)
    for name, label in _LATENCY:
        def latency(t: str, s: dict[str, Any], name: str = name) -> str:
            c = s.get("cells", {}).get(name)
            if c is None:
                return ""
            if t == "direct":
                return f"({_f(c['p50_ms'])} / {_f(c['p99_ms'])})"
            return f"{c['added_p50_ms']:+.2f} / {c['added_p99_ms']:+.2f}"
        row(f"added p50 / p99 ms, {label}", latency)
    for name, label in (("c32-d50", "c32 · 50 ms · 32 keys"),
                        ("c32-d50-stream", "c32 · 50 ms · 32 keys · stream")):
        row(f"throughput ratio vs direct, {label}",
            lambda t, s, name=name: "1.00" if t == "direct" and cell(name)(t, s)
            else (_f(cell(name)(t, s)["throughput_ratio"]) if cell(name)(t, s) else ""))
    for name, label in (("c1-d0-stream", "c1 · 0 ms"), ("c1-d50-stream", "c1 · 50 ms"),
                        ("c32-d50-stream", "c32 · 50 ms")):
        def ttft(t: str, s: dict[str, Any], name: str = name) -> str:
            c = s.get("cells", {}).get(name)
            if c is None:
                return ""
            return f"({_f(c['ttft_p50_ms'])})" if t == "direct" else \
                f"{c['added_ttft_p50_ms']:+.2f}"
        row(f"time to first token added p50 ms, {label}", ttft)
    row("lane hand-off ms (model-side gap p50), one key, 32 queued",
        lambda t, s: "" if "handoff" not in s else
        (f"({_f(s['handoff']['gap_p50_ms'])} client loop)" if t == "direct"
         else _f(s["handoff"]["gap_p50_ms"])))
    row("RSS MiB idle → peak, sessions opened (requests in flight at once)",
        lambda t, s: "" if "rss" not in s else
        f"{s['rss']['idle_mb']:.0f} → {s['rss']['peak_mb']:.0f}, "
        f"{s['rss']['sessions']:,} ({s['rss']['in_flight']:,})"
        + (f", {s['rss']['errors']:,} failed" if s["rss"]["errors"] else ""))
    return targets, rows


#: The scale tables' titles, by target.
SCALE_TITLES = {"laneway": "laneway embedded", "laneway-pg-redis": "laneway-pg-redis"}


def scale_rows(result: dict[str, Any], target: str) -> Rows:
    """A laneway target's per-turn cost against history length and stored sessions (what
    `result["scale"][target]` holds; no rows if nothing)."""
    rows: Rows = []
    scaled = result.get("scale", {}).get(target, {})

    def add(label: str, v: dict[str, Any]) -> None:
        for key, what in (("cpu_ms_per_turn", "CPU ms / turn"),
                          ("services_cpu_ms_per_turn", "PostgreSQL CPU ms / turn"),
                          ("p50_ms", "p50 ms")):
            if key in v:
                a, b = v[key]
                rows.append((f"{label}: {what}",
                             {"a": _f(a), "b": _f(b), "ratio": _f(v[_ratio_key(key)])}))

    if "history" in scaled:
        h = scaled["history"]
        add(f"session of {h['turns'][0]:,} vs {h['turns'][1]:,} turns", h)
        a, b = h["first_ms"]
        rows.append(("  first (cold) turn ms", {"a": _f(a), "b": _f(b), "ratio": _f(_ratio(b, a))}))
    if "stored" in scaled:
        st = scaled["stored"]
        small, large = st["sessions"]
        add(f"{small:,} vs {large:,} stored sessions, new keys", st["new"])
        add(f"{small:,} vs {large:,} stored sessions, first touch of a stored one", st["cold"])
    return rows


def base_rows(result: dict[str, Any]) -> Rows:
    """laneway against laneway-base, when the run had both (`--base-src`)."""
    labels = {"cpu_ms_per_turn": "gateway CPU ms / turn, all cells",
              "handoff_gap_p50_ms": "lane hand-off ms",
              "handoff_cpu_ms_per_turn": "CPU ms / turn while handing off"}
    return [(labels[key], {"a": _f(v["base"]), "b": _f(v["laneway"]), "ratio": _f(v["ratio"])})
            for key, v in result.get("versus_base", {}).items()]


def markdown(result: dict[str, Any]) -> str:
    """The run's tables in Markdown, one after another."""
    tables: list[list[str]] = []

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    def table(head: list[str], rows: list[list[str]]) -> None:
        if rows:
            tables.append([line(head), "|---" * len(head) + "|", *map(line, rows)])

    targets, rows = main_rows(result)
    table(["", *targets], [[label, *(v[t] for t in targets)] for label, v in rows])
    for target in result.get("scale", {}):
        table([SCALE_TITLES.get(target, target), "a", "b", "b / a"],
              [[label.strip(), v["a"], v["b"], v["ratio"]]
               for label, v in scale_rows(result, target)])
    table(["laneway vs laneway-base", "base", "laneway", "ratio (paired)"],
          [[label, v["a"], v["b"], v["ratio"]] for label, v in base_rows(result)])
    return "\n\n".join("\n".join(lines) for lines in tables) + "\n"
