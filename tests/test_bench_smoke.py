"""`laneway bench` runs end to end (quick mode, one round, a fraction of the requests) and
writes complete, sane results. No timing thresholds: the figures belong to the machine."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
CELLS = ("c1-d0", "c1-d0-stream", "c1-d50", "c1-d50-stream",
         "c32-d0", "c32-d0-stream", "c32-d50", "c32-d50-stream")


def positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "laneway", "bench", "--quick", "--rounds", "1", "--scale", "0.25",
         "--targets", "direct,bare,laneway", "--json", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.with_suffix(".md").read_text().startswith("| | direct | bare | laneway |")
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_every_target_ran_without_errors(result: dict[str, Any]) -> None:
    assert result["meta"]["targets"] == {"direct": "ok", "bare": "ok", "laneway": "ok"}
    assert result["errors"] == 0
    assert result["meta"]["nproc"] >= 1 and result["meta"]["python"]


def test_latency_matrix_is_complete(result: dict[str, Any]) -> None:
    for target in ("direct", "bare", "laneway"):
        s = result["summary"][target]
        assert set(s["cells"]) == set(CELLS), target
        for name, c in s["cells"].items():
            assert positive(c["p50_ms"]) and c["p99_ms"] >= c["p50_ms"], (target, name)
            assert positive(c["rps"]), (target, name)
            if name.endswith("stream"):
                assert positive(c["ttft_p50_ms"]), (target, name)
            if target != "direct":
                assert positive(c["cpu_ms_per_turn"]), (target, name)
                assert positive(c["throughput_ratio"]), (target, name)
                for key in ("added_p50_ms", "added_p99_ms", "added_ttft_p50_ms"):
                    assert finite(c[key]), (target, name, key)
        if target != "direct":
            assert positive(s["cpu_ms_per_turn"])


def test_laneway_runs_report_their_store_calls(result: dict[str, Any]) -> None:
    """From laneway's own /metrics, read around each run: the mean latency of a turn's
    session load and its write. The floor has no store."""
    for name, c in result["summary"]["laneway"]["cells"].items():
        assert positive(c["store_load_ms"]) and positive(c["store_commit_ms"]), name
    assert "store_load_ms" not in result["summary"]["bare"]["cells"]["c1-d0"]


def test_handoff_history_store_and_memory(result: dict[str, Any]) -> None:
    assert positive(result["summary"]["laneway"]["handoff"]["gap_p50_ms"])
    assert positive(result["summary"]["direct"]["handoff"]["gap_p50_ms"])
    for target in ("bare", "laneway"):
        rss = result["summary"][target]["rss"]
        assert rss["peak_mb"] >= rss["idle_mb"] > 0 and rss["connections"] > 0
        assert rss["sessions"] >= rss["in_flight"]
    assert list(result["scale"]) == ["laneway"]
    assert_scale(result["scale"]["laneway"])


def assert_scale(scaled: dict[str, Any]) -> None:
    """Complete figures of the history and store-size phases of one target (quick mode)."""
    history, stored = scaled["history"], scaled["stored"]
    assert history["turns"] == [10, 1000] and stored["sessions"] == [100, 10_000]
    for part in (history, stored["new"], stored["cold"]):
        assert positive(part["cpu_ratio"]) and positive(part["p50_ratio"])
        assert all(positive(v) for v in part["cpu_ms_per_turn"] + part["p50_ms"])
        assert part["errors"] == 0


def test_history_and_store_size_on_postgres_and_redis(tmp_path: Path) -> None:
    """The same phases on the distributed backend: its servers seeded in PostgreSQL, each
    with lanes of its own in Redis."""
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, "-m", "laneway", "bench", "--quick", "--rounds", "1", "--scale", "0.25",
         "--only", "history,stored", "--targets", "direct,laneway-pg-redis", "--json", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["targets"] == {"direct": "ok", "laneway-pg-redis": "ok"}
    assert result["errors"] == 0 and list(result["scale"]) == ["laneway-pg-redis"]
    assert_scale(result["scale"]["laneway-pg-redis"])
    assert "| laneway-pg-redis | a | b | b / a |" in out.with_suffix(".md").read_text()


def test_profile_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.phases import summarise_profile

    raw = (
        "run (asyncio/runners.py:118);handle (/x/src/laneway/service.py:12) 3\n"
        "run (asyncio/runners.py:118);dumps (/v/lib/python3.11/site-packages/orjson/x.py:1) 1\n"
    )
    summary = summarise_profile(raw)
    assert summary["samples"] == 4
    assert summary["top_self"][0] == {
        "function": "handle (laneway/service.py)", "samples": 3, "percent": 75.0
    }
    assert summary["top_inclusive"] == [
        {"function": "handle (laneway/service.py)", "samples": 3, "percent": 75.0}
    ]
    assert [p["function"] for p in summary["by_package"]] == ["laneway", "orjson"]


def test_profile_of_each_laneway_target(tmp_path: Path) -> None:
    """`--profile` samples each laneway target under load with py-spy: a summary each in the
    results and py-spy's whole output beside them."""
    out = tmp_path / "prof.json"
    proc = subprocess.run(
        [sys.executable, "-m", "laneway", "bench", "--quick", "--rounds", "1", "--scale", "0.25",
         "--only", "handoff", "--profile", "--targets", "direct,laneway,laneway-pg-redis",
         "--json", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    profiles = json.loads(out.read_text())["profile"]
    assert set(profiles) == {"laneway", "laneway-pg-redis"}, profiles
    for target, prof in profiles.items():
        assert prof["samples"] > 0 and prof["top_self"], target
        assert "laneway" in {p["function"] for p in prof["by_package"]}, target
        assert prof["file"] == str(tmp_path / f"prof.{target}.pyspy.txt")
        assert Path(prof["file"]).read_text().strip(), target


def test_instruction_counts_run() -> None:
    """`benchmarks/instructions.py` counts under callgrind: a laneway turn costs more than
    the bare relay, a turn through PostgreSQL and Redis more again, and each a sane amount
    (tens of thousands to tens of millions)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "--requests", "20",
         "--targets", "bare,laneway,laneway-pg-redis"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()}
    assert set(counts) == {"bare", "laneway", "laneway-pg-redis"}, proc.stdout
    assert 0.05 < counts["bare"] < counts["laneway"] < counts["laneway-pg-redis"] < 20, counts


def test_first_touch_split_runs(tmp_path: Path) -> None:
    """`benchmarks/firsttouch.py` touches seeded sessions of a small and a large store and
    splits each turn's CPU into its read, its commit and the checkpoint."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.firsttouch", "--small", "50", "--large", "2000",
         "--turns", "40", "--repeats", "1", "--dir", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["50", "2,000"], proc.stdout
    for row in rows:
        read, commit, checkpoint, total = map(float, row[1:])
        assert read > 0 and commit > 0 and checkpoint >= 0, row
        assert math.isclose(total, read + commit + checkpoint, abs_tol=0.002), row


def test_postgres_write_variants_run() -> None:
    """`benchmarks/pgwrite.py` writes every turn of each variant through laneway's
    `GroupWriter` (it checks the rows) and reports PostgreSQL's CPU for each."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.pgwrite", "--turns", "60", "--repeats", "1",
         "as-is", "no-message-id"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["as-is", "no-message-id"], proc.stdout
    assert all(finite(float(row[1])) and float(row[1]) >= 0 for row in rows), rows


def test_base_build_runs_in_the_same_rounds(tmp_path: Path) -> None:
    """`--base-src` adds target laneway-base (here: this same tree) to every round and reports
    laneway against it, paired per round."""
    out = tmp_path / "versus.json"
    proc = subprocess.run(
        [sys.executable, "-m", "laneway", "bench", "--quick", "--rounds", "2", "--scale", "0.25",
         "--only", "handoff", "--targets", "direct,laneway", "--base-src", str(ROOT / "src"),
         "--json", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["targets"] == {"direct": "ok", "laneway": "ok", "laneway-base": "ok"}
    assert result["errors"] == 0
    versus = result["versus_base"]
    assert set(versus) == {"handoff_gap_p50_ms", "handoff_cpu_ms_per_turn"}
    for figures in versus.values():
        assert all(positive(figures[k]) for k in ("base", "laneway", "ratio")), figures
    assert "| lane hand-off ms |" in out.with_suffix(".md").read_text()


def test_the_bench_model_paces_a_stream_one_event_per_write() -> None:
    """`p=MS` in the script: the reply's events come in writes of one each, MS apart (what
    `benchmarks.instructions --pace` measures); without it, in one write."""
    with subprocess.Popen([sys.executable, "-m", "benchmarks.upstream", "--port", "0"],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
        _paced_and_whole(proc)


def _paced_and_whole(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1])
        for script, paced in (("bench d=0 p=20", True), ("bench d=0", False)):
            body = orjson.dumps({"stream": True, "stream_options": {"include_usage": True},
                                 "messages": [{"role": "user", "content": script}]})
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                reads, data, started = 0, b"", time.monotonic()
                while not data.endswith(b"0\r\n\r\n"):
                    data += sock.recv(1 << 20)
                    reads += 1
                elapsed = time.monotonic() - started
            assert data.count(b"data: ") == 12, data  # 11 chunks (usage last) and [DONE]
            if paced:  # 12 writes: a read may take two if this process was held up
                assert reads >= 6 and elapsed >= 11 * 0.02 * 0.9, (reads, elapsed)
            else:
                assert reads == 1, reads
    finally:
        proc.terminate()
        proc.wait(10)
