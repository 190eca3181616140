"""``taskandgo node``: run one node until SIGTERM/SIGINT, then drain and stop."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from taskandgo.node.config import NodeConfig


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

    setup_logging(cfg.node_id)
    log = logging.getLogger("taskandgo.node")
    from taskandgo.node.config import is_loopback

    if not cfg.auth.enabled and not is_loopback(cfg.bind):
        log.warning("the API on %s has no token: anyone who reaches it can run code here; "
                    "set TASKANDGO_API_TOKEN_FILE (the Helm chart does)", cfg.bind)
    elif not cfg.auth.enabled:
        log.info("API open on loopback (no token): for this machine only")
    app = NodeApp(cfg)
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
