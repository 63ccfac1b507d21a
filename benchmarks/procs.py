"""The processes a benchmark run starts, and what /proc says about them.

Each child gets a session of its own, so a Ctrl-C in the terminal reaches only the runner,
which then stops every child it started by PID (SIGTERM, then SIGKILL). CPU time comes from
/proc/<pid>/stat (utime + stime, children's included) summed over the server's process tree.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


class Procs:
    """Every process of one run; `stop_all` ends those still running, newest first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._procs: list[Proc] = []

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        pipe: bool = False,
    ) -> Proc:
        """Start `argv`; with `pipe` its stdin and stdout are pipes (stderr goes to the log)."""
        log = self.workdir / f"{name}.log"
        out = log.open("wb")
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else out,
            stderr=out,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        out.close()
        proc = Proc(name, popen, log)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace_s: float = 15.0) -> None:
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        for stream in (proc.popen.stdin, proc.popen.stdout):
            if stream is not None:
                stream.close()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)


def store_seconds(url: str) -> dict[str, tuple[float, float]] | None:
    """laneway's `laneway_store_seconds` at `url` (its /metrics): op -> (count, sum), or
    None when the server has no such metric (a build from before it)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        for part, i in (("laneway_store_seconds_count{", 0), ("laneway_store_seconds_sum{", 1)):
            if line.startswith(part):
                labels, value = line[len(part):].rsplit(" ", 1)
                op = labels.split('op="', 1)[1].split('"', 1)[0]
                found.setdefault(op, [0.0, 0.0])[i] = float(value)
    return {op: (c, s) for op, (c, s) in found.items()} or None


def wait_http(proc: Proc, url: str, timeout_s: float = 60.0) -> None:
    """Until GET `url` answers 200; raises with the process's output if it dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.output()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer {url} in {timeout_s:g}s:\n{proc.output()}")


def roots(names: frozenset[str]) -> list[int]:
    """Processes named one of `names` whose parent is not: the roots of services such as
    PostgreSQL (postmaster and its backends) or Redis."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name = raw[raw.index("(") + 1 : raw.rindex(")")]
            if name in names:
                found[int(entry)] = int(raw.rsplit(")", 1)[1].split()[1])
    return [pid for pid, parent in found.items() if parent not in found]


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()  # the name in (...) may hold spaces


def tree(root: int) -> list[int]:
    """`root` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def cpu_seconds(root: int) -> float:
    """CPU time of the process tree, from every live thread's /proc/.../schedstat: in
    nanoseconds, where /proc/<pid>/stat counts 10 ms ticks, too coarse for a run of a few
    hundred sub-millisecond turns."""
    ns = 0
    for pid in tree(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                ns += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return ns / 1e9


def cpu_ticks_seconds(root: int) -> float:
    """User + system CPU of the process tree from /proc/<pid>/stat, reaped children included
    (a cross-check of `cpu_seconds` that also counts threads that have exited)."""
    ticks = 0
    for pid in tree(root):
        fields = _stat(pid)
        if fields is not None:
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / _TICK


def established(pid: int, port: int) -> int:
    """Established TCP connections that process `pid` holds on its local `port` (the clients
    a server has open)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and fields[9] in inodes and fields[1].endswith(f":{port:04X}"):
                count += 1
    return count


def memory_mb(root: int) -> tuple[float, float]:
    """(resident now, peak resident) of the process tree, in MiB."""
    rss = hwm = 0
    for pid in tree(root):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
    return rss / 1024, hwm / 1024
