"""Instructions per request, counted by callgrind: a figure that this noisy 2-core VM does not
move (two runs of one build agree to the third digit), where CPU seconds swing by 15%
from minute to minute. It leaves out the kernel's side of system calls, so it complements
`laneway bench`'s CPU figures rather than replacing them.

The server runs under `valgrind --tool=callgrind`, gets a warm-up, then its counters are
dumped before and after `--requests` requests at concurrency 1, one session key per 20
requests, against the scripted upstream with no delay. With `--queued N`, N requests are in
flight at once, all on one key: every turn waits in the lane and is handed it.

    python -m benchmarks.instructions [--targets bare,laneway,laneway-pg-redis]
                                      [--requests 300] [--stream [--pace MS]] [--queued N]
                                      [--laneway-src DIR] [--keep DIR]

`--pace MS` has the model stream its reply one chunk per write, MS apart, as a model whose
tokens come one by one does; without it the whole stream comes in one write.

`--keep DIR` copies each target's callgrind file of the measured requests there, for
`callgrind_annotate` (which C functions and libraries the instructions go to). Names are
written uncompressed: a dump after the first refers to names by numbers defined in the
first, which `callgrind_annotate` cannot read.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks.loadgen import Job
from benchmarks.procs import Proc, Procs, free_port, wait_http
from benchmarks.targets import Launcher

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--pace", type=float, default=0.0, metavar="MS",
                        help="with --stream: one chunk per write, MS apart")
    parser.add_argument("--queued", type=int, default=0, metavar="N",
                        help="N requests in flight on one session key")
    parser.add_argument("--targets", default="bare,laneway")
    parser.add_argument("--laneway-src", type=Path, help="a src/ directory to run laneway from")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy callgrind's file of the measured requests into DIR")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="laneway-instr-") as tmp:
        procs = Procs(Path(tmp))
        try:
            port = free_port()
            upstream = procs.spawn("upstream", [sys.executable, "-m", "benchmarks.upstream",
                                                "--port", str(port)],
                                   env={"PYTHONPATH": str(ROOT)})
            base = f"http://127.0.0.1:{port}"
            wait_http(upstream, base + "/v1/models")
            loadgen = procs.spawn("loadgen", [sys.executable, "-m", "benchmarks.loadgen"],
                                  env={"PYTHONPATH": str(ROOT)}, pipe=True)
            launcher = Launcher(procs, Path(tmp), base, ROOT)
            for target in args.targets.split(","):
                try:
                    count = measure(procs, loadgen, target, launcher, Path(tmp), args)
                finally:
                    launcher.cleanup()
                how = f"{args.queued} queued on one key" if args.queued else "c1"
                kind = "stream" if args.stream else "plain"
                kind += f", paced {args.pace:g} ms" if args.pace else ""
                print(f"{target:10s} {count / 1e6:.3f} M instructions / request ({kind}, {how})",
                      flush=True)
        finally:
            procs.stop_all()


def measure(procs: Procs, loadgen: Proc, target: str, launcher: Launcher, tmp: Path,
            args: argparse.Namespace) -> float:
    port = free_port()
    upstream = launcher.upstream
    env = {"PYTHONPATH": str(ROOT)}
    if target == "bare":
        argv = [sys.executable, "-m", "benchmarks.passthrough", "--upstream", upstream,
                "--port", str(port)]
    elif target in ("laneway", "laneway-pg-redis"):
        argv = [sys.executable, "-m", "laneway", "serve", "--port", str(port),
                "--data-dir", str(tmp / target), "--upstream", upstream + "/v1",
                "--upstream-model", "bench", "--log-level", "warning"]
        if target == "laneway-pg-redis":
            argv += launcher.distributed()
        if args.laneway_src:
            env["PYTHONPATH"] = f"{args.laneway_src.resolve()}:{ROOT}"
    else:
        raise SystemExit(f"unknown target {target!r}: bare, laneway or laneway-pg-redis")
    out = tmp / f"callgrind-{target}"
    server = procs.spawn(target, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                  "--compress-strings=no", *argv], env=env)
    try:
        wait_http(server, f"http://127.0.0.1:{port}/v1/models", timeout_s=300)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        shape: dict[str, Any] = {"concurrency": args.queued, "keys": "one"} if args.queued \
            else {"concurrency": 1}
        if args.pace:
            shape["pace_ms"] = args.pace
        _load(loadgen, Job(url=url, requests=100, stream=args.stream, **shape))
        _dump(server)
        _load(loadgen, Job(url=url, requests=args.requests, stream=args.stream, **shape))
        _dump(server)
        total = _total(Path(f"{out}.2"))
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(f"{out}.2", args.keep / f"callgrind.{target}")
        return total / args.requests
    finally:
        procs.stop(server, grace_s=60)


def _load(loadgen: Proc, job: Job) -> None:
    assert loadgen.popen.stdin is not None and loadgen.popen.stdout is not None
    loadgen.popen.stdin.write(orjson.dumps(dataclasses.asdict(job)) + b"\n")
    loadgen.popen.stdin.flush()
    result = orjson.loads(loadgen.popen.stdout.readline())
    if result.get("fatal") or result.get("errors"):
        raise RuntimeError(f"the load failed: {result}")


def _dump(server: Proc) -> None:
    """Write the counters since the last dump to a new numbered file."""
    subprocess.run(["callgrind_control", "--dump", str(server.pid)], check=True,
                   capture_output=True)
    time.sleep(0.5)


def _total(path: Path) -> int:
    for _ in range(100):
        if path.exists():
            for line in path.read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        time.sleep(0.1)
    raise RuntimeError(f"callgrind wrote no {path}")


if __name__ == "__main__":
    main()
