"""Fair share in the replicated state (issue 18, item 4; consensus/fairshare.py):
the queue order with a tenant label, what serving does to it, snapshots and
fingerprints, and that nothing changes without a label."""

from __future__ import annotations

from taskandgo.consensus.state import SchedulerState


def spec(tid: str, team: str | None, priority: int = 0) -> dict:
    return {"id": tid, "priority": priority, "strategy": "batch",
            **({"labels": {"team": team}} if team is not None else {})}


def order(s: SchedulerState, n: int = 100) -> list[str]:
    return [t.id if c == -1 else f"{t.id}/{c}" for t, c in s.peek_queued(n)]


def assign(s: SchedulerState, ids: list[str], now: float = 10.0) -> list:
    out, _ = s.apply_assign([(t, -1, 0, "w1") for t in ids], now, 30.0)
    return out


def fair_state(*ops: list) -> SchedulerState:
    s = SchedulerState()
    s.apply_policy([["tenant_label", "team"], *ops], 0.0)
    return s


def test_without_a_label_the_order_is_first_come_first_served() -> None:
    s = SchedulerState()
    s.apply_submit([spec(f"a{i}", "a") for i in range(5)], 1.0)
    s.apply_submit([spec(f"b{i}", "b") for i in range(2)], 2.0)
    assert order(s) == ["a0", "a1", "a2", "a3", "a4", "b0", "b1"]
    assert s.fair is None
    assert "fair" not in s.to_snapshot()


def test_equal_weights_alternate_between_backlogged_tenants() -> None:
    s = fair_state()
    s.apply_submit([spec(f"a{i}", "a") for i in range(5)], 1.0)
    s.apply_submit([spec(f"b{i}", "b") for i in range(2)], 2.0)
    assert order(s) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4"]


def test_weights_give_units_in_proportion() -> None:
    s = fair_state(["weight", "a", 3.0])
    s.apply_submit([spec(f"a{i}", "a") for i in range(8)], 1.0)
    s.apply_submit([spec(f"b{i}", "b") for i in range(8)], 2.0)
    got = order(s, 12)
    assert got == ["a0", "b0", "a1", "a2", "a3", "b1", "a4", "a5", "a6", "b2", "a7", "b3"]


def test_assigning_a_prefix_of_the_peek_leaves_the_rest_in_the_same_order() -> None:
    s = fair_state(["weight", "b", 2.0])
    s.apply_submit([spec(f"a{i}", "a") for i in range(10)], 1.0)
    s.apply_submit([spec(f"b{i}", "b") for i in range(10)], 2.0)
    s.apply_submit([spec(f"c{i}", None) for i in range(10)], 3.0)
    before = order(s)
    for k in (1, 3, 2, 5, 4):
        assert [a[0] for a in assign(s, before[:k])] == before[:k]
        before = before[k:]
        assert order(s) == before


def test_an_idle_tenant_banks_no_credit() -> None:
    s = fair_state()
    s.apply_submit([spec(f"a{i}", "a") for i in range(30)], 1.0)
    assign(s, order(s, 20))  # a alone for 20 units
    s.apply_submit([spec(f"b{i}", "b") for i in range(10)], 2.0)
    # b starts at the level's virtual time (the last unit served): turns alternate
    # from here, b does not get 20 units in a row.
    assert order(s, 6) == ["b0", "a20", "b1", "a21", "b2", "a22"]


def test_a_tenant_served_ahead_keeps_its_debt_while_others_are_queued() -> None:
    s = fair_state()
    s.apply_submit([spec(f"a{i}", "a") for i in range(10)], 1.0)
    s.apply_submit([spec("b0", "b")], 2.0)
    # b0 goes out of turn (as if a placement passed over a's units): b's virtual
    # time is now ahead of a's, and stays so when b queues again.
    assign(s, ["b0", "a0"])
    s.apply_submit([spec("b1", "b")], 3.0)
    assert order(s, 3) == ["a1", "b1", "a2"]
    assign(s, ["a1"])
    assert order(s, 2) == ["b1", "a2"]


def test_strict_priority_between_levels_is_kept() -> None:
    s = fair_state(["weight", "b", 10.0])
    s.apply_submit([spec(f"a{i}", "a", 10) for i in range(3)], 1.0)
    s.apply_submit([spec(f"b{i}", "b", 0) for i in range(3)], 2.0)
    s.apply_submit([spec("b9", "b", 10)], 3.0)
    assert order(s) == ["a0", "b9", "a1", "a2", "b0", "b1", "b2"]


def test_levels_keep_their_own_virtual_times() -> None:
    s = fair_state()
    s.apply_submit([spec(f"a{i}", "a", 5) for i in range(4)], 1.0)
    assign(s, order(s, 4))  # a used level 5; the level is empty now: forgotten
    s.apply_submit([spec(f"b{i}", "b", 0) for i in range(2)], 2.0)
    s.apply_submit([spec(f"a{i}", "a", 0) for i in range(5, 7)], 3.0)
    assert order(s) == ["b0", "a5", "b1", "a6"]
    assert sorted(s.fair.levels) == [0] if s.fair else False


def test_split_chunks_are_served_as_their_tenants_units() -> None:
    s = fair_state()
    s.apply_submit([{**spec("big", "a"), "strategy": "split", "shards": 4}], 1.0)
    s.apply_submit([spec(f"b{i}", "b") for i in range(3)], 2.0)
    out, _ = s.apply_assign([("big", 0, 4, "w1")], 5.0, 30.0)
    assert out and out[0][:2] == ("big", 0)
    assert order(s) == ["b0", "big/1", "b1", "big/2", "b2", "big/3"]


def test_cancel_and_requeue_keep_the_counts() -> None:
    s = fair_state()
    s.apply_submit([spec(f"a{i}", "a") for i in range(3)] + [spec("b0", "b")], 1.0)
    s.apply_cancel(["a1", "b0"], 2.0)
    got = assign(s, ["a0"])
    s.apply_requeue([(got[0][0], -1, got[0][3], got[0][4])], 3.0, "lost")
    fq = s.fair
    assert fq is not None
    assert {p: sum(lv.live.values()) for p, lv in fq.levels.items()} == s.queued_by_priority
    assert order(s) == ["a2", "a0"]  # requeued: its key, a new sequence number (as plain)


def test_snapshot_round_trip_keeps_order_and_fingerprint() -> None:
    s = fair_state(["weight", "a", 2.0])
    s.apply_submit([spec(f"a{i}", "a") for i in range(10)], 1.0)
    s.apply_submit([spec(f"b{i}", "b") for i in range(10)], 2.0)
    assign(s, ["b0", "b1", "a0"])
    s.apply_cancel(["b2"], 4.0)
    data = s.to_snapshot()
    assert data["fair"]
    r = SchedulerState.from_snapshot(data)
    assert r.fingerprint() == s.fingerprint()
    assert order(r) == order(s)
    # The virtual times are part of the state: replicas with other ones differ.
    assert r.fair is not None
    r.fair.levels[0].tags["a"] += 1.0
    assert r.fingerprint() != s.fingerprint()


def test_setting_and_clearing_the_label() -> None:
    s = SchedulerState()
    s.apply_submit([spec(f"a{i}", "a") for i in range(3)], 1.0)
    s.apply_submit([spec(f"b{i}", "b") for i in range(3)], 2.0)
    plain = order(s)
    fp = s.fingerprint()
    s.apply_policy([["tenant_label", "team"]], 3.0)
    assert order(s) == ["a0", "b0", "a1", "b1", "a2", "b2"]
    s.apply_policy([["tenant_label", ""]], 4.0)
    assert s.fair is None and order(s) == plain
    assert len(s.fingerprint()) == len(fp)  # no policy, no fair-share state left


def test_bad_labels_and_weights_are_total() -> None:
    s = fair_state(["weight", "a", 0.5])
    s.apply_submit([{"id": "x", "priority": 0, "labels": {"team": 7}},
                    {"id": "y", "priority": 0, "labels": "nope"},
                    spec("z", "a")], 1.0)
    # x and y are the tenant "" (no team); a at weight 0.5 gets one turn in three.
    assert order(s) == ["x", "z", "y"]
    s.weights["a"] = -1.0  # never written by apply_ops; read as 1 all the same
    assert assign(s, ["z"])
