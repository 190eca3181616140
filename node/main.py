"""``taskandgo node``: run one node until SIGTERM/SIGINT, then drain and stop."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

from taskandgo.node.config import NodeConfig, scrub_secret_env

if TYPE_CHECKING:
    from taskandgo.node.executor import Sandbox

#: prctl(2) option that sets the "dumpable" flag.
PR_SET_DUMPABLE = 4


def make_undumpable() -> str | None:
    """Clear this process's dumpable flag (Linux): other processes of the same
    user can then no longer read its /proc/<pid>/environ, mem, maps, fd or attach
    a debugger (only root with CAP_SYS_PTRACE can), and it writes no core dump.
    Processes it starts get the flag back at exec. Returns None on success, else
    why not (other systems, or prctl refused)."""
    if not sys.platform.startswith("linux"):
        return f"not on Linux ({sys.platform})"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            return f"prctl(PR_SET_DUMPABLE) failed: {os.strerror(ctypes.get_errno())}"
    except (OSError, AttributeError) as exc:
        return f"prctl unavailable: {exc}"
    return None


def probe_sandbox(cfg: NodeConfig) -> Sandbox:
    """The task sandbox this node can give (started once with the real settings)."""
    from taskandgo.node.executor import Sandbox

    extra = [os.path.dirname(argv[0]) for argv in cfg.interpreters.values()
             if argv and os.path.isabs(argv[0])]
    return Sandbox.probe(cfg.sandbox, cfg.bwrap, network=cfg.sandbox_network,
                         hide=[cfg.data_dir, *cfg.secret_files], extra_binds=extra)


def setup_logging(node_id: str, level: str | None = None) -> None:
    level = (level or os.environ.get("TASKANDGO_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO), stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s node={node_id} %(name)s: %(message)s")
    logging.getLogger("pysyncobj").setLevel(logging.WARNING)


def run_node(cfg: NodeConfig, grace_s: float = 20.0) -> int:
    from taskandgo.node import metrics
    from taskandgo.node.app import NodeApp
    from taskandgo.node.http import create_http_server, serve_in_thread
    from taskandgo.node.service import create_server

    # First: before any thread starts or secret is held longer than needed.
    undumpable = make_undumpable()
    dropped = scrub_secret_env(os.environ)
    setup_logging(cfg.node_id)
    log = logging.getLogger("taskandgo.node")
    if undumpable is not None:
        log.warning("could not make the node undumpable (%s): processes of its user can "
                    "read its memory and environment", undumpable)
    if dropped:
        log.info("secret variables dropped from the environment: %s (secrets in files "
                 "stay out of /proc/<pid>/environ entirely: use the *_FILE variables)",
                 ", ".join(dropped))
    sandbox = probe_sandbox(cfg)
    if sandbox.enabled:
        log.info("task sandbox: %s", sandbox.describe())
    elif cfg.sandbox == "require":
        log.error("refusing to start: --sandbox require and the task sandbox is %s",
                  sandbox.describe())
        return 2
    elif cfg.sandbox == "off":
        log.warning("task sandbox: %s: tasks run as this node's user and can read its "
                    "files and signal its processes", sandbox.describe())
    else:
        log.warning("task sandbox: %s: tasks run as this node's user, unisolated "
                    "(see docs/security.md, \"Task sandbox\"; --sandbox require refuses "
                    "to start instead)", sandbox.describe())
    from taskandgo.node.config import is_loopback

    if not cfg.auth.enabled and not is_loopback(cfg.bind):
        log.warning("the API on %s has no token: anyone who reaches it can run code here; "
                    "set TASKANDGO_API_TOKEN_FILE (the Helm chart does)", cfg.bind)
    elif not cfg.auth.enabled:
        log.info("API open on loopback (no token): for this machine only")
    app = NodeApp(cfg)
    # Set before app.start(): no unit can be dispatched here earlier.
    app.executor.sandbox = sandbox
    metrics.install(app)
    try:
        grpc_server, _ = create_server(app, f"{_host(cfg.bind)}:{cfg.grpc_port}")
        http_server, _ = create_http_server(app, cfg.bind, cfg.http_port)
    except OSError as exc:
        log.error("cannot bind: %s", exc)
        return 2
    from taskandgo.consensus.identity import IdentityError

    try:
        app.start()
    except IdentityError as exc:
        log.error("refusing to start: %s", exc)
        http_server.server_close()
        grpc_server.stop(None)
        return 2
    grpc_server.start()
    serve_in_thread(http_server)
    log.info("serving gRPC on %s, HTTP on %s, Raft on %s (%s)", cfg.grpc_address,
             cfg.http_address, cfg.raft_address, "voter" if cfg.is_voter else "worker")

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: draining (up to %.0f s)", signum, grace_s)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Wait with a timeout: a signal delivered to another thread only runs its
    # Python handler once the main thread wakes up, and an untimed wait never does.
    while not stop.wait(0.2):
        if app.fatal_event.is_set():
            break
    if app.fatal is not None:
        # Fail-stop: never serve diverged. Exit non-zero at once (no drain: nothing
        # this replica would report can be trusted) so Kubernetes restarts the pod and
        # an operator sees why; the data dir refuses a restart until dealt with.
        log.critical("stopped: replica diverged: %s", app.fatal)
        http_server.shutdown()
        grpc_server.stop(None)
        app.stop()
        return 3
    app.drain(grace_s)
    http_server.shutdown()
    grpc_server.stop(grace=1.0).wait(2.0)
    app.stop()
    log.info("stopped")
    return 0


def _host(bind: str) -> str:
    return f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind
