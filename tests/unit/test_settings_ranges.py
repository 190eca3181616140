"""Every numeric setting is range-checked, and the error names it.

Node settings (flags and their ``TASKANDGO_*`` variables) through ``config_from``,
the function ``taskandgo node`` builds its configuration with; client flags
through the ``taskandgo`` argument parser; and a few end to end as a user runs
them (``python -m taskandgo ...``: exit 2 and the flag on stderr, nothing started).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from taskandgo.node.cli import build_parser
from taskandgo.node.config import ConfigError, config_from

# (flag, variable, bad values). Values for int settings that are not integers at
# all ("nan") go through the variable only: argparse refuses them for the flag.
NODE_SETTINGS = [
    ("--grpc-port", "TASKANDGO_GRPC_PORT", ["0", "-1", "70000"]),
    ("--raft-port", "TASKANDGO_RAFT_PORT", ["0", "-7100", "65536"]),
    ("--http-port", "TASKANDGO_HTTP_PORT", ["0", "-1", "99999"]),
    ("--slots", "TASKANDGO_SLOTS", ["0", "-4"]),
    ("--lease", "TASKANDGO_LEASE_S", ["-1", "0", "nan", "inf"]),
    ("--retention", "TASKANDGO_RETENTION_S", ["-5", "0", "nan", "inf"]),
    ("--max-finished", "TASKANDGO_MAX_FINISHED", ["0", "-1"]),
    ("--output-limit", "TASKANDGO_OUTPUT_LIMIT", ["0", "-1", str(5 * 1024 * 1024)]),
    ("--keep-output-bytes", "TASKANDGO_KEEP_OUTPUT_BYTES", ["-1"]),
    ("--keep-output-total", "TASKANDGO_KEEP_OUTPUT_TOTAL", ["-1"]),
    ("--prefetch", "TASKANDGO_PREFETCH", ["-1"]),
    ("--rate-limit", "TASKANDGO_RATE_LIMIT", ["-1", "nan", "inf"]),
    ("--peer-rate-limit", "TASKANDGO_PEER_RATE_LIMIT", ["-1", "nan", "-inf"]),
    ("--max-queued", "TASKANDGO_MAX_QUEUED", ["0", "-1"]),
    ("--max-workers", "TASKANDGO_MAX_WORKERS", ["0", "-1"]),
    ("--max-streams", "TASKANDGO_MAX_STREAMS", ["0", "-1"]),
    ("--max-streams-per-client", "TASKANDGO_MAX_STREAMS_PER_CLIENT", ["0"]),
    ("--grpc-threads", "TASKANDGO_GRPC_THREADS", ["0", "-2"]),
    ("--max-waits", "TASKANDGO_MAX_WAITS", ["0"]),
    ("--max-waits-per-client", "TASKANDGO_MAX_WAITS_PER_CLIENT", ["0"]),
    ("--http-request-timeout", "TASKANDGO_HTTP_REQUEST_TIMEOUT_S", ["0", "-1", "nan", "4000"]),
    ("--append-entries-period", "TASKANDGO_APPEND_ENTRIES_S", ["-1", "0", "nan"]),
    ("--snapshot-interval", "TASKANDGO_SNAPSHOT_INTERVAL_S", ["0.5", "-1", "nan", "inf"]),
    ("--election-timeout", "TASKANDGO_ELECTION_TIMEOUT", ["-1-2", "0.3-inf", "nan-nan", "0-1"]),
    ("--voters", "TASKANDGO_VOTERS", ["127.0.0.1:0:7100", "127.0.0.1:7000:-1",
                                      "127.0.0.1:70000"]),
]

INT_FLAGS = {"--grpc-port", "--raft-port", "--http-port", "--slots", "--max-finished",
             "--output-limit", "--keep-output-bytes", "--keep-output-total", "--prefetch",
             "--max-queued", "--max-workers", "--max-streams", "--max-streams-per-client",
             "--grpc-threads", "--max-waits", "--max-waits-per-client"}


def _node_config(argv: list[str], env: dict[str, str]) -> None:
    args = build_parser().parse_args(["node", *argv])
    config_from(args, env)


NODE_CASES = [(flag, var, v) for flag, var, values in NODE_SETTINGS for v in values]


@pytest.mark.parametrize(("flag", "var", "value"), NODE_CASES)
def test_node_flag_out_of_range_names_it(flag: str, var: str, value: str) -> None:
    if flag in INT_FLAGS and value.lstrip("-").isdigit() is False:
        pytest.skip("not an integer: argparse refuses it (see the variable case)")
    with pytest.raises(ConfigError) as err:
        _node_config([f"{flag}={value}"], {})
    assert flag in str(err.value), str(err.value)


@pytest.mark.parametrize(("flag", "var", "value"), NODE_CASES)
def test_node_variable_out_of_range_names_it(flag: str, var: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        _node_config([], {var: value})
    assert var in str(err.value), str(err.value)


def test_int_variables_refuse_non_numbers_by_name() -> None:
    for flag in sorted(INT_FLAGS):
        var = next(v for f, v, _ in NODE_SETTINGS if f == flag)
        for value in ("nan", "1.5", "ten"):
            with pytest.raises(ConfigError) as err:
                _node_config([], {var: value})
            assert var in str(err.value) and flag in str(err.value), str(err.value)


def test_voter_count_is_checked() -> None:
    env = {"POD_NAME": "tg-0", "TASKANDGO_HEADLESS_SERVICE": "tg"}
    for value in ("0", "-3"):
        with pytest.raises(ConfigError, match="TASKANDGO_VOTER_COUNT"):
            _node_config([], {**env, "TASKANDGO_VOTER_COUNT": value})


def test_good_values_still_pass() -> None:
    _node_config(["--grpc-port=65535", "--slots=1", "--prefetch=0", "--rate-limit=0",
                  "--keep-output-bytes=0", "--lease=0.95", "--output-limit=1",
                  "--election-timeout=0.3-0.6"], {})
    _node_config([], {"TASKANDGO_RATE_LIMIT": "2.5", "TASKANDGO_PEER_RATE_LIMIT": "0",
                      "TASKANDGO_HTTP_REQUEST_TIMEOUT_S": "3600"})


# (command with its positional arguments, flag, bad values) of the client commands.
CLIENT_FLAGS = [
    (["get", "t1"], "--timeout", ["-1", "0", "nan", "inf", "soon"]),
    (["submit", "--", "sh: true"], "--timeout", ["-1", "nan"]),
    (["submit", "--", "sh: true"], "--shards", ["-1"]),
    (["submit", "--", "sh: true"], "--retries", ["-1"]),
    (["submit", "--", "sh: true"], "--task-timeout", ["-1", "nan", "inf"]),
    (["submit", "--", "sh: true"], "--wait-timeout", ["0", "-1", "nan"]),
    (["tasks"], "--limit", ["0", "-1"]),
    (["watch"], "--max-events", ["-1"]),
    (["top"], "--interval", ["0", "-1", "nan"]),
    (["output", "t1"], "--chunk", ["-2"]),
    (["local"], "--nodes", ["0", "-1"]),
    (["local"], "--voters", ["0"]),
    (["local"], "--base-port", ["0", "-1", "70000"]),
    (["local"], "--slots", ["0"]),
    (["node"], "--grace", ["-1", "nan", "inf"]),
]


@pytest.mark.parametrize(("cmd", "flag", "value"),
                         [(c, f, v) for c, f, values in CLIENT_FLAGS for v in values])
def test_client_flag_out_of_range_names_it(cmd: list[str], flag: str, value: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = [cmd[0], f"{flag}={value}", *cmd[1:]]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taskandgo", *argv], capture_output=True,
                          text=True, timeout=60, check=False, env={**os.environ, **(env or {})})


def test_as_a_user_runs_them() -> None:
    """The issue's own example, a node flag and a node variable, end to end: each
    exits 2 at once, naming the setting (a node never starts; no node is needed)."""
    res = _run(["get", "--node", "127.0.0.1:1", "--timeout", "-1", "t1"])
    assert res.returncode == 2 and "argument --timeout" in res.stderr, res.stderr
    res = _run(["node", "--grpc-port", "0"])
    assert res.returncode == 2 and "--grpc-port" in res.stderr, res.stderr
    res = _run(["node"], {"TASKANDGO_GRACE_S": "-5"})
    assert res.returncode == 2 and "TASKANDGO_GRACE_S" in res.stderr, res.stderr
    # A bad TASKANDGO_GRACE_S no longer breaks the other commands.
    res = _run(["get", "--help"], {"TASKANDGO_GRACE_S": "soon"})
    assert res.returncode == 0, res.stderr


def test_python_client_refuses_a_nonsense_timeout() -> None:
    from taskandgo.node.client import Client

    for bad in (-1, 0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout_s"):
            Client("127.0.0.1:1", timeout_s=bad)
    Client("127.0.0.1:1", timeout_s=0.5).close()
