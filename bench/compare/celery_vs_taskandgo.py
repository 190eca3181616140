"""Celery 5 + Redis vs TaskAndGo, the same workloads side by side, in one go.

    python bench/compare/celery_vs_taskandgo.py [--tasks 10000] [--runs 3] [--quick]

What it does (see README.md next to this file):

1. Installs what is missing: ``pip install 'celery[redis]>=5.3'`` and, as root,
   ``apt-get install -y redis-server`` (Debian's package).
2. Starts ``redis-server`` on 127.0.0.1 (free port, no persistence) and a Celery worker
   (``--pool prefork --concurrency 2``) on a tiny tasks module written to a temp dir.
3. Runs on Celery, then on a local 3-node TaskAndGo cluster (bench/_cluster.py):
   (a) throughput: N no-op tasks from one client, first submit to last result;
   (b) submit-to-result latency p50/p99 at a steady 200 tasks/s;
   (c) a 100-chunk fan-out, submit to gathered result.
   Prints one line per workload with both figures and the ratio TaskAndGo / Celery.
4. Stops everything it started, by pid, in ``finally`` (also on SIGTERM / Ctrl-C).

All traffic stays on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
sys.path.insert(0, str(BENCH))

NOOP = "taskandgo.node.builtins:noop"
RATE = 200.0

TASKS_MODULE = textwrap.dedent('''
    """Tiny Celery tasks module for bench/compare (written to a temp dir at run time)."""
    import os
    import time

    from celery import Celery

    _url = os.environ["BENCH_REDIS_URL"]
    app = Celery("bench_tasks", broker=_url + "/0", backend=_url + "/1")
    app.conf.update(broker_connection_retry_on_startup=True, result_expires=3600,
                    worker_hijack_root_logger=False)


    @app.task
    def noop(*args, **kwargs):
        return None


    @app.task
    def sleep10(*args, **kwargs):
        time.sleep(0.01)
        return 0.01


    @app.task
    def gather(results):
        return len(results)
''')


# --------------------------------------------------------------------------- setup


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def ensure_deps() -> None:
    if importlib.util.find_spec("celery") is None or importlib.util.find_spec("redis") is None:
        log("installing celery[redis]>=5.3 from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "celery[redis]>=5.3"],
                       check=True, timeout=600)
        importlib.invalidate_caches()
    if shutil.which("redis-server") is None:
        if os.geteuid() != 0:
            raise SystemExit("redis-server missing and not root: apt-get install -y redis-server")
        log("installing Debian's redis-server")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        r = subprocess.run(["apt-get", "install", "-y", "redis-server"], env=env, timeout=900,
                           check=False)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=True, timeout=900)
            subprocess.run(["apt-get", "install", "-y", "redis-server"], env=env, check=True,
                           timeout=900)
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server still not found after apt-get install")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def descendants(root: int) -> list[int]:
    """Pids below ``root`` (read from /proc, so they can be stopped by pid afterwards)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            parent[int(d)] = int(stat[stat.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = [], [root]
    for _ in range(64):  # bounded depth
        nxt = [p for p, pp in parent.items() if pp in frontier]
        if not nxt:
            break
        out += nxt
        frontier = nxt
    return out


def stop_pid_tree(proc: subprocess.Popen | None, name: str, grace_s: float = 10.0) -> None:
    """SIGTERM a process we started, wait, then SIGKILL it and any children it left, by pid."""
    if proc is None:
        return
    kids = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    deadline = time.monotonic() + 3
    for pid in kids:
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
            log(f"{name}: killed leftover child {pid}")
        except (ProcessLookupError, PermissionError):
            pass


class Started:
    """Everything this script started, so ``finally`` can stop it by pid."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="taskandgo-compare-")
        self.redis: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.cluster = None
        self.port = 0

    def start_redis(self) -> str:
        self.port = free_port()
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                "--save", "", "--appendonly", "no", "--protected-mode", "yes",
                "--dir", self.tmp, "--logfile", os.path.join(self.tmp, "redis.log")]
        self.redis = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        url = f"redis://127.0.0.1:{self.port}"
        r = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 15
        while True:
            try:
                if r.ping():
                    break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline or self.redis.poll() is not None:
                raise RuntimeError("redis-server did not come up")
            time.sleep(0.05)
        r.close()
        log(f"redis-server pid {self.redis.pid} on 127.0.0.1:{self.port}")
        return url

    def start_worker(self, url: str):
        Path(self.tmp, "bench_tasks.py").write_text(TASKS_MODULE)
        env = dict(os.environ, BENCH_REDIS_URL=url,
                   PYTHONPATH=self.tmp + os.pathsep + os.environ.get("PYTHONPATH", ""))
        os.environ["BENCH_REDIS_URL"] = url
        argv = [sys.executable, "-m", "celery", "-A", "bench_tasks", "worker",
                "--pool", "prefork", "--concurrency", "2", "--loglevel", "WARNING",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "--hostname", f"bench{self.port}@127.0.0.1"]
        wlog = open(os.path.join(self.tmp, "celery-worker.log"), "ab")  # noqa: SIM115 (the worker keeps it)
        self.worker = subprocess.Popen(argv, cwd=self.tmp, env=env, stdout=wlog, stderr=wlog)
        sys.path.insert(0, self.tmp)
        import bench_tasks  # the module just written

        # Ready when a no-op round-trips (bounded).
        deadline = time.monotonic() + 60
        while True:
            if self.worker.poll() is not None:
                raise RuntimeError(f"celery worker exited; see {self.tmp}/celery-worker.log")
            try:
                bench_tasks.noop.delay().get(timeout=5)
                break
            except Exception:  # noqa: BLE001  (celery TimeoutError while booting)
                if time.monotonic() > deadline:
                    raise RuntimeError("celery worker not ready in 60 s") from None
        log(f"celery worker pid {self.worker.pid} (prefork, concurrency 2)")
        return bench_tasks

    def stop_celery(self) -> None:
        stop_pid_tree(self.worker, "celery worker", grace_s=15)
        self.worker = None
        stop_pid_tree(self.redis, "redis-server")
        self.redis = None

    def stop_cluster(self) -> None:
        c = self.cluster
        if c is None:
            return
        # Each node by its pid, waiting for its process tree; its call workers end with it.
        for i, p in enumerate(c.procs):
            if p is not None:
                stop_pid_tree(p, f"node-{i}")
        for f in c.logs:
            f.close()
        self.cluster = None

    def stop_all(self) -> None:
        for step in (self.stop_celery, self.stop_cluster):
            try:
                step()
            except Exception as e:  # noqa: BLE001  (keep stopping the rest)
                log(f"cleanup error: {e!r}")


# --------------------------------------------------------------------------- Celery


def celery_throughput(bt, n: int) -> float:
    from celery import group

    t0 = time.perf_counter()
    res = group(bt.noop.s() for _ in range(n)).apply_async()
    res.get(timeout=max(120, n / 50), propagate=True)
    dt = time.perf_counter() - t0
    res.forget()
    return n / dt


def celery_single(bt, n: int) -> tuple[float, float]:
    """N ``noop.delay()`` calls in a loop from one caller, then every result:
    (submit calls per second, tasks per second to the last result)."""
    t0 = time.perf_counter()
    results = [bt.noop.delay() for _ in range(n)]
    t1 = time.perf_counter()
    for r in results:
        r.get(timeout=max(120, n / 50))
    t2 = time.perf_counter()
    for r in results:
        r.forget()
    return n / (t1 - t0), n / (t2 - t0)


def celery_latency(bt, url: str, rate: float, seconds: float) -> tuple[float, float, int]:
    """Open-loop submits at ``rate``; a result is seen when the Redis result backend
    publishes it (the pub/sub message Celery's own AsyncResult.get waits on)."""
    import redis

    seen: dict[str, float] = {}
    started: dict[str, float] = {}
    r = redis.Redis(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]), db=1)
    ps = r.pubsub(ignore_subscribe_messages=True)
    ps.psubscribe("celery-task-meta-*")
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            m = ps.get_message(timeout=0.2)
            if m and m["type"] == "pmessage":
                t = time.perf_counter()
                ch = m["channel"].decode()
                tid = ch[len("celery-task-meta-"):]
                if tid not in seen and b'"SUCCESS"' in m["data"]:
                    seen[tid] = t

    th = threading.Thread(target=listen, daemon=True)
    th.start()
    time.sleep(0.3)
    n = int(rate * seconds)
    t_start = time.perf_counter()
    for i in range(n):
        delay = t_start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        res = bt.noop.apply_async()
        started[res.id] = t0
    deadline = time.monotonic() + 60
    while len([k for k in started if k in seen]) < len(started) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    th.join(5)
    ps.close()
    r.close()
    lat = sorted((seen[k] - started[k]) * 1000 for k in started if k in seen)
    return (statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))], len(lat))


def celery_fanout(bt, chunks: int) -> float:
    from celery import chord

    t0 = time.perf_counter()
    res = chord(bt.noop.s() for _ in range(chunks))(bt.gather.s())
    got = res.get(timeout=60)
    dt = time.perf_counter() - t0
    assert got == chunks, got
    return dt * 1000


# --------------------------------------------------------------------------- TaskAndGo


def tg_fanout(addrs: list[str], chunks: int) -> float:
    from taskandgo import Client
    from taskandgo.node.client import task_spec

    with Client(addrs, timeout_s=60) as c:
        spec = task_spec(call=NOOP, strategy="split", shards=chunks)
        t0 = time.perf_counter()
        c.submit_many([spec])
        out = c.wait([spec["id"]], timeout_s=60)
        dt = time.perf_counter() - t0
    if out[0]["status"] != "succeeded":
        raise RuntimeError(f"split task ended {out[0]['status']}")
    return dt * 1000


# --------------------------------------------------------------------------- main


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes (1,000 tasks, 1 run, 2 s)")
    args = ap.parse_args()
    tasks, runs, seconds, chunks = args.tasks, args.runs, 5.0, 100
    if args.quick:
        tasks, runs, seconds = min(tasks, 1000), 1, 2.0

    ensure_deps()
    st = Started()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    res: dict[str, dict[str, float]] = {"celery": {}, "tg": {}}
    try:
        # ---- Celery + Redis
        url = st.start_redis()
        bt = st.start_worker(url)
        tps = [celery_throughput(bt, tasks) for _ in range(runs)]
        log(f"celery throughput runs: {[round(x) for x in tps]}")
        singles = [celery_single(bt, tasks) for _ in range(runs)]
        log(f"celery single-call runs: {[(round(a), round(b)) for a, b in singles]}")
        res["celery"]["single_submit"] = med([x[0] for x in singles])
        res["celery"]["single_tps"] = med([x[1] for x in singles])
        lats = [celery_latency(bt, url, RATE, seconds) for _ in range(runs)]
        log(f"celery latency runs: {[(round(a, 2), round(b, 2), k) for a, b, k in lats]}")
        fan = [celery_fanout(bt, chunks) for _ in range(max(runs, 3))]
        log(f"celery fan-out runs (ms): {[round(x) for x in fan]}")
        res["celery"].update({"tps": med(tps), "p50": med([x[0] for x in lats]),
                              "p99": med([x[1] for x in lats]), "fan": med(fan)})
        st.stop_celery()

        # ---- TaskAndGo, local 3-node cluster
        from _cluster import BenchCluster
        from throughput import latency as tg_latency
        from throughput import single_calls as tg_single
        from throughput import throughput as tg_throughput

        st.cluster = BenchCluster(3)
        st.cluster.wait_leader()
        addrs = st.cluster.addrs
        tps = [tg_throughput(addrs, tasks) for _ in range(runs)]
        log(f"taskandgo throughput runs: {[round(x) for x in tps]}")
        singles = [tg_single(addrs, tasks) for _ in range(runs)]
        log(f"taskandgo single-call runs: {[(round(a), round(b)) for a, b in singles]}")
        res["tg"]["single_submit"] = med([x[0] for x in singles])
        res["tg"]["single_tps"] = med([x[1] for x in singles])
        lats = [tg_latency(addrs, RATE, seconds) for _ in range(runs)]
        log(f"taskandgo latency runs: {[(round(a, 2), round(b, 2), k) for a, b, k in lats]}")
        fan = [tg_fanout(addrs, chunks) for _ in range(max(runs, 3))]
        log(f"taskandgo fan-out runs (ms): {[round(x) for x in fan]}")
        res["tg"].update({"tps": med(tps), "p50": med([x[0] for x in lats]),
                          "p99": med([x[1] for x in lats]), "fan": med(fan)})
    finally:
        st.stop_all()

    c, t = res["celery"], res["tg"]

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    mode = f"{runs} run(s), medians; Celery: Redis + 2 prefork; TaskAndGo: 3 Raft nodes"
    print(f"# {mode}")
    print(f"throughput ({tasks} no-op tasks): TaskAndGo {t['tps']:.0f} tasks/s, Celery "
          f"{c['tps']:.0f} tasks/s, ratio {ratio(t['tps'], c['tps']):.2f}x (higher is better)")
    print(f"single-call loop ({tasks} submit() calls, then wait): TaskAndGo "
          f"{t['single_submit']:.0f} submits/s ({t['single_tps']:.0f} tasks/s to the last result), "
          f"Celery {c['single_submit']:.0f} submits/s ({c['single_tps']:.0f} tasks/s), ratio "
          f"{ratio(t['single_tps'], c['single_tps']):.2f}x (higher is better)")
    print(f"latency p50 at {RATE:.0f} tasks/s for {seconds:g} s: TaskAndGo {t['p50']:.1f} ms, "
          f"Celery {c['p50']:.1f} ms, ratio {ratio(t['p50'], c['p50']):.2f}x (lower is better)")
    print(f"latency p99 at {RATE:.0f} tasks/s for {seconds:g} s: TaskAndGo {t['p99']:.1f} ms, "
          f"Celery {c['p99']:.1f} ms, ratio {ratio(t['p99'], c['p99']):.2f}x (lower is better)")
    print(f"fan-out {chunks} chunks gathered: TaskAndGo {t['fan']:.0f} ms, Celery "
          f"{c['fan']:.0f} ms, ratio {ratio(t['fan'], c['fan']):.2f}x (lower is better)")
    print("json " + json.dumps({"celery": c, "taskandgo": t, "tasks": tasks, "runs": runs,
                                "rate": RATE, "seconds": seconds, "chunks": chunks}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
