"""A follower truncates its Raft log only on a real conflict (SafeSyncObj).

These drive a real PySyncObj follower (no tick thread, so nothing is sent on the
network) with append-entries messages as a leader would send them, including stale
ones that start before the end of the follower's log.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from pysyncobj import SyncObjConf
from taskandgo.consensus.raft import SafeSyncObj

LEADER_TERM = 2


class Follower(SafeSyncObj):
    """A follower that records its replies to the leader."""

    def __init__(self, port: int) -> None:
        self.replies: list[tuple] = []
        # Without a tick thread PySyncObj binds its port here and never connects out.
        super().__init__(f"127.0.0.1:{port}", ["127.0.0.1:2", "127.0.0.1:3"],
                         conf=SyncObjConf(autoTick=False))

    def _SyncObj__sendNextNodeIdx(self, node, reset=False, nextNodeIdx=None, success=False):
        self.replies.append((nextNodeIdx, success))
        return super()._SyncObj__sendNextNodeIdx(node, reset, nextNodeIdx, success)

    def seed(self, terms: list[int]) -> None:
        """Append entries 2.. with these terms after PySyncObj's initial entry 1 (term 0)."""
        log = self._SyncObj__raftLog
        for i, t in enumerate(terms):
            log.add(f"cmd-{i + 2}-{t}".encode(), i + 2, t)

    def log(self) -> list[tuple[int, int]]:
        return [(e[1], e[2]) for e in self._SyncObj__getEntries(1)]

    def append(self, prev: int, prev_term: int, entries: list[tuple[int, int]]) -> None:
        msg = {"type": "append_entries", "term": LEADER_TERM, "commit_index": 0,
               "prevLogIdx": prev, "prevLogTerm": prev_term,
               "entries": [(f"cmd-{i}-{t}".encode(), i, t) for i, t in entries]}
        leader = next(iter(self._SyncObj__otherNodes))
        self._SyncObj__onMessageReceived(leader, msg)


@pytest.fixture
def new_follower() -> Iterator:
    made: list[Follower] = []

    def make() -> Follower:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        made.append(Follower(port))
        return made[-1]

    yield make
    for f in made:
        f._doDestroy()


def test_stale_message_keeps_entries_of_the_leaders_term(new_follower) -> None:
    f = new_follower()
    f.seed([2, 2, 2, 2, 2])  # entries 2..6, term 2
    f.append(2, 2, [(3, 2)])  # a stale resend of entry 3
    assert f.log() == [(1, 0), (2, 2), (3, 2), (4, 2), (5, 2), (6, 2)]
    assert f.replies[-1][1] is True and f.replies[-1][0] >= 4


def test_real_conflict_truncates_from_the_first_conflicting_entry(new_follower) -> None:
    f = new_follower()
    f.seed([1, 1, 1])  # entries 2..4 from an old term
    f.append(1, 0, [(2, 1), (3, 2)])
    assert f.log() == [(1, 0), (2, 1), (3, 2)]
    assert f.replies[-1] == (4, True)


def test_new_entries_after_held_ones_are_appended(new_follower) -> None:
    f = new_follower()
    f.seed([2, 2])
    f.append(1, 0, [(2, 2), (3, 2), (4, 2)])
    assert f.log() == [(1, 0), (2, 2), (3, 2), (4, 2)]
    assert f.replies[-1] == (5, True)


def test_entries_acknowledged_in_this_term_survive_a_stale_message(new_follower) -> None:
    f = new_follower()
    f.seed([1, 1])  # entries 2, 3 from term 1, which the term-2 leader also holds
    f.append(1, 0, [(2, 1), (3, 1)])  # the leader sends both; we acknowledge 3
    assert f.replies[-1] == (4, True)
    f.append(1, 0, [(2, 1)])  # stale: must not drop the acknowledged entry 3
    assert f.log() == [(1, 0), (2, 1), (3, 1)]
    assert f.replies[-1] == (4, True)


def test_unacknowledged_old_term_entries_past_the_message_may_go(new_follower) -> None:
    f = new_follower()
    f.seed([1, 1])  # entry 3 was never acknowledged to the term-2 leader
    f.append(1, 0, [(2, 1)])
    assert f.log() == [(1, 0), (2, 1)]
    assert f.replies[-1] == (3, True)


def test_mismatched_previous_entry_is_refused(new_follower) -> None:
    f = new_follower()
    f.seed([1, 1])
    f.append(2, 2, [(3, 2)])  # our entry 2 has term 1
    assert f.replies[-1][1] is False
    assert f.log() == [(1, 0), (2, 1), (3, 1)]


def test_conflict_with_an_applied_entry_stops_the_replica(new_follower) -> None:
    """A leader whose log disagrees with entries this replica has applied means the
    replicas diverged: the follower stops (fail-stop) instead of truncating them."""
    f = new_follower()
    f.seed([1, 1, 1])
    f._SyncObj__raftLastApplied = 4  # entries 2..4 were committed and applied here
    f.append(2, 1, [(3, 2), (4, 2)])
    assert f._tg_fatal is not None and "applied" in f._tg_fatal
    assert f.log() == [(1, 0), (2, 1), (3, 1), (4, 1)]  # nothing dropped
    f.append(4, 1, [(5, 2)])  # a stopped replica accepts nothing more
    assert f.log()[-1] == (4, 1) and f.replies == []


def test_conflict_beyond_the_applied_entries_still_truncates(new_follower) -> None:
    f = new_follower()
    f.seed([1, 1, 1])
    f._SyncObj__raftLastApplied = 2
    f.append(2, 1, [(3, 2), (4, 2)])
    assert f._tg_fatal is None
    assert f.log() == [(1, 0), (2, 1), (3, 2), (4, 2)]
