"""Locked down: API tokens on gRPC (peers prove themselves with the peer credential:
tests/cluster/test_peer_identity.py), TLS and mTLS, the execution policy, the queue bound,
per-client rate limits, and a Raft port that drops garbage and crafted pickles."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from certs import make_cert
from harness import Cluster
from taskandgo import Client
from taskandgo.node.client import TaskAndGoError, task_spec

pytestmark = pytest.mark.cluster

TOKEN = "s3cret-token-for-tests"


def _codes(fn) -> str:
    try:
        fn()
    except TaskAndGoError as exc:
        return exc.code
    return "OK"


def test_tokens_guard_the_grpc_api_and_the_cluster_still_works(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# one per line\nother-token\n{TOKEN}\n")
    c = Cluster(tmp_path, n=3, env={"TASKANDGO_API_TOKENS_FILE": str(tokens)},
                client_kw={"token": TOKEN})
    c.start()
    try:
        c.wait_ready()
        addr = c.addr(1)
        with Client([addr], timeout_s=3, token="") as anon:
            assert _codes(lambda: anon.submit("python: 1")) == "UNAUTHENTICATED"
            assert _codes(lambda: anon.list_tasks()) == "UNAUTHENTICATED"
        with Client([addr], timeout_s=3, token="wrong") as bad:
            assert _codes(lambda: bad.node_status(addr)) == "UNAUTHENTICATED"
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        with grpc.insecure_channel(addr) as ch:  # health stays open for probes
            assert health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5).status == 1
        with c.client() as ok:
            tid = ok.submit("sh: echo $TASKANDGO_CHUNK_INDEX", shards=3)
            task = ok.wait(tid, timeout_s=30)[0]
        # The chunks ran on all three nodes: dispatch, heartbeats and results between
        # peers all carried the token.
        assert task["status"] == "succeeded"
        assert {ch["node"] for ch in task["chunks"]} == {"node-0", "node-1", "node-2"}
        res = subprocess.run([sys.executable, "-m", "taskandgo", "get", tid, "--node", addr],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "TASKANDGO_TOKEN": TOKEN}, check=False)
        assert res.returncode == 0 and "succeeded" in res.stdout, res.stderr
        res = subprocess.run([sys.executable, "-m", "taskandgo", "get", tid, "--node", addr,
                              "--timeout", "2"], capture_output=True, text=True, timeout=60,
                             check=False)
        assert res.returncode == 2 and "UNAUTHENTICATED" in res.stderr
    finally:
        c.stop()


def _cert(name: str, issuer_key=None, issuer_name=None, ca: bool = False):
    return make_cert(name, issuer_key, issuer_name, ca)


def _pki(d: Path) -> dict[str, str]:
    ca_key, ca_cert, ca_pem, _ = _cert("taskandgo-test-ca", ca=True)
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca_pem)
    for who in ("node", "client"):
        _, _, pem, key = _cert(who, ca_key, ca_cert.subject)
        (d / f"{who}.pem").write_bytes(pem)
        (d / f"{who}.key").write_bytes(key)
        out[who] = d / f"{who}.pem"
        out[who + "_key"] = d / f"{who}.key"
    return {k: str(v) for k, v in out.items()}


def test_mtls_between_nodes_and_for_clients(tmp_path: Path) -> None:
    pki = _pki(tmp_path)
    c = Cluster(tmp_path, n=3, extra=["--tls-cert", pki["node"], "--tls-key", pki["node_key"],
                                       "--tls-ca", pki["ca"], "--tls-client-auth"],
                client_kw={"tls_ca": pki["ca"], "tls_cert": pki["client"],
                           "tls_key": pki["client_key"]})
    c.start()
    try:
        c.wait_ready()
        with c.client() as ok:
            tid = ok.submit("sh: echo $TASKANDGO_CHUNK_INDEX", shards=3)
            assert ok.wait(tid, timeout_s=30)[0]["status"] == "succeeded"
        addr = c.addr(0)
        with Client([addr], timeout_s=3, tls_ca=pki["ca"], tls_cert="", tls_key="") as nocert:
            assert _codes(lambda: nocert.node_status(addr)) == "UNAVAILABLE"
        with Client([addr], timeout_s=3) as plain:
            assert _codes(lambda: plain.node_status(addr)) == "UNAVAILABLE"
        res = subprocess.run([sys.executable, "-m", "taskandgo", "status", "--node", addr,
                              "--tls-ca", pki["ca"], "--tls-cert", pki["client"],
                              "--tls-key", pki["client_key"], "--json"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
    finally:
        c.stop()


def test_policy_queue_bound_and_rate_limit(tmp_path: Path, capsys) -> None:
    c = Cluster(tmp_path, n=1, slots=1,
                extra=["--allow", "python,call", "--allow-calls", "taskandgo.node.builtins",
                       "--max-queued", "5", "--rate-limit", "20"])
    c.start()
    try:
        c.wait_ready()
        with c.client(timeout_s=5) as cl:
            for kw, field in (({"data": "sh: echo no"}, "data"), ({"argv": ["echo", "no"]}, "argv"),
                              ({"call": "os:system", "args": ["true"]}, "call")):
                with pytest.raises(TaskAndGoError) as err:
                    cl.submit_many([task_spec(strategy="batch", **kw)])
                assert err.value.code == "INVALID_ARGUMENT" and field in err.value.message
            tid = cl.submit("python: print('allowed')", strategy="batch")
            assert cl.wait(tid, timeout_s=30)[0]["result"] == "allowed"
            with pytest.raises(TaskAndGoError) as err:
                cl.submit_many([task_spec("python: import time; time.sleep(5)",
                                          strategy="batch") for _ in range(6)])
            assert err.value.code == "RESOURCE_EXHAUSTED" and "queue is full" in err.value.message
            codes = [_codes(lambda: cl.node_status(c.addr(0))) for _ in range(80)]
            assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
    finally:
        c.stop()


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_raft_port_drops_garbage_and_crafted_pickles(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    c = Cluster(tmp_path, n=3, env={"TASKANDGO_RAFT_PASSWORD": "raft-secret"})
    c.start()
    try:
        c.wait_ready()
        payloads = [os.urandom(4096), pickle.dumps(_Evil()),
                    len(pickle.dumps(_Evil())).to_bytes(4, "big") + pickle.dumps(_Evil()),
                    b"\x00" * 100000]
        for port in c.raft_ports:
            for data in payloads:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    try:
                        s.sendall(data)
                        s.settimeout(1.0)
                        s.recv(100)
                    except OSError:
                        pass
        with c.client() as cl:
            tid = cl.submit("python: print('still fine')", strategy="batch")
            assert cl.wait(tid, timeout_s=30)[0]["result"] == "still fine"
        assert not marker.exists(), "a crafted pickle ran code in a node"
        assert all(p is not None and p.poll() is None for p in c.procs)
    finally:
        c.stop()


