"""Leader failover: kill -9 the leader under load, time to the first newly
submitted task completing.

    python bench/failover.py [--kills 20]

A background client keeps submitting no-op tasks through the followers. Each
trial kills the leader with SIGKILL, then submits a probe task through a survivor
(retrying as the client library does) and measures from the kill to the probe's
result. The killed node is restarted and the cluster settles before the next trial.
Prints p50 and max over the trials and whether any accepted task was lost.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cluster import BenchCluster
from taskandgo import Client
from taskandgo.node.client import TaskAndGoError, task_spec

NOOP = "taskandgo.node.builtins:noop"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    args = ap.parse_args()
    cluster = BenchCluster(3, extra=["--lease", "1.5"])
    accepted: list[str] = []
    stop = threading.Event()
    times: list[float] = []
    try:
        cluster.wait_leader()

        def load() -> None:
            with Client(cluster.addrs, timeout_s=30) as c:
                while not stop.is_set():
                    spec = task_spec(call=NOOP, strategy="batch")
                    try:
                        c.submit_many([spec])
                        accepted.append(spec["id"])
                    except TaskAndGoError:
                        pass
                    time.sleep(0.01)  # ~100 tasks/s of background load

        threading.Thread(target=load, daemon=True).start()
        for k in range(args.kills):
            leader = cluster.wait_leader()
            survivors = [a for i, a in enumerate(cluster.addrs) if i != leader]
            t0 = time.perf_counter()
            cluster.kill(leader)
            with Client(survivors, timeout_s=30) as c:
                tid = c.submit(call=NOOP, strategy="batch")
                c.wait(tid, timeout_s=30)
            times.append(time.perf_counter() - t0)
            print(f"  kill {k + 1}: {times[-1] * 1000:.0f} ms to the first new result", flush=True)
            argv_i = leader
            cluster.procs[argv_i] = subprocess.Popen(cluster.argvs[argv_i],
                                                     stdout=cluster.logs[argv_i],
                                                     stderr=cluster.logs[argv_i])
        stop.set()
        cluster.wait_leader()
        with Client(cluster.addrs, timeout_s=60) as c:
            done = c.wait(list(accepted), timeout_s=120)
        lost = len(accepted) - sum(1 for t in done if t["status"] == "succeeded")
        print(f"failover: p50 {statistics.median(times) * 1000:.0f} ms, max "
              f"{max(times) * 1000:.0f} ms over {len(times)} leader kills; "
              f"{len(accepted)} tasks accepted under load, {lost} lost")
    finally:
        stop.set()
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
