#!/usr/bin/env python3
"""Per-operation commit against group commit, on the store directly (no FUSE).

Runs the same workload (creates, then 4 KiB writes) with 1, 2, 4 and 8 threads against
a store committing each op in its own transaction and against one batching the ops of
concurrent threads into one transaction, and prints ops/s and the ratio group/per-op.
Usage: python scripts/bench_commit.py [--ops N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from journal import ops  # noqa: E402
from journal.store import Store  # noqa: E402


def run(store: Store, threads: int, per_thread: int, kind: str) -> float:
    base = 10_000_000 * (1 + threads) + (0 if kind == "create" else 5_000_000)
    data = os.urandom(4096)
    if kind == "write":
        for t in range(threads):
            store.commit(ops.MakeNode(parent=1, ino=base + t, mode=stat.S_IFREG | 0o644, rdev=0,
                                      uid=0, gid=0, time_ns=0, name=f"w{threads}-{t}".encode()))

    def worker(t: int) -> None:
        for i in range(per_thread):
            if kind == "create":
                ino = base + t * per_thread + i
                store.commit(ops.MakeNode(parent=1, ino=ino, mode=stat.S_IFREG | 0o644, rdev=0, uid=0,
                                          gid=0, time_ns=time.time_ns(), name=f"c{ino}".encode()))
            else:
                store.commit(ops.Write(ino=base + t, offset=(i % 256) * 4096, time_ns=time.time_ns(),
                                       data=data))

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return threads * per_thread / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=8000, help="operations per run (split over threads)")
    parser.add_argument("--workdir", default=None, help="where to put the stores (default: /var/tmp)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tandemfs-commit-", dir=args.workdir or "/var/tmp"))
    try:
        print(f"{'workload':<10} {'threads':>7} {'per-op ops/s':>13} {'group ops/s':>12} "
              f"{'group/per-op':>13}")
        for kind in ("create", "write"):
            for threads in (1, 2, 4, 8):
                rates = {}
                for group in (False, True):
                    path = work / f"{kind}-{threads}-{group}"
                    with Store.create(path, group_commit=group) as store:
                        rates[group] = run(store, threads, args.ops // threads, kind)
                    shutil.rmtree(path)
                print(f"{kind:<10} {threads:>7} {rates[False]:>13.0f} {rates[True]:>12.0f} "
                      f"{rates[True] / rates[False]:>12.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
