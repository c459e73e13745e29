"""python -m benchmarks.lockbench — the local claim lock: a blocking fcntl.flock against the filelock package.

Two processes each take the lock 200 times, hold it 2 ms (count the trials, ask for one) and run a 5 ms "trial"
between claims, as two workers of a sweep of short trials do. Prints the wall time and the time spent waiting.
"""
from __future__ import annotations

import fcntl
import multiprocessing
import tempfile
import time
from pathlib import Path


def _worker(kind: str, path: str, n: int, out) -> None:
    if kind == "fcntl":
        f = open(path, "a+")
        acquire, release = (lambda: fcntl.flock(f, fcntl.LOCK_EX)), (lambda: fcntl.flock(f, fcntl.LOCK_UN))
    else:
        from filelock import FileLock  # installed with torch

        lock, poll = FileLock(path, thread_local=False), float(kind.split(":")[1])
        acquire, release = (lambda: lock.acquire(poll_interval=poll)), (lambda: lock.release(force=True))
    waited = 0.0
    for _ in range(n):
        start = time.perf_counter()
        acquire()
        waited += time.perf_counter() - start
        time.sleep(0.002)
        release()
        time.sleep(0.005)
    out.put(waited)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("fcntl", "filelock:0.05", "filelock:0.001"):
            out = multiprocessing.Queue()
            start = time.perf_counter()
            procs = [multiprocessing.Process(target=_worker, args=(kind, str(Path(tmp) / f"{kind}.lock"), 200, out))
                     for _ in range(2)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            print(f"{kind:15s} wall {time.perf_counter() - start:.2f} s, waiting {out.get() + out.get():.2f} s")


if __name__ == "__main__":
    main()
