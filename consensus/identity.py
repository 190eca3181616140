"""Cluster identity of a data directory: which cluster and voter set its journal belongs to.

A Raft journal is only meaningful inside the cluster that wrote it. A node restarted
with its data dir but with another voter list (a forgotten ``--voters``, a copied
command, a manifest typo) would otherwise start a one-node cluster on top of a
multi-node journal, accept tasks alone, and later fork the replicated state. So the
data dir records, in ``cluster.json`` (written durably):

* ``voters``: the Raft addresses of the voter set it was created with, and
* ``cluster_id``: the id the cluster agreed on through its log (the first leader
  proposes one; empty until this node has applied it).

:func:`check_data_dir` runs before Raft starts and refuses a configuration that
disagrees with the data dir, naming both and how to proceed. A data dir written by a
release before identities (a journal but no ``cluster.json``) adopts the voters it is
given, once, with a warning. ``DIVERGED`` in the data dir records a fail-stop: the node
refuses to start until an operator has dealt with it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from taskandgo.consensus.durability import write_durably

IDENTITY_FILE = "cluster.json"
DIVERGED_FILE = "DIVERGED"
FORMAT = 1


class IdentityError(Exception):
    """The node's configuration disagrees with its data dir; the message says how to go on."""


@dataclass(frozen=True)
class ClusterIdentity:
    cluster_id: str
    voters: tuple[str, ...]
    adopted: bool = False  # written now over a journal from an earlier release


def _journal_has_entries(data_dir: str) -> bool:
    return any(os.path.exists(os.path.join(data_dir, n))
               for n in ("raft.journal", "raft.dump", "raft.journal.meta"))


def read_identity(data_dir: str) -> ClusterIdentity | None:
    path = os.path.join(data_dir, IDENTITY_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{path} is unreadable ({exc}); it records which cluster this "
                            "data dir belongs to: restore it from a backup, or start this "
                            "node with an empty --data-dir to join the cluster afresh") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("voters"), list):
        raise IdentityError(f"{path}: not a TaskAndGo cluster identity file")
    return ClusterIdentity(str(raw.get("cluster_id") or ""),
                           tuple(str(v) for v in raw["voters"]))


def write_identity(data_dir: str, ident: ClusterIdentity) -> None:
    os.makedirs(data_dir, exist_ok=True)
    body = {"format": FORMAT, "cluster_id": ident.cluster_id, "voters": list(ident.voters),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_durably(os.path.join(data_dir, IDENTITY_FILE),
                  (json.dumps(body, indent=2) + "\n").encode())


def check_data_dir(data_dir: str, voters: list[str], self_addr: str) -> ClusterIdentity:
    """Check (and on first start record) the data dir's identity against the voters
    this node was given. Raises :class:`IdentityError` on any disagreement."""
    given = tuple(sorted(voters))
    diverged = os.path.join(data_dir, DIVERGED_FILE)
    if os.path.exists(diverged):
        with open(diverged, encoding="utf-8", errors="replace") as f:
            why = f.read().strip()
        raise IdentityError(
            f"this node stopped itself because its replica diverged from the cluster:\n  {why}\n"
            f"Its data dir {data_dir} must not rejoin as it is. Keep a copy for the bug "
            "report, then start the node with an empty --data-dir: it copies the state "
            f"from the leader. (Remove {diverged} only if you know the replica is right.)")
    ident = read_identity(data_dir)
    if ident is None:
        adopted = _journal_has_entries(data_dir)
        ident = ClusterIdentity("", given, adopted=adopted)
        write_identity(data_dir, ident)
        return ident
    if ident.voters != given:
        flag = ",".join(ident.voters)
        raise IdentityError(
            f"data dir {data_dir} belongs to cluster "
            f"{ident.cluster_id or '(id not yet agreed)'} whose voters are {flag}; this node "
            f"({self_addr}) was given voters {','.join(given)}"
            + (" (no --voters, TASKANDGO_VOTERS or StatefulSet identity: a one-node "
               "cluster)" if len(given) == 1 else "")
            + f". Start it with --voters matching the data dir (Raft addresses {flag}), or "
            "use an empty --data-dir to start a new cluster or join one afresh. Changing "
            "the voter set of an existing cluster in place is not supported.")
    if self_addr not in ident.voters:
        raise IdentityError(f"data dir {data_dir} belongs to voters {','.join(ident.voters)}, "
                            f"which do not include this node's Raft address {self_addr}")
    return ident


def record_cluster_id(data_dir: str, ident: ClusterIdentity, cluster_id: str) -> ClusterIdentity:
    new = ClusterIdentity(cluster_id, ident.voters)
    write_identity(data_dir, new)
    return new


def record_divergence(data_dir: str, reason: str) -> None:
    try:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime())
        write_durably(os.path.join(data_dir, DIVERGED_FILE), (stamp + reason + "\n").encode())
    except OSError:
        pass  # the process is stopping anyway; the log says why
