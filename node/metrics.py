"""``GET /metrics`` in the Prometheus text format, through prometheus_client.

Gauges are read from the node at scrape time by a custom collector (no second
copy of the state); latencies observed by the node go to histograms.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_registries: dict[int, tuple[CollectorRegistry, dict[str, Histogram]]] = {}


class _NodeCollector:
    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        app = self.app
        st = app.node_status()
        node = app.node_id
        g = GaugeMetricFamily("taskandgo_queue_depth", "Queued tasks and chunks by priority",
                              labels=["node", "priority"])
        for prio, n in st.get("queue_by_priority", {}).items():
            g.add_metric([node, str(prio)], n)
        yield g
        role = GaugeMetricFamily("taskandgo_raft_role", "1 for this node's current role",
                                 labels=["node", "role"])
        for r in ("leader", "follower", "candidate", "worker"):
            role.add_metric([node, r], 1.0 if st["role"] == r else 0.0)
        yield role
        for name, key, doc in (
            ("taskandgo_raft_term", "raft_term", "Current Raft term"),
            ("taskandgo_raft_commit_index", "commit_index", "Raft commit index"),
            ("taskandgo_raft_applied_index", "applied_index", "Raft last applied index"),
            ("taskandgo_slots", "slots", "Task slots on this node"),
            ("taskandgo_free_slots", "free_slots", "Free task slots on this node"),
            ("taskandgo_cpu_percent", "cpu_percent",
             ("CPU use of this node's container (its cgroup; else the host), "
             "percent of taskandgo_cpu_limit_cores")),
            ("taskandgo_cpu_limit_cores", "cpu_limit_cores",
             "CPUs this node may use: its cgroup's quota or cpuset, else the host's CPUs"),
            ("taskandgo_memory_percent", "memory_percent",
             "Memory in use, percent of taskandgo_memory_limit_bytes"),
            ("taskandgo_memory_used_bytes", "memory_used",
             ("Memory in use: the cgroup's working set (usage minus inactive file cache), "
             "else the host's total - available")),
            ("taskandgo_memory_limit_bytes", "memory_limit",
             "Memory this node may use: its cgroup's limit, else the host's total"),
            ("taskandgo_memory_rss_bytes", "memory_rss", "Node process resident memory"),
        ):
            m = GaugeMetricFamily(name, doc, labels=["node"])
            m.add_metric([node], float(st.get(key, 0) or 0))
            yield m
        src = GaugeMetricFamily("taskandgo_resources_source", "1 for where the CPU and "
                                "memory figures come from: cgroup (this node's container) "
                                "or host", labels=["node", "source"])
        for source in ("cgroup", "host"):
            src.add_metric([node, source], 1.0 if st.get("resources_source") == source else 0.0)
        yield src
        m = GaugeMetricFamily("taskandgo_running_units", "Units running on this node",
                              labels=["node"])
        m.add_metric([node], len(st.get("running", [])))
        yield m
        e = CounterMetricFamily("taskandgo_elections", "Times this node became leader",
                                labels=["node"])
        e.add_metric([node], app._elections)
        yield e
        h = CounterMetricFamily("taskandgo_prefetch_held_back",
                                "Units handed back unstarted from this node's prefetch window "
                                "because more urgent work arrived", labels=["node"])
        h.add_metric([node], app.held_back)
        yield h
        if app.replicated is not None:
            counts, dropped, committed = app.read(
                lambda s: (s.counts_by_status(), s.dropped_results, s.committed_results))
            t = GaugeMetricFamily("taskandgo_tasks", "Tasks by status (this replica)",
                                  labels=["node", "status"])
            for status, n in counts.items():
                t.add_metric([node, status], n)
            yield t
            d = CounterMetricFamily("taskandgo_dropped_results",
                                    "Late or duplicate results dropped by fencing", labels=["node"])
            d.add_metric([node], dropped)
            yield d
            c = CounterMetricFamily("taskandgo_committed_results", "Results committed",
                                    labels=["node"])
            c.add_metric([node], committed)
            yield c


def _registry(app: Any) -> tuple[CollectorRegistry, dict[str, Histogram]]:
    key = id(app)
    if key not in _registries:
        reg = CollectorRegistry()
        reg.register(_NodeCollector(app))
        hists = {
            "commit_latency": Histogram("taskandgo_assign_commit_seconds",
                                        "Assignment command propose-to-apply time", registry=reg),
            "dispatch_latency": Histogram("taskandgo_dispatch_seconds",
                                          "Time to hand a committed batch to workers",
                                          registry=reg),
            "run_time": Histogram("taskandgo_task_run_seconds",
                                  "Run time of committed units (leader)", registry=reg,
                                  buckets=(.001, .005, .01, .05, .1, .5, 1, 5, 30, 120, 600,
                                           3600)),
            "queue_wait": Histogram("taskandgo_queue_wait_seconds",
                                    "Submit to first dispatch (leader)", registry=reg,
                                    buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 5, 30, 300)),
            "submit_commit": Histogram("taskandgo_submit_commit_seconds",
                                       "Submit command propose-to-apply time", registry=reg),
            "schedule_lateness": Histogram(
                "taskandgo_schedule_lateness_seconds",
                "Schedule slot time to its task's creation committed (leader)", registry=reg,
                buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300)),
            "start_lateness": Histogram(
                "taskandgo_start_lateness_seconds",
                "Delayed task's start time to its release into the queue (leader)",
                registry=reg, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 60)),
        }
        fires = Counter("taskandgo_schedule_fires", "Schedule slots this node fired as leader, "
                        "by outcome (fired: a task was created; skipped_overlap: the "
                        "previous run had not ended, policy forbid; skipped_missed: a "
                        "missed slot, policy skip)", ["outcome"], registry=reg)
        _registries[key] = (reg, hists)

        def hook(name: str, v: float) -> None:
            if name in hists:
                hists[name].observe(v)
            elif name.startswith("schedule_fire:"):
                fires.labels(name.split(":", 1)[1]).inc(v)

        app.metrics_hook = hook
    return _registries[key]


def install(app: Any) -> None:
    _registry(app)


def render(app: Any) -> tuple[bytes, str]:
    reg, _ = _registry(app)
    return generate_latest(reg), CONTENT_TYPE_LATEST
