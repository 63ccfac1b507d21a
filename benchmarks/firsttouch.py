"""Where the first touch of a stored session costs more in a large SQLite store than in a
small one, split three ways: reading the session (its row and its newest messages), the
turn's commit, and the checkpoint that copies the committed pages from the WAL into the
database (the store's background thread). Each is CPU time of the thread that does it.

`laneway bench --full` measures the first touch end to end (1,000 against 1,000,000 stored
sessions); this finds which part of it grows. The store here is laneway's own `SqlStore`,
on copies of two seeded files, touched at the same stride as the bench's `stored` phase.

    python -m benchmarks.firsttouch [--small 1000] [--large 1000000] [--turns 750]
                                    [--repeats 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.seed import AGENT, TENANT, seed_sqlite
from laneway.store.base import SessionRef, TurnRecord
from laneway.store.sql import SqlStore


async def _migrate(db: Path) -> None:
    store = SqlStore(f"sqlite:///{db}")
    await store.open()
    await store.close()


def _seeded(folder: Path, count: int) -> Path:
    db = folder / f"seeded-{count}.db"
    if not db.exists():
        asyncio.run(_migrate(db))
        seed_sqlite(db, [f"seed{i}" for i in range(count)], turns=1)
    return db


def _turn(i: int) -> TurnRecord:
    now = time.time()
    return TurnRecord(
        id=f"turn_firsttouch{i}", status="completed", created_at=now, started_at=now,
        finished_at=now, queue_wait_ms=0.0,
        messages=[{"role": "user", "content": f"question {i} " + "x" * 60},
                  {"role": "assistant", "content": f"answer {i} " + "y" * 60}],
        memories=[], response={"id": f"chatcmpl-{i}", "object": "chat.completion"},
        usage={"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60},
    )


async def _touch(db: Path, count: int, turns: int) -> dict[str, float]:
    """ms of CPU per turn: `read` and `commit` on this thread, `checkpoint` on the store's
    (all of the process's CPU that is not this thread's)."""
    store = SqlStore(f"sqlite:///{db}")
    await store.open()
    stride = max(1, count // turns)
    read = commit = 0.0
    process0 = time.process_time()
    thread0 = time.thread_time()
    for i in range(turns):
        ref = SessionRef(TENANT, AGENT, f"seed{(i * stride) % count}")
        t0 = time.thread_time()
        state = await store.load(ref, fence=0, window_tokens=4096)
        t1 = time.thread_time()
        if state.turns != 1:  # a key the seed did not write: a new session, not a touch
            raise SystemExit(f"{ref.key} is not a seeded session of {db}")
        await store.commit(state, _turn(i), fence=0)
        read += t1 - t0
        commit += time.thread_time() - t1
    await store.close()  # joins the checkpointer after its last checkpoint
    others = (time.process_time() - process0) - (time.thread_time() - thread0)
    return {name: 1000 * value / turns
            for name, value in (("read", read), ("commit", commit), ("checkpoint", others))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--turns", type=int, default=750)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="keep the seeded stores here between runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="laneway-firsttouch-") as scratch:
        folder = args.dir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        seeded = {count: _seeded(folder, count) for count in (args.small, args.large)}
        print(f"{'sessions':>10} {'read':>7} {'commit':>7} {'checkpoint':>11} {'total':>7}"
              "  (ms of CPU per turn)")
        for _ in range(args.repeats):
            for count, db in seeded.items():
                work = Path(scratch) / "touched.db"
                shutil.copyfile(db, work)
                for suffix in ("-wal", "-shm"):
                    Path(f"{work}{suffix}").unlink(missing_ok=True)
                work.read_bytes()  # into the OS's cache, as a store in use would be
                ms = asyncio.run(_touch(work, count, args.turns))
                print(f"{count:>10,} {ms['read']:>7.3f} {ms['commit']:>7.3f} "
                      f"{ms['checkpoint']:>11.3f} {sum(ms.values()):>7.3f}")


if __name__ == "__main__":
    main()
