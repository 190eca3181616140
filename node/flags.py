"""The flags of ``taskandgo node``; each defaults to its TASKANDGO_* variable, read
and range-checked by :func:`taskandgo.node.config.config_from`.
"""

from __future__ import annotations

import argparse

from taskandgo.node.config import SANDBOX_MODES
from taskandgo.strategies import STRATEGIES


def add_node_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``taskandgo node``; each defaults to its TASKANDGO_* variable."""
    p.add_argument("--id", dest="node_id", help="node id (TASKANDGO_NODE_ID; default hostname)")
    p.add_argument("--bind", help="address to bind every port (TASKANDGO_BIND; 127.0.0.1)")
    p.add_argument("--advertise", help="host peers reach this node at "
                   "(TASKANDGO_ADVERTISE; default: the bind address, or the pod's DNS name)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (TASKANDGO_GRPC_PORT; 7000)")
    p.add_argument("--raft-port", type=int, help="Raft port (TASKANDGO_RAFT_PORT; 7100)")
    p.add_argument("--http-port", type=int, help="HTTP port (TASKANDGO_HTTP_PORT; 8080)")
    p.add_argument("--voters", help="Raft members, host:grpc_port:raft_port,... "
                   "(TASKANDGO_VOTERS; default: this node alone, or the StatefulSet's first "
                   "TASKANDGO_VOTER_COUNT pods)")
    p.add_argument("--data-dir", help="journal directory (TASKANDGO_DATA_DIR; ./taskandgo-data)")
    p.add_argument("--slots", type=int, help="tasks run at once (TASKANDGO_SLOTS; 4)")
    p.add_argument("--strategy", choices=STRATEGIES,
                   help="default strategy (SCHEDULER_STRATEGY or TASKANDGO_STRATEGY; split)")
    p.add_argument("--lease", type=float, dest="lease_s",
                   help="seconds without heartbeat before a worker's tasks are requeued "
                   "(TASKANDGO_LEASE_S; 3)")
    p.add_argument("--default-runner", help="how data without a language prefix runs: "
                   "'echo' (the data is the result) or a prefix such as 'sh' "
                   "(TASKANDGO_DEFAULT_RUNNER; echo)")
    p.add_argument("--interpreter", action="append", default=None, metavar="PREFIX=CMD",
                   help="add or override a payload prefix, e.g. 'node=node -e' "
                   "(TASKANDGO_INTERPRETERS='p1=cmd;p2=cmd')")
    p.add_argument("--output-limit", type=int, help="bytes of a unit's stdout kept in its "
                   "result; beyond that the result is marked truncated with the byte count "
                   "(TASKANDGO_OUTPUT_LIMIT; 65536)")
    p.add_argument("--keep-output-bytes", type=int, help="bytes of each unit's full output "
                   "(stdout and stderr) this node keeps on disk for `taskandgo output`; "
                   "0 keeps none (TASKANDGO_KEEP_OUTPUT_BYTES; 16777216)")
    p.add_argument("--keep-output-total", type=int, help="bytes of kept output on this node "
                   "in all, the oldest evicted first; 0 keeps none "
                   "(TASKANDGO_KEEP_OUTPUT_TOTAL; 1073741824)")
    p.add_argument("--retention", type=float, dest="retention_s",
                   help="seconds finished tasks are kept (TASKANDGO_RETENTION_S; 86400)")
    p.add_argument("--max-finished", type=int,
                   help="finished tasks kept at most (TASKANDGO_MAX_FINISHED; 100000)")
    p.add_argument("--allow", help="payload kinds this node runs: prefixes plus argv and call, "
                   "e.g. 'python,sh,call' (TASKANDGO_ALLOW; default: all)")
    p.add_argument("--allow-calls", help="module prefixes callables may come from, comma "
                   "separated (TASKANDGO_ALLOW_CALLS; default: any)")
    p.add_argument("--cpu", dest="offer_cpu", help="CPU cores this node offers units that "
                   "request cpu (TASKANDGO_CPU; default: the container's CPU limit, else the "
                   "machine's CPUs)")
    p.add_argument("--memory", dest="offer_memory", help="memory this node offers units, "
                   "e.g. 8Gi (TASKANDGO_MEMORY; default: the container's memory limit, else "
                   "the machine's memory)")
    p.add_argument("--resource", dest="resources", action="append", default=None,
                   metavar="NAME=N", help="a named resource this node offers, e.g. gpu=1; "
                   "repeat for more (TASKANDGO_RESOURCES='gpu=1,fpga=2')")
    p.add_argument("--node-label", dest="node_labels", action="append", default=None,
                   metavar="KEY=VALUE", help="a label tasks can require or prefer, e.g. "
                   "zone=a; repeat for more (TASKANDGO_NODE_LABELS='zone=a,disk=ssd')")
    p.add_argument("--prefetch", type=int, help="units this node may hold beyond its slots, "
                   "waiting to start (TASKANDGO_PREFETCH; 128). The leader fills a window "
                   "with about 0.2 s of work per slot at recent run times (none for tasks "
                   "of a second or more), and only while all queued and running work has "
                   "one priority; a more urgent submit has waiting units handed back "
                   "first. 0 turns it off")
    p.add_argument("--rate-limit", type=float, help="requests per second per client IP on the "
                   "public API; 0 = off (TASKANDGO_RATE_LIMIT; 0)")
    p.add_argument("--max-queued", type=int, help="queued tasks at most; submits beyond get "
                   "RESOURCE_EXHAUSTED (TASKANDGO_MAX_QUEUED; 1000000)")
    p.add_argument("--http-allowed-hosts", help="names (Host headers) the HTTP server answers "
                   "to besides its own addresses: comma separated host names, .domain "
                   "suffixes, IP addresses or networks; * for any "
                   "(TASKANDGO_HTTP_ALLOWED_HOSTS; default: none)")
    p.add_argument("--peer-rate-limit", type=float, help="peer API calls per second each "
                   "peer may make, bursts of twice that; 0 = off (TASKANDGO_PEER_RATE_LIMIT; "
                   "1000)")
    p.add_argument("--max-workers", type=int, help="worker nodes the leader keeps track of "
                   "at most; heartbeats of further nodes are refused with RESOURCE_EXHAUSTED "
                   "(TASKANDGO_MAX_WORKERS; 1000)")
    p.add_argument("--peer-cert-names", help="with --tls-client-auth: DNS names (or *.domain) "
                   "one of which a peer's client certificate must carry to use the peer API, "
                   "comma separated (TASKANDGO_PEER_CERT_NAMES; default: any certificate the "
                   "CA signed)")
    p.add_argument("--max-streams", type=int, help="open event streams (gRPC WatchTasks, "
                   "HTTP /api/v1/events) this node serves at once, per protocol; more are "
                   "refused with RESOURCE_EXHAUSTED / 429 (TASKANDGO_MAX_STREAMS; 32)")
    p.add_argument("--max-streams-per-client", type=int, help="open event streams one client "
                   "address may hold, per protocol (TASKANDGO_MAX_STREAMS_PER_CLIENT; 8)")
    p.add_argument("--grpc-threads", type=int, help="gRPC server threads kept for unary and "
                   "peer calls; the server runs this many plus --max-streams "
                   "(TASKANDGO_GRPC_THREADS; 32)")
    p.add_argument("--max-waits", type=int, help="blocking waits (gRPC WaitTasks, HTTP "
                   "/api/v1/wait) this node serves at once, per protocol; more are refused "
                   "with RESOURCE_EXHAUSTED / 429 (TASKANDGO_MAX_WAITS; 16)")
    p.add_argument("--max-waits-per-client", type=int, help="blocking waits one client "
                   "address may have open, per protocol (TASKANDGO_MAX_WAITS_PER_CLIENT; 8)")
    p.add_argument("--http-request-timeout", type=float, dest="http_request_timeout_s",
                   help="seconds an HTTP client has to send a request's headers and body; "
                   "slower requests get 408 and are closed (TASKANDGO_HTTP_REQUEST_TIMEOUT_S; "
                   "10)")
    p.add_argument("--tls-cert", help="PEM certificate for gRPC and HTTP (TASKANDGO_TLS_CERT)")
    p.add_argument("--tls-key", help="PEM private key (TASKANDGO_TLS_KEY)")
    p.add_argument("--tls-ca", help="PEM CA bundle that signs peers' and clients' certificates "
                   "(TASKANDGO_TLS_CA)")
    p.add_argument("--tls-client-auth", action="store_true", default=None,
                   help="require client certificates, mTLS (TASKANDGO_TLS_CLIENT_AUTH)")
    p.add_argument("--election-timeout", dest="election_timeout",
                   help="Raft election timeout range in seconds, MIN-MAX "
                   "(TASKANDGO_ELECTION_TIMEOUT; 0.3-0.6)")
    p.add_argument("--append-entries-period", type=float, dest="append_entries_s",
                   help="leader's replication/heartbeat period in seconds "
                   "(TASKANDGO_APPEND_ENTRIES_S; 0.005)")
    p.add_argument("--snapshot-interval", type=float, dest="snapshot_interval_s",
                   help="seconds between Raft snapshots, which also compact the journal; "
                   "one is written sooner after 100,000 log entries "
                   "(TASKANDGO_SNAPSHOT_INTERVAL_S; 600)")
    p.add_argument("--fsync", choices=("always", "never"),
                   help="always: a task is acknowledged only once its Raft entry is on stable "
                   "storage of a majority (survives power loss); never: faster, and a power cut "
                   "on a majority may lose acknowledged tasks (TASKANDGO_FSYNC; always)")
    p.add_argument("--sandbox", choices=SANDBOX_MODES,
                   help="run subprocess tasks (language prefixes, argv) in a bubblewrap "
                   "sandbox: own PID/IPC/mount namespaces, private /tmp and working dir, "
                   "read-only system dirs, no view of this node's data dir, secrets or "
                   "processes. auto: when bubblewrap works here, else run them as this "
                   "node's user and say so; require: refuse to start without it; off "
                   "(TASKANDGO_SANDBOX; auto)")
    p.add_argument("--sandbox-network", choices=("on", "off"),
                   help="off: sandboxed tasks get a private network namespace with no "
                   "interfaces but loopback (TASKANDGO_SANDBOX_NETWORK; on)")
