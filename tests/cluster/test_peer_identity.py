"""Peers have their own identity: a client's API token cannot act as a peer.

Real node processes on loopback with a Raft password and an API token. Each attack a
client once made on the peer API (forge a running task's result, register a ghost
worker, make a follower run a payload with no task record, hold urgent work) is tried
with the API token and must be refused and change nothing; a holder of the peer
credential is still bound to its own units (results, heartbeats, dispatches checked
against the replicated state and the leader) and cannot guess a fencing token. The
legitimate cluster still runs tasks on every node, across a leader failover.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from certs import make_cert
from harness import Cluster, wait_for
from taskandgo import Client
from taskandgo.protos import peer_pb2, peer_pb2_grpc

pytestmark = pytest.mark.cluster

TOKEN = "client-api-token-for-peer-tests"
PASSWORD = "raft-secret-for-peer-tests"
TOKEN_MD = (("authorization", f"Bearer {TOKEN}"),)
PEER_METHODS = [m.name for m in peer_pb2.DESCRIPTOR.services_by_name["Peer"].methods]


def peer_md(node_id: str, grpc_address: str, password: str = PASSWORD) -> tuple:
    """What a node sends on the peer API, computed as docs/security.md describes it:
    HMAC-SHA256 of the Raft password under a fixed label, plus who is calling."""
    cred = hmac.new(password.encode(), b"taskandgo peer credential v1",
                    hashlib.sha256).hexdigest()
    return (("x-taskandgo-peer-auth", cred), ("x-taskandgo-peer-id", node_id),
            ("x-taskandgo-peer-grpc", grpc_address))


def call(addr: str, method: str, request: Any, metadata: tuple, timeout_s: float = 10.0,
         creds: grpc.ChannelCredentials | None = None) -> tuple[str, Any]:
    """One Peer call; returns (status code name, response or None)."""
    ch = grpc.secure_channel(addr, creds) if creds else grpc.insecure_channel(addr)
    with ch:
        try:
            resp = getattr(peer_pb2_grpc.PeerStub(ch), method)(request, metadata=metadata,
                                                                timeout=timeout_s)
            return "OK", resp
        except grpc.RpcError as exc:
            return exc.code().name, None


def empty_request(method: str) -> Any:
    return {"Dispatch": peer_pb2.DispatchRequest, "ReportResults": peer_pb2.ReportResultsRequest,
            "Heartbeat": peer_pb2.HeartbeatRequest, "Kill": peer_pb2.KillRequest,
            "Hold": peer_pb2.HoldRequest}[method]()


def ghost_heartbeat(i: int, accepting: bool = True) -> peer_pb2.HeartbeatRequest:
    return peer_pb2.HeartbeatRequest(
        node_id=f"ghost-{i}", grpc_address=f"127.0.0.9:{20000 + i}", slots=64, free_slots=64,
        capacity=64, accepting=accepting, raft_protocol=3)


def node_ids(c: Cluster) -> list[str]:
    with c.client() as cl:
        return sorted(n["id"] for n in cl.cluster_status()["nodes"])


def stays_false(cond: Callable[[], bool], seconds: float) -> bool:
    """True if cond stays false for `seconds` (bounded poll): for outcomes that must
    not happen, such as a forged payload creating its marker file."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return False
        time.sleep(0.05)
    return not cond()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory):
    """Four nodes (three voters, one worker only) with a Raft password and an API token."""
    root = tmp_path_factory.mktemp("peer")
    c = Cluster(root, n=4, voters=3, env={"TASKANDGO_RAFT_PASSWORD": PASSWORD,
                                          "TASKANDGO_API_TOKEN": TOKEN},
                client_kw={"token": TOKEN})
    c.start()
    try:
        c.wait_ready()
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def test_api_token_authorises_no_peer_method(secured: Cluster) -> None:
    """Every Peer method, on every node: an API token gets PERMISSION_DENIED; nothing,
    a wrong credential or the credential of another password gets UNAUTHENTICATED; the
    peer credential does not open the client API."""
    for i in range(secured.n):
        addr = secured.addr(i)
        for method in PEER_METHODS:
            req = empty_request(method)
            assert call(addr, method, req, TOKEN_MD)[0] == "PERMISSION_DENIED", (i, method)
            spoof = TOKEN_MD + (("x-taskandgo-peer-id", "node-0"),
                                ("x-taskandgo-peer-grpc", secured.addr(0)))
            assert call(addr, method, req, spoof)[0] == "PERMISSION_DENIED", (i, method)
            assert call(addr, method, req, ())[0] == "UNAUTHENTICATED", (i, method)
            wrong = peer_md("node-0", secured.addr(0), password="not-the-password")
            assert call(addr, method, req, wrong)[0] == "UNAUTHENTICATED", (i, method)
    with grpc.insecure_channel(secured.addr(0)) as ch:
        from taskandgo.protos import taskandgo_pb2, taskandgo_pb2_grpc
        with pytest.raises(grpc.RpcError) as err:
            taskandgo_pb2_grpc.SchedulerStub(ch).GetNodeStatus(
                taskandgo_pb2.NodeStatusRequest(), timeout=5,
                metadata=peer_md("node-0", secured.addr(0)))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_forged_results_are_refused_and_tokens_cannot_be_guessed(secured: Cluster) -> None:
    with secured.client() as cl:
        tid = cl.submit("python: import time; time.sleep(60)", strategy="batch")
        task = wait_for(lambda: (t := cl.get(tid))["status"] == "running" and t["node"] and t,
                        30, "the task to run")
        owner = int(task["node"].split("-")[1])
        other = next(i for i in range(secured.n) if i != owner)
        leader = secured.leader_index()
        assert leader is not None

        def forged(tokens: range, node: str) -> peer_pb2.ReportResultsRequest:
            return peer_pb2.ReportResultsRequest(results=[peer_pb2.Result(
                task_id=tid, chunk=-1, attempt=1, token=t, ok=True, result="forged",
                node=node, finished_at=time.time()) for t in tokens])

        # A client with the API token, guessing sequential tokens as the red team did.
        code, _ = call(secured.addr(leader), "ReportResults",
                       forged(range(1, 301), task["node"]), TOKEN_MD)
        assert code == "PERMISSION_DENIED"
        # A peer (it has the credential) reporting another node's unit: refused.
        code, resp = call(secured.addr(leader), "ReportResults",
                          forged(range(1, 301), f"node-{other}"),
                          peer_md(f"node-{other}", secured.addr(other)))
        assert code == "OK" and resp.accepted and resp.refused == 300
        # Even speaking as the unit's own node, counter-like tokens do not match: the
        # leader drew a random 63-bit token, and takes only results of the attempt the
        # unit runs now (its token), so every guess is refused at the door.
        code, resp = call(secured.addr(leader), "ReportResults",
                          forged(range(1, 2001), task["node"]),
                          peer_md(task["node"], secured.addr(owner)))
        assert code == "OK" and resp.accepted and resp.refused == 2000
        with Client([secured.addr(leader)], timeout_s=10, token=TOKEN) as at_leader:
            now = at_leader.get(tid)  # the leader's replica holds every committed result
        assert now["status"] == "running" and now["result"] != "forged", now
        cl.cancel(tid)


def test_no_ghost_worker_is_admitted(secured: Cluster) -> None:
    leader = secured.leader_index()
    assert leader is not None
    before = node_ids(secured)
    for i in range(50):
        code, _ = call(secured.addr(leader), "Heartbeat", ghost_heartbeat(i), TOKEN_MD)
        assert code == "PERMISSION_DENIED"
    # With the credential, a node still cannot speak for another, take a live node's
    # address, or pose as a voter.
    hb = ghost_heartbeat(0)
    assert call(secured.addr(leader), "Heartbeat", hb,
                peer_md("node-3", secured.addr(3)))[0] == "PERMISSION_DENIED"
    hb = ghost_heartbeat(1)
    hb.grpc_address = secured.addr(3)
    assert call(secured.addr(leader), "Heartbeat", hb,
                peer_md("ghost-1", secured.addr(3)))[0] == "PERMISSION_DENIED"
    voter = next(i for i in range(3) if i != leader)
    hb = ghost_heartbeat(2)
    hb.grpc_address = secured.addr(voter)
    assert call(secured.addr(leader), "Heartbeat", hb,
                peer_md("ghost-2", secured.addr(voter)))[0] == "PERMISSION_DENIED"
    assert node_ids(secured) == before and not any(n.startswith("ghost") for n in before)
    # Work still goes to the real nodes only.
    with secured.client() as cl:
        tid = cl.submit("sh: echo $TASKANDGO_CHUNK_INDEX", shards=8)
        task = cl.wait(tid, timeout_s=30)[0]
    assert task["status"] == "succeeded"
    assert {ch["node"] for ch in task["chunks"]} <= {f"node-{i}" for i in range(secured.n)}


def test_a_worker_runs_only_what_its_leader_dispatched(secured: Cluster,
                                                       tmp_path: Path) -> None:
    leader = secured.leader_index()
    assert leader is not None
    follower = next(i for i in range(3) if i != leader)
    # The payload runs long, so a run shows in the node's running list (a sandboxed
    # task's /tmp is its own, so a marker file there would not show).
    payload = json.dumps({"data": f"sh: touch {tmp_path / 'ran'}; sleep 30"})

    def forged_running() -> bool:
        return any(r.startswith("forged") for s in secured.statuses() for r in s["running"])

    def dispatch(sender: int | None, unit: str, md: tuple) -> tuple[str, Any]:
        req = peer_pb2.DispatchRequest(
            leader_id=f"node-{sender}" if sender is not None else "x",
            assignments=[peer_pb2.Assignment(
                task_id=unit, chunk=-1, chunk_count=0, attempt=1, token=424242,
                payload_json=payload, priority=0)])
        return call(secured.addr(follower), "Dispatch", req, md)

    # A client with the API token, at a voter and at the worker-only node.
    assert dispatch(None, "forged-1", TOKEN_MD)[0] == "PERMISSION_DENIED"
    assert dispatch(None, "forged-2", TOKEN_MD)[0] == "PERMISSION_DENIED"
    code, _ = call(secured.addr(3), "Dispatch", peer_pb2.DispatchRequest(
        leader_id="x", assignments=[peer_pb2.Assignment(
            task_id="forged-3", chunk=-1, attempt=1, token=1,
            payload_json=payload)]), TOKEN_MD)
    assert code == "PERMISSION_DENIED"
    # A peer that is not the leader.
    other = next(i for i in range(secured.n) if i not in (leader, follower))
    assert dispatch(other, "forged-4", peer_md(f"node-{other}", secured.addr(other)))[0] \
        == "PERMISSION_DENIED"
    # Even as the leader: a voter runs only units its replica holds as assigned to it.
    code, resp = dispatch(leader, "forged-5", peer_md(f"node-{leader}", secured.addr(leader)))
    assert code == "OK" and resp.accepted == 0 and resp.refused == 1
    assert stays_false(forged_running, 2.0), "a forged dispatch ran its payload"
    assert not (tmp_path / "ran").exists()


def test_holds_and_kills_come_only_from_the_leader(secured: Cluster) -> None:
    leader = secured.leader_index()
    assert leader is not None
    with secured.client() as cl:
        tid = cl.submit("python: import time; time.sleep(60)", strategy="batch")
        task = wait_for(lambda: (t := cl.get(tid))["status"] == "running" and t["node"] and t,
                        30, "the task to run")
    owner = int(task["node"].split("-")[1])
    for _ in range(20):
        assert call(secured.addr(leader), "Hold",
                    peer_pb2.HoldRequest(min_priority=1000, fan_out=True),
                    TOKEN_MD)[0] == "PERMISSION_DENIED"
        for i in range(secured.n):
            assert call(secured.addr(i), "Hold", peer_pb2.HoldRequest(min_priority=1000),
                        TOKEN_MD)[0] == "PERMISSION_DENIED"
    unit = peer_pb2.RunningUnit(task_id=tid, chunk=-1, attempt=1)
    assert call(secured.addr(owner), "Kill", peer_pb2.KillRequest(units=[unit]),
                TOKEN_MD)[0] == "PERMISSION_DENIED"
    if owner != leader:
        # A peer that is not the leader may not hold or kill on another node.
        sender = next(i for i in range(secured.n) if i not in (leader, owner))
        md = peer_md(f"node-{sender}", secured.addr(sender))
        assert call(secured.addr(owner), "Hold", peer_pb2.HoldRequest(min_priority=1000),
                    md)[0] == "PERMISSION_DENIED"
    assert all(s["held_back"] == 0 for s in secured.statuses())
    with secured.client() as cl:
        assert cl.get(tid)["status"] == "running"
        # Urgent work is not delayed: a critical task submitted now runs at once.
        t0 = time.monotonic()
        urgent = cl.submit("python: print('urgent')", priority="critical", strategy="batch")
        assert cl.wait(urgent, timeout_s=30)[0]["status"] == "succeeded"
        assert time.monotonic() - t0 < 5.0
        cl.cancel(tid)


def test_legitimate_cluster_runs_tasks_everywhere_and_survives_leader_loss(
        secured: Cluster) -> None:
    with secured.client() as cl:
        tid = cl.submit("sh: echo $TASKANDGO_CHUNK_INDEX", shards=4)
        task = cl.wait(tid, timeout_s=30)[0]
    assert task["status"] == "succeeded"
    assert {ch["node"] for ch in task["chunks"]} == {f"node-{i}" for i in range(4)}
    accepted = [tid]
    leader = secured.wait_ready()
    secured.kill(leader, signal.SIGKILL)
    secured.wait_ready()
    with secured.client() as cl:
        ids = [cl.submit("sh: echo $TASKANDGO_CHUNK_INDEX", shards=3) for _ in range(5)]
        accepted += ids
        tasks = cl.wait(ids, timeout_s=60)
    assert all(t["status"] == "succeeded" for t in tasks), [t["error"] for t in tasks]
    survivors = {f"node-{i}" for i in range(4) if i != leader}
    assert {ch["node"] for t in tasks for ch in t["chunks"]} == survivors
    secured.check_invariants(accepted)


def test_peer_calls_are_rate_limited_and_the_worker_table_is_bounded(tmp_path: Path) -> None:
    c = Cluster(tmp_path, n=1, env={"TASKANDGO_RAFT_PASSWORD": PASSWORD,
                                    "TASKANDGO_PEER_RATE_LIMIT": "10",
                                    "TASKANDGO_MAX_WORKERS": "4"})
    c.start()
    try:
        c.wait_ready()
        addr = c.addr(0)
        codes = []
        for i in range(8):
            hb = ghost_heartbeat(i, accepting=False)
            codes.append(call(addr, "Heartbeat", hb,
                              peer_md(hb.node_id, hb.grpc_address))[0])
        # The leader and three workers fill --max-workers 4; the rest are refused.
        assert codes == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 5, codes
        assert len(node_ids(c)) == 4
        hb = ghost_heartbeat(0, accepting=False)
        md = peer_md(hb.node_id, hb.grpc_address)
        codes = [call(addr, "Heartbeat", hb, md)[0] for _ in range(60)]
        assert "RESOURCE_EXHAUSTED" in codes and codes[0] == "OK", codes
        # Another peer has its own bucket, and clients are not slowed down.
        hb1 = ghost_heartbeat(1, accepting=False)
        assert call(addr, "Heartbeat", hb1, peer_md(hb1.node_id, hb1.grpc_address))[0] == "OK"
        with c.client() as cl:
            tid = cl.submit("python: print('ok')", strategy="batch")
            assert cl.wait(tid, timeout_s=30)[0]["status"] == "succeeded"
        c.check_invariants([tid])
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def _cert(cn: str, issuer_key: Any = None, issuer_name: Any = None, ca: bool = False) -> tuple:
    return make_cert(cn, issuer_key, issuer_name, ca, dns=f"{cn}.peers.test")


def test_under_mtls_peers_need_a_node_certificate(tmp_path: Path) -> None:
    """--peer-cert-names: a client certificate from the same CA, even with the peer
    credential, is not a peer; the nodes' own certificates are."""
    ca_key, ca_cert, ca_pem, _ = _cert("peer-test-ca", ca=True)
    files = {"ca": tmp_path / "ca.pem"}
    files["ca"].write_bytes(ca_pem)
    for who in ("node", "client"):
        _, _, pem, key = _cert(who, ca_key, ca_cert.subject)
        files[who] = tmp_path / f"{who}.pem"
        files[who + "_key"] = tmp_path / f"{who}.key"
        files[who].write_bytes(pem)
        files[who + "_key"].write_bytes(key)
    c = Cluster(tmp_path, n=3, extra=[
        "--tls-cert", str(files["node"]), "--tls-key", str(files["node_key"]),
        "--tls-ca", str(files["ca"]), "--tls-client-auth"],
        env={"TASKANDGO_RAFT_PASSWORD": PASSWORD, "TASKANDGO_API_TOKEN": TOKEN,
             "TASKANDGO_PEER_CERT_NAMES": "node.peers.test"},
        client_kw={"token": TOKEN, "tls_ca": str(files["ca"]), "tls_cert": str(files["client"]),
                   "tls_key": str(files["client_key"])})
    c.start()
    try:
        c.wait_ready()
        with c.client() as cl:
            tid = cl.submit("sh: echo $TASKANDGO_CHUNK_INDEX", shards=3)
            task = cl.wait(tid, timeout_s=30)[0]
        assert task["status"] == "succeeded"
        assert {ch["node"] for ch in task["chunks"]} == {"node-0", "node-1", "node-2"}

        def creds(who: str) -> grpc.ChannelCredentials:
            return grpc.ssl_channel_credentials(files["ca"].read_bytes(),
                                                files[who + "_key"].read_bytes(),
                                                files[who].read_bytes())

        leader = c.leader_index()
        assert leader is not None
        hb = ghost_heartbeat(0, accepting=False)
        md = peer_md(hb.node_id, hb.grpc_address)
        for metadata in (TOKEN_MD, md, md + TOKEN_MD):
            assert call(c.addr(leader), "Heartbeat", hb, metadata, creds=creds("client"))[0] \
                == "PERMISSION_DENIED"
        assert "ghost-0" not in node_ids(c)
        # The same call with a certificate issued to a node name is a peer's.
        assert call(c.addr(leader), "Heartbeat", hb, md, creds=creds("node"))[0] == "OK"
        assert "ghost-0" in node_ids(c)
        with Client([c.addr(0)], timeout_s=5, token=TOKEN, tls_ca=str(files["ca"]),
                    tls_cert=str(files["client"]), tls_key=str(files["client_key"])) as cl:
            assert cl.get(tid)["status"] == "succeeded"
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def test_status_all_through_the_kubernetes_api_sends_the_api_token(secured: Cluster) -> None:
    # `taskandgo status --all --kube --token-file F` reached each pod without the
    # token (only TASKANDGO_TOKEN in the environment got through), so a secured
    # cluster showed every pod unreachable. The pods come from a stand-in API (no
    # API server here; tests/kubernetes has the real one), the forward is direct.
    from kube_standin import KubeStandIn, pod
    from kubernetes import client
    from taskandgo.node.kube import status_all_via_api

    # The module's cluster may have lost a node to an earlier test: ask those running.
    up = [i for i in range(3) if secured.procs[i] is not None]
    standin = KubeStandIn([pod(f"node-{i}") for i in up])
    try:
        cfg = client.Configuration()
        cfg.host = standin.url
        api = client.CoreV1Api(client.ApiClient(cfg))

        class Direct:
            def __init__(self, name: str) -> None:
                self.address = secured.addr(int(name.split("-")[1]))

            def close(self) -> None:
                pass

        def roles(**kw: Any) -> list[str]:
            return [n["role"] for n in status_all_via_api(
                "default", "taskandgo", api=api, forward=lambda a, ns, name: Direct(name),
                timeout_s=3, **kw)]

        assert len(up) >= 2 and roles().count("unreachable") == len(up)  # they want the token
        got = roles(client_kw={"token": TOKEN})
        assert "unreachable" not in got and got.count("leader") == 1, got
    finally:
        standin.close()
