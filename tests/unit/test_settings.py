"""Cluster-wide settings in the replicated state (consensus/state.py apply_settings,
consensus/commands.py WriteSettings): one default strategy for every node."""

from __future__ import annotations

from taskandgo.consensus.commands import COMMAND_IDS, WriteSettings, from_args
from taskandgo.consensus.state import SchedulerState


def test_settings_are_set_checked_kept_and_snapshotted() -> None:
    s = SchedulerState()
    first = WriteSettings((("default_strategy", "batch"),), 1.0, only_if_unset=True)
    assert first.apply(s)[0] == {"default_strategy": "batch"}
    # A later first-leader proposal does not overwrite it; an operator's does.
    again = WriteSettings((("default_strategy", "split"),), 2.0, only_if_unset=True)
    assert again.apply(s)[0] == {"default_strategy": "batch"}
    assert WriteSettings((("default_strategy", "split"),), 3.0).apply(s)[0] == {
        "default_strategy": "split"}
    # Unknown keys and values are skipped, never raised on (a replicated command).
    bad = WriteSettings((("colour", "red"), ("default_strategy", "fast")), 4.0)
    assert bad.apply(s)[0] == {"default_strategy": "split"}
    assert from_args("write_settings", [{"default_strategy": 3, 5: "x"}, 5.0, 0]).apply(s)[0] \
        == {"default_strategy": "split"}
    back = SchedulerState.from_snapshot(s.to_snapshot())
    assert back.settings == {"default_strategy": "split"}
    assert back.fingerprint() == s.fingerprint()
    assert SchedulerState.from_snapshot({}).settings == {}  # a snapshot from before


def test_the_command_sorts_after_every_earlier_one() -> None:
    """PySyncObj numbers replicated methods by sorted name: a new command must come
    last, or journals written before it would replay the wrong methods."""
    assert list(COMMAND_IDS) == sorted(COMMAND_IDS) and "write_settings" in COMMAND_IDS
    cmd = WriteSettings((("default_strategy", "batch"),), 1.0, True)
    assert from_args(cmd.NAME, cmd.args()) == cmd
