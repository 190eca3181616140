"""The ``taskandgo`` command: node, local, submit, get, output, tasks, cancel, watch,
status, top."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

DEFAULT_NODE = "127.0.0.1:7000"
PREFIXES = ("python:", "python3:", "sh:", "bash:")


def _label(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value")
    return k, v


def _json_list(text: str) -> list:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError("expected a JSON list")
    return value


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None


def _ranged(cast: Any, lo: float | None = None, hi: float | None = None,
            above: bool = False) -> Any:
    """An argparse type: a number of type ``cast`` (int or float) that is finite and
    within ``lo``..``hi`` (``above``: strictly greater than ``lo``). argparse names
    the flag in its error ("argument --timeout: ...", exit 2)."""
    def parse(text: str) -> Any:
        from taskandgo.node.config import ConfigError, check_range

        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a valid {'integer' if cast is int else 'number'}") from None
        try:
            return check_range(value, "value", lo, hi, above)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None

    parse.__name__ = cast.__name__
    return parse


#: Seconds a client setting takes at most (a bound against typos: about 100 years).
MAX_SECONDS = 3.2e9


def build_parser() -> argparse.ArgumentParser:
    from taskandgo.node.flags import add_node_arguments

    p = argparse.ArgumentParser(prog="taskandgo", description="TaskAndGo: a peer-to-peer, "
                                "Raft-replicated task scheduler.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def client_args(sp: argparse.ArgumentParser, json_flag: bool = True) -> None:
        sp.add_argument("--node", default=os.environ.get("TASKANDGO_NODE", DEFAULT_NODE),
                        help="node address(es), comma separated (TASKANDGO_NODE; "
                        f"{DEFAULT_NODE})")
        sp.add_argument("--timeout", type=_ranged(float, 0, MAX_SECONDS, above=True),
                        default=30.0, dest="client_timeout", metavar="SECONDS",
                        help="seconds to keep retrying unreachable nodes (30)")
        sp.add_argument("--token-file", default=os.environ.get("TASKANDGO_TOKEN_FILE"),
                        help="file holding the API bearer token (TASKANDGO_TOKEN_FILE; or the "
                        "token itself in TASKANDGO_TOKEN)")
        sp.add_argument("--tls-ca", default=None, help="CA bundle that signs the nodes' "
                        "certificates: connect with TLS (TASKANDGO_TLS_CA)")
        sp.add_argument("--tls-cert", default=None, help="client certificate for mTLS "
                        "(TASKANDGO_TLS_CERT)")
        sp.add_argument("--tls-key", default=None, help="client key for mTLS (TASKANDGO_TLS_KEY)")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("node", help="run one node")
    add_node_arguments(sp)
    # The variable is read when a node starts (cmd_node), so a bad value is an error
    # naming it there, not a crash of every other command.
    sp.add_argument("--grace", type=_ranged(float, 0, 86400), default=None,
                    help="seconds running tasks get to finish on SIGTERM (TASKANDGO_GRACE_S; 20)")

    sp = sub.add_parser("local", help="run an N-node cluster on this machine")
    sp.add_argument("--nodes", type=_ranged(int, 1, 1000), default=3)
    sp.add_argument("--voters", type=_ranged(int, 1, 1000), default=3,
                    help="Raft members among the nodes (3)")
    sp.add_argument("--base-port", type=_ranged(int, 1, 65535 - 3000), default=7000)
    sp.add_argument("--data-dir", default="taskandgo-local")
    sp.add_argument("--fresh", action="store_true", help="delete the data dir first")
    sp.add_argument("--strategy", choices=("split", "batch"), default=None)
    sp.add_argument("--slots", type=_ranged(int, 1, 100_000), default=None)

    sp = sub.add_parser("submit", help="submit a task",
                        usage="taskandgo submit [options] "
                        "[-- 'python: CODE' | 'sh: CODE' | ARGV...]")
    client_args(sp)
    sp.add_argument("--id", default=None, help="task id; doubles as idempotency key")
    task_args(sp)
    when = sp.add_mutually_exclusive_group()
    when.add_argument("--at", default=None, metavar="TIME",
                      help="run at this RFC 3339 time (2026-12-01T08:00:00Z); accepted now, "
                      "shown as scheduled until then")
    when.add_argument("--in", type=_duration, default=0.0, dest="delay_s", metavar="DURATION",
                      help="run after this long (90, 90s, 5m, 1h30m, 2d)")
    sp.add_argument("--after", action="append", default=[], metavar="ID[,ID...]",
                    help="run only once these tasks have succeeded (their results in "
                    "$TASKANDGO_PARENTS or the parents= argument); if one fails or is "
                    "cancelled, this task ends upstream_failed")
    sp.add_argument("--after-any", action="store_true",
                    help="with --after: run once they have ended, whatever their outcome")
    sp.add_argument("--cpu", default=None, metavar="CORES",
                    help="CPU cores each unit needs free on its node (2, 0.5, 500m)")
    sp.add_argument("--memory", default=None, metavar="BYTES",
                    help="memory each unit needs free on its node (512Mi, 4Gi)")
    sp.add_argument("--resource", action="append", default=[], metavar="NAME=N",
                    help="a named resource each unit needs, e.g. gpu=1 (repeatable)")
    sp.add_argument("--require", action="append", default=[], metavar="KEY[=VALUE]",
                    help="run only on nodes with this label (zone=a) or label key (gpu); "
                    "repeatable, all must hold")
    sp.add_argument("--prefer", action="append", default=[], metavar="KEY[=VALUE]",
                    help="rather run on nodes with this label (repeatable; soft)")
    sp.add_argument("--concurrency-key", action="append", default=[], metavar="KEY",
                    help="hold this cluster-wide key while running: at most its limit "
                    "(taskandgo policy limit KEY N) of units holding it run at once "
                    "(repeatable)")
    sp.add_argument("--wait", action="store_true", help="wait for the result and show it")
    sp.add_argument("--wait-timeout", type=_ranged(float, 0, MAX_SECONDS, above=True),
                    default=3600.0, help="seconds --wait waits for the result (3600)")
    sp.add_argument("payload", nargs=argparse.REMAINDER)


    sp = sub.add_parser("get", help="show a task")
    client_args(sp)
    sp.add_argument("task_id")

    sp = sub.add_parser("output", help="a task's full output, as kept by the node that ran it")
    client_args(sp, json_flag=False)
    sp.add_argument("task_id")
    sp.add_argument("--chunk", type=_ranged(int, -1), default=None,
                    help="which chunk of a split task (required for one)")
    sp.add_argument("--stderr", action="store_true", help="stderr instead of stdout")

    sp = sub.add_parser("settings", help="show (or change) the cluster-wide settings")
    client_args(sp)
    sp.add_argument("--default-strategy", choices=("split", "batch"), default=None,
                    help="the strategy of a task that names none, for every node")

    sp = sub.add_parser("policy", help="show (or change) concurrency limits and fair share",
                        description="taskandgo policy: show the policy. policy limit KEY N|none: "
                        "at most N units holding KEY run at once (none: unlimited). policy "
                        "weight TENANT W|none: the tenant's fair share weight (none: 1). "
                        "policy tenant-label LABEL|none: the task label naming a task's "
                        "tenant (none: fair share off).")
    client_args(sp)
    sp.add_argument("what", nargs="?", choices=("limit", "weight", "tenant-label"))
    sp.add_argument("values", nargs="*", metavar="NAME VALUE")

    sp = sub.add_parser("tasks", help="list tasks")
    client_args(sp)
    sp.add_argument("--status", default="")
    sp.add_argument("--label", action="append", default=[], metavar="K=V")
    sp.add_argument("--limit", type=_ranged(int, 1, 10**9), default=100)

    sp = sub.add_parser("cancel", help="cancel a task (kills it if running)")
    client_args(sp)
    sp.add_argument("task_id")

    sp = sub.add_parser("watch", help="follow events")
    client_args(sp)
    sp.add_argument("task_ids", nargs="*")
    sp.add_argument("--max-events", type=_ranged(int, 0), default=0,
                    help="stop after N events (0: never)")

    sp = sub.add_parser(
        "status", help="node status (one node or every node)",
        description="Exit status: 0 every node shown is reachable and ready; 1 some node is "
        "unreachable, not ready or stopped; 2 no node names a leader, or the cluster "
        "cannot be reached. With --json the output is the API's node status (a list "
        "with --all) and a {\"summary\": ...} line goes to stderr.")
    client_args(sp)
    sp.add_argument("--all", action="store_true", help="every node in the cluster")
    sp.add_argument("--kube", action="store_true", help="with --all: find the pods through "
                    "the Kubernetes API (your kubeconfig) and reach each by port-forward")
    sp.add_argument("--namespace", default="default", help="with --kube (default)")
    sp.add_argument("--release", default="taskandgo", help="with --kube: Helm release name")

    sp = sub.add_parser("top", help="live view of the cluster: nodes, queue, running tasks")
    client_args(sp, json_flag=False)
    sp.add_argument("--interval", type=_ranged(float, 0.05, 3600), default=1.0,
                    help="seconds between frames (1)")
    sp.add_argument("--once", action="store_true", help="print one frame and exit")

    sp = sub.add_parser("schedule", help="periodic schedules: create, list, get, pause, "
                        "resume, delete (docs/schedules.md)")
    ssub = sp.add_subparsers(dest="schedule_cmd", required=True)
    sp = ssub.add_parser("create", help="create a schedule: a task run once per cron slot",
                         usage="taskandgo schedule create --cron EXPR [options] ID "
                         "[-- 'python: CODE' | 'sh: CODE' | ARGV...]")
    client_args(sp)
    sp.add_argument("--cron", required=True, help="'*/5 * * * *' (5 fields), 6 with seconds "
                    "last, or @hourly, @daily, @weekly, @monthly, @yearly")
    sp.add_argument("--tz", default="UTC", help="IANA time zone of the expression (UTC)")
    sp.add_argument("--overlap", choices=("allow", "forbid", "replace"), default="allow",
                    help="while the previous run goes on: run both (allow), skip the slot "
                    "(forbid) or cancel the previous run (replace)")
    sp.add_argument("--missed", choices=("latest", "skip"), default="latest",
                    help="slots missed while the cluster was down: run the latest once "
                    "(latest) or none (skip)")
    sp.add_argument("--catchup", type=_duration, default=0.0, metavar="DURATION",
                    help="slots at most this late are each run (10s)")
    task_args(sp)
    sp.add_argument("payload", nargs=argparse.REMAINDER, metavar="ID [-- PAYLOAD]",
                    help="the schedule id (slot t's task is ID@t), then the task's payload "
                    "(options go before the id)")
    sp = ssub.add_parser("list", help="every schedule with its next fire")
    client_args(sp)
    for verb, text in (("get", "a schedule and its recent fires"),
                       ("pause", "stop firing until resumed"),
                       ("resume", "fire again from now on"),
                       ("delete", "delete a schedule (its tasks stay)")):
        sp = ssub.add_parser(verb, help=text)
        client_args(sp)
        sp.add_argument("id")
    return p


def task_args(sp: argparse.ArgumentParser) -> None:
    """The options of a task (submit, and the template of schedule create)."""
    sp.add_argument("--priority", default="medium", help="low|medium|high|critical|INT")
    sp.add_argument("--strategy", choices=("split", "batch"), default="")
    sp.add_argument("--shards", type=_ranged(int, 0), default=0)
    sp.add_argument("--items", type=_json_list, default=None, help="JSON list for split chunks")
    sp.add_argument("--on-every-node", action="store_true",
                    help="run the task once on every live node (a split task cut into one "
                    "chunk per node); a task with nothing to cut otherwise runs once")
    sp.add_argument("--task-timeout", "--timeout-s", type=_ranged(float, 0, MAX_SECONDS),
                    default=0.0, dest="task_timeout",
                    help="per-attempt time limit in seconds")
    sp.add_argument("--retries", type=_ranged(int, 0), default=0)
    sp.add_argument("--label", type=_label, action="append", default=[], metavar="K=V")
    sp.add_argument("--data", default=None, help="payload in the seed's form ('python: ...')")
    sp.add_argument("--call", default=None, help="module:function run in the warm pool")
    sp.add_argument("--args", type=_json_value, default=None, help="JSON arguments for --call")


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    if hasattr(signal, "SIGPIPE") and args.cmd not in ("node", "local"):
        # `taskandgo tasks | head` ends quietly. Never for a node: a client that hangs
        # up mid-response would kill it.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.cmd == "node":
        return cmd_node(args)
    if args.cmd == "local":
        from taskandgo.node.local import run_local

        extra = []
        if args.strategy:
            extra += ["--strategy", args.strategy]
        if args.slots:
            extra += ["--slots", str(args.slots)]
        return run_local(args.nodes, args.base_port, args.voters, args.data_dir, args.fresh, extra)

    from taskandgo.node.client import Client, TaskAndGoError

    token = None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            print(f"error: --token-file: {exc}", file=sys.stderr)
            return 2
    if args.cmd == "status" and args.kube:
        from taskandgo.node.kube import status_all_via_api

        try:
            nodes = status_all_via_api(args.namespace, args.release, client_kw={
                "token": token, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert,
                "tls_key": args.tls_key})
        except Exception as exc:  # noqa: BLE001 - no kubeconfig, API unreachable, RBAC
            print(f"error: Kubernetes API: {exc}", file=sys.stderr)
            return 2
        return print_status(nodes, args.json, True)
    try:
        with Client(args.node, timeout_s=args.client_timeout, token=token, tls_ca=args.tls_ca,
                    tls_cert=args.tls_cert, tls_key=args.tls_key) as c:
            return COMMANDS[args.cmd](c, args)
    except TaskAndGoError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def cmd_node(args: argparse.Namespace) -> int:
    from taskandgo.node.config import ConfigError, config_from, number_setting
    from taskandgo.node.main import run_node

    try:
        cfg = config_from(args)
        grace_s = number_setting(args.grace, dict(os.environ), "TASKANDGO_GRACE_S", 20.0,
                                 float, "--grace", 0, 86400)
    except ConfigError as exc:
        print(f"taskandgo node: {exc}", file=sys.stderr)
        return 2
    return run_node(cfg, grace_s=grace_s)


def _payload(args: argparse.Namespace) -> dict[str, Any]:
    rest = list(args.payload)
    if rest and rest[0] == "--":
        rest = rest[1:]
    kinds = sum(bool(x) for x in (rest, args.data, args.call))
    if kinds != 1:
        raise SystemExit("taskandgo submit: give exactly one payload: -- 'python: CODE', "
                         "-- ARGV..., --data TEXT or --call module:function")
    if args.call:
        return {"call": args.call, "args": args.args}
    if args.data:
        return {"data": args.data}
    if len(rest) == 1 and (rest[0].startswith(PREFIXES) or " " in rest[0]):
        return {"data": rest[0]}
    return {"argv": rest}


def cmd_submit(c: Any, args: argparse.Namespace) -> int:
    from taskandgo.node.client import task_spec

    # Checked by the node's own checks before anything is sent (TaskAndGoError
    # INVALID_ARGUMENT naming the field, exit 2): a spec too large for a gRPC message
    # still gets its field named. The node checks again, with its default strategy
    # and its call policy.
    spec = task_spec(
        **_payload(args), id=args.id, priority=args.priority, strategy=args.strategy,
        shards=args.shards, items=args.items, timeout_s=args.task_timeout,
        retries=args.retries, labels=dict(args.label), on_every_node=args.on_every_node,
        run_at=args.at, delay_s=args.delay_s,
        after=[i.strip() for a in args.after for i in a.split(",") if i.strip()],
        after_any=args.after_any, resources=_requests(args),
        require=[t.strip() for a in args.require for t in a.split(",") if t.strip()],
        prefer=[t.strip() for a in args.prefer for t in a.split(",") if t.strip()],
        concurrency_keys=[k.strip() for a in args.concurrency_key for k in a.split(",")
                          if k.strip()])
    res = c.submit_many([spec])[0]
    if not args.wait:
        if args.json:
            print(json.dumps(res))
        else:
            print(res["task_id"] + ("" if res["created"] else "  (already known)"))
        return 0
    task = _wait_with_progress(c, res["task_id"], args.wait_timeout, quiet=args.json)
    if args.json:
        print(json.dumps(task))
    else:
        _print_task(task, brief=True)
    return 0 if task["status"] == "succeeded" else 1


def _amounts(resources: dict[str, float]) -> str:
    from taskandgo.strategies.placement import format_amounts

    return format_amounts(resources)


def _requests(args: argparse.Namespace) -> dict[str, str]:
    """--cpu, --memory and --resource NAME=N as the spec's resources (amounts as
    given: the spec's check parses them and names the field when one is bad)."""
    out: dict[str, str] = {}
    for item in args.resource:
        name, sep, amount = item.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"taskandgo submit: --resource {item!r}: expected NAME=N")
        out[name.strip()] = amount.strip()
    if args.cpu is not None:
        out["cpu"] = args.cpu
    if args.memory is not None:
        out["memory"] = args.memory
    return out


def _wait_with_progress(c: Any, task_id: str, timeout_s: float, quiet: bool) -> dict[str, Any]:
    """Wait for a task; on a terminal, show a split task's chunk progress."""
    deadline = time.monotonic() + timeout_s
    tty = sys.stderr.isatty() and not quiet
    while True:
        left = deadline - time.monotonic()
        res = c.wait_raw([task_id], max(0.2, min(left, 0.5 if tty else 30.0)))
        task = res["tasks"][0] if res["tasks"] else c.get(task_id)
        if tty and task.get("chunk_count"):
            n, done = task["chunk_count"], task["chunks_done"]
            bar = "#" * (30 * done // n) + "-" * (30 - 30 * done // n)
            print(f"\r[{bar}] {done}/{n} chunks", end="", file=sys.stderr, flush=True)
        if task["status"] in ("succeeded", "failed", "cancelled", "upstream_failed") \
                or left <= 0:
            if tty and task.get("chunk_count"):
                print(file=sys.stderr)
            return task


def _print_task(t: dict[str, Any], brief: bool = False) -> None:
    if brief:
        print(f"{t['id']} {t['status']}" + (f" (exit {t['exit_code']})" if t["exit_code"] else ""))
        if t.get("result"):
            print(t["result"])
        if t.get("truncated"):
            print(_cut_note(t), file=sys.stderr)
        if t.get("error") and t["status"] != "succeeded":
            print(f"error: {t['error']}", file=sys.stderr)
        elif t.get("stderr"):
            print(f"stderr (tail):\n{t['stderr']}", file=sys.stderr)
        return
    spec = t.get("spec", {})
    payload = spec.get("data") or " ".join(spec.get("argv", [])) or spec.get("call", "")
    rows = [
        ("id", t["id"]), ("status", t["status"]),
        ("priority", f"{t.get('priority_name') or t['priority']}"),
        ("strategy", t["strategy"] + (" (on every node)" if spec.get("on_every_node") else "")),
        ("payload", payload[:200]),
        ("attempts", t["attempts"]), ("node", t["node"]), ("exit code", t["exit_code"]),
        ("created", _ts(t["created_at"])),
        *([("run at", _when(t["run_at"]))] if t.get("run_at") else []),
        *([("schedule", f"{t['schedule_id']} (slot {_when(t['slot'])})")]
          if t.get("schedule_id") else []),
        *([("after", ", ".join(t["parents"]) + (" (any outcome)" if t.get("spec", {}).get(
            "after_any") else ""))] if t.get("parents") else []),
        *([("children", ", ".join(t["children"][:20])
            + (f" (+{len(t['children']) - 20})" if len(t["children"]) > 20 else ""))]
          if t.get("children") else []),
        *([("resources", _amounts(spec["resources"]))] if spec.get("resources") else []),
        *([("require", ", ".join(spec["require"]))] if spec.get("require") else []),
        *([("prefer", ", ".join(spec["prefer"]))] if spec.get("prefer") else []),
        *([("keys", ", ".join(spec["concurrency_keys"]))] if spec.get("concurrency_keys")
          else []),
        *([("pending", t["pending_reason"])] if t.get("pending_reason") else []),
        ("started", _ts(t["started_at"])),
        ("finished", _ts(t["finished_at"])),
    ]
    if t.get("chunk_count"):
        rows.append(("chunks", f"{t['chunks_done']}/{t['chunk_count']} done"))
    for k, v in rows:
        print(f"{k:10} {v}")
    for ch in t.get("chunks", []):
        print(f"  chunk {ch['index']:>3} {ch['status']:10} node={ch['node']} "
              f"attempts={ch['attempts']} result={ch['result'][:60]!r}")
    if t.get("result"):
        print("result:")
        print(t["result"])
    if t.get("truncated"):
        print(_cut_note(t))
    if t.get("stderr"):
        print("stderr (tail):")
        print(t["stderr"])
    if t.get("error"):
        print(f"error: {t['error']}")


def _cut_note(t: dict[str, Any]) -> str:
    """The line saying a task's result is only the head of its output."""
    return (f"[output truncated: {t.get('output_bytes', 0)} bytes written; "
            f"`taskandgo output {t['id']}` fetches the full output if the node kept it]")


def _when(x: float) -> str:
    """A start time as a user reads it: the date and time in UTC and how far off."""
    left = x - time.time()
    rel = f"in {_span(left)}" if left > 0 else f"{_span(-left)} ago"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(x)) + f" ({rel})"


def _span(seconds: float) -> str:
    """A length of time in its two largest units (1h30m, 2d4h, 45s)."""
    s = round(seconds)
    d, r = divmod(s, 86400)
    h, r = divmod(r, 3600)
    m, sec = divmod(r, 60)
    parts = [f"{n}{u}" for n, u in ((d, "d"), (h, "h"), (m, "m"), (sec, "s")) if n]
    return "".join(parts[:2]) or "0s"


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(text: str) -> float:
    """An argparse type: a duration such as 90, 90s, 5m, 1h30m or 2d, in seconds."""
    t = text.strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if not t or pos != len(t):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 5m, "
                                         "1h30m or 2d")
    return total


def _ts(x: float) -> str:
    if not x:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(x)) + f".{int(x * 1000) % 1000:03d}"


def cmd_get(c: Any, args: argparse.Namespace) -> int:
    t = c.get(args.task_id)
    print(json.dumps(t, indent=2)) if args.json else _print_task(t)
    return 0


def cmd_output(c: Any, args: argparse.Namespace) -> int:
    """Write the unit's kept output, byte for byte, to stdout; say on stderr when
    the node kept only part of it (--keep-output-bytes)."""
    out = c.task_output(args.task_id, args.chunk, "stderr" if args.stderr else "stdout")
    sys.stdout.flush()
    sys.stdout.buffer.write(out["data"])
    sys.stdout.buffer.flush()
    if not out["complete"] and out["kept"] < out["written"]:
        print(f"[kept {out['kept']} of {out['written']} bytes: node {out['node']} keeps at most "
              "--keep-output-bytes per unit]", file=sys.stderr)
    return 0


def cmd_tasks(c: Any, args: argparse.Namespace) -> int:
    tasks = c.list_tasks(args.status, args.label, args.limit)
    if args.json:
        print(json.dumps(tasks))
        return 0
    print(f"{'ID':34} {'STATUS':10} {'PRIO':8} {'STRATEGY':8} {'NODE':10} {'ATT':>3}  RESULT")
    for t in tasks:
        res = (t["result"] or t["error"]).replace("\n", " ")[:40]
        if t["status"] == "scheduled" and t.get("run_at"):
            res = f"runs at {_when(t['run_at'])}"
        elif t["status"] == "waiting":
            res = "after " + ",".join(t.get("parents", []))[:60]
        print(f"{t['id'][:34]:34} {t['status']:10} {t.get('priority_name') or t['priority']:8} "
              f"{t['strategy']:8} {t['node'][:10]:10} {t['attempts']:>3}  {res}")
    return 0


def cmd_cancel(c: Any, args: argparse.Namespace) -> int:
    res = c.cancel(args.task_id)
    print(json.dumps(res) if args.json else f"{res['task_id']} {res['status']}")
    return 0


def cmd_watch(c: Any, args: argparse.Namespace) -> int:
    for n, ev in enumerate(c.watch(args.task_ids), start=1):
        if args.json:
            print(json.dumps(ev), flush=True)
        else:
            chunk = f" chunk {ev['chunk']}" if ev.get("chunk", -1) >= 0 else ""
            print(f"{_ts(ev['at'])} {ev['kind']:6} {ev['task_id'] or '-'}{chunk} {ev['status']} "
                  f"{ev['node']}", flush=True)
        if args.max_events and n >= args.max_events:
            break
    return 0


#: ``taskandgo status`` exit codes (scripts and probes rely on them; see README).
STATUS_OK, STATUS_DEGRADED, STATUS_NO_LEADER = 0, 1, 2


def cmd_status(c: Any, args: argparse.Namespace) -> int:
    from taskandgo.node.client import TaskAndGoError

    if not args.all:
        return print_status([c.node_status(c.nodes[0])], args.json, False)
    try:
        nodes = c.status_all()
    except TaskAndGoError as exc:
        # No leader answers (or none is elected): show what each node given with
        # --node says of itself, so the operator sees why.
        print(f"error: cluster status: {exc.code}: {exc.message}", file=sys.stderr)
        nodes = []
        for addr in c.nodes:
            try:
                nodes.append(c.node_status(addr))
            except TaskAndGoError as err:
                nodes.append({"id": addr, "role": "unreachable", "grpc_address": addr,
                              "error": err.message})
    return print_status(nodes, args.json, True)


def status_summary(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``status`` concludes from the nodes' own statuses, with its exit code:
    0 every node reachable and ready; 2 no reachable node names a leader; 1 otherwise
    (some node unreachable, not ready, or stopped because its replica diverged)."""
    down = [str(n["id"]) for n in nodes if n.get("role") in ("unreachable", "unknown")]
    up = [n for n in nodes if n.get("role") not in ("unreachable", "unknown")]
    not_ready = [str(n["id"]) for n in up if not n.get("ready") or n.get("fatal")]
    leaders = sorted({str(n["leader_id"]) for n in up if n.get("leader_id")})
    if not leaders:
        code = STATUS_NO_LEADER
    elif down or not_ready:
        code = STATUS_DEGRADED
    else:
        code = STATUS_OK
    return {"nodes": len(nodes), "reachable": len(up), "ready": len(up) - len(not_ready),
            "unreachable": down, "not_ready": not_ready, "leader": ",".join(leaders),
            "exit_code": code}


def _mib(n: Any) -> str:
    return f"{(n or 0) / 2**20:.1f} MiB"


def print_status(nodes: list[dict[str, Any]], as_json: bool, many: bool) -> int:
    """Print the nodes' statuses (JSON: exactly as the API returns them, one object or,
    with ``many``, a list; the summary goes to stderr as ``{"summary": ...}``) and
    return the exit code of :func:`status_summary`."""
    summary = status_summary(nodes)
    if as_json:
        print(json.dumps(nodes if many else nodes[0]))
        print(json.dumps({"summary": summary}), file=sys.stderr)
        return int(summary["exit_code"])
    for st in nodes:
        if st.get("role") == "unreachable":
            print(f"{st['id']}: unreachable ({st.get('error', '')})\n")
            continue
        queue = ", ".join(f"{k}={v}" for k, v in st.get("queue_by_priority", {}).items()) or "empty"
        print(f"node {st['id']}  role={st['role']}  ready={'yes' if st.get('ready') else 'no'}  "
              f"term={st.get('raft_term', 0)}  commit={st.get('commit_index', 0)}  "
              f"leader={st.get('leader_id') or '-'}")
        print(f"  queue: {queue}   running units: {len(st.get('running', []))}   "
              f"free slots: {st.get('free_slots', 0)}/{st.get('slots', 0)}")
        source = st.get("resources_source") or "host"
        print(f"  cpu {st.get('cpu_percent', 0):.0f}% of {st.get('cpu_limit_cores', 0):g} CPUs  "
              f"memory {st.get('memory_percent', 0):.0f}% ({_mib(st.get('memory_used'))} of "
              f"{_mib(st.get('memory_limit'))})  [{source}]  "
              f"node process rss {_mib(st.get('memory_rss'))}")
        print(f"  grpc {st.get('grpc_address')}  http {st.get('http_address')}  "
              f"raft {st.get('raft_address') or '-'}")
        if st.get("offer") or st.get("node_labels"):
            labels = ", ".join(f"{k}={v}" for k, v in sorted(st.get("node_labels", {}).items()))
            print(f"  offers {_amounts(st.get('offer') or {})}  labels {labels or '-'}")
        if st.get("cluster_id") or st.get("fsync"):
            print(f"  cluster {st.get('cluster_id') or '(not yet agreed)'}  "
                  f"fsync {st.get('fsync') or '-'}  sandbox {st.get('sandbox') or '-'}")
        strategy = st.get("strategy") or "-"
        mine = st.get("strategy_configured") or strategy
        print(f"  default strategy {strategy}"
              + (f" (the cluster's; this node was started with {mine})"
                 if mine != strategy else ""))
        for peer in st.get("foreign_peers", []):
            print(f"  REFUSED peer of another cluster: {peer}")
        if st.get("fatal"):
            print(f"  STOPPED, replica diverged: {st['fatal']}")
        print()
    if many:
        problems = [f"{what}: {', '.join(summary[key])}"
                    for key, what in (("unreachable", "unreachable"), ("not_ready", "not ready"))
                    if summary[key]]
        print(f"{summary['ready']}/{summary['nodes']} nodes ready, leader "
              f"{summary['leader'] or 'none'}" + (f"; {'; '.join(problems)}" if problems else ""))
    return int(summary["exit_code"])


def cmd_top(c: Any, args: argparse.Namespace) -> int:
    from taskandgo.node.top import run_top

    return run_top(c, args.interval, args.once)


def cmd_settings(c: Any, args: argparse.Namespace) -> int:
    settings = c.settings(default_strategy=args.default_strategy)
    if args.json:
        print(json.dumps(settings))
    else:
        for key, value in settings.items():
            print(f"{key.replace('_', '-')}: {value or '(not set: each node its own)'}")
    return 0


def cmd_policy(c: Any, args: argparse.Namespace) -> int:
    """taskandgo policy [limit KEY N|none | weight TENANT W|none | tenant-label L|none]."""
    want = {"limit": 2, "weight": 2, "tenant-label": 1}.get(args.what or "", 0)
    if len(args.values) != want:
        raise SystemExit(f"taskandgo policy {args.what}: expected "
                         + ("LABEL|none" if want == 1 else "NAME VALUE|none"))
    none = args.values[-1].lower() in ("none", "-") if want else False
    if args.what == "limit":
        if not none and not args.values[1].isdigit():
            raise SystemExit("taskandgo policy limit KEY N: N is a whole number (or none)")
        out = c.set_policy(limits={args.values[0]: None if none else int(args.values[1])})
    elif args.what == "weight":
        try:
            w = None if none else float(args.values[1])
        except ValueError:
            raise SystemExit("taskandgo policy weight TENANT W: W is a number (or none)") \
                from None
        out = c.set_policy(weights={args.values[0]: w})
    elif args.what == "tenant-label":
        out = c.set_policy(tenant_label="" if none else args.values[0])
    else:
        out = c.policy()
    if args.json:
        print(json.dumps(out))
        return 0
    held = out.get("held", {})
    print("concurrency limits:" if out["limits"] else "concurrency limits: none")
    for key in sorted(set(out["limits"]) | set(held)):
        limit = out["limits"].get(key)
        print(f"  {key:24} {held.get(key, 0)}/{limit if limit is not None else '-'} running")
    label = out.get("tenant_label") or ""
    print(f"fair share: by task label {label!r}" if label else "fair share: off")
    for tenant, w in sorted(out.get("weights", {}).items()):
        print(f"  {tenant:24} weight {w:g}")
    return 0


def cmd_schedule(c: Any, args: argparse.Namespace) -> int:
    """taskandgo schedule create|list|get|pause|resume|delete."""
    from taskandgo.node.client import task_spec

    verb = args.schedule_cmd
    if verb == "create":
        if not args.payload or args.payload[0].startswith("-"):
            raise SystemExit("taskandgo schedule create: give the schedule id after the "
                             "options: schedule create --cron EXPR [options] ID -- PAYLOAD")
        args.id, args.payload = args.payload[0], args.payload[1:]
        task = task_spec(
            **_payload(args), priority=args.priority, strategy=args.strategy,
            shards=args.shards, items=args.items, timeout_s=args.task_timeout,
            retries=args.retries, labels=dict(args.label), on_every_node=args.on_every_node)
        task.pop("id", None)  # each slot's task gets its own (ID@slot)
        out: Any = c.create_schedule(id=args.id, cron=args.cron, time_zone=args.tz, task=task,
                                     overlap=args.overlap, missed=args.missed,
                                     catchup_s=args.catchup)
    elif verb == "list":
        out = c.list_schedules()
    else:
        out = getattr(c, f"{verb}_schedule")(args.id)
    if args.json:
        print(json.dumps(out))
    elif verb == "list":
        print(f"{'ID':24} {'CRON':18} {'TZ':16} {'STATE':7} {'FIRES':>6}  NEXT FIRE")
        for sc in out:
            state = "paused" if sc["paused"] else "active"
            nxt = _when(sc["next_fire"]) if sc["next_fire"] else "-"
            print(f"{sc['id'][:24]:24} {sc['cron'][:18]:18} {sc['time_zone'][:16]:16} "
                  f"{state:7} {sc['fires_total']:>6}  {nxt}")
    else:
        _print_schedule(out, deleted=verb == "delete")
    return 0


def _print_schedule(sc: dict[str, Any], deleted: bool = False) -> None:
    task = sc.get("task", {})
    payload = task.get("data") or " ".join(task.get("argv", [])) or task.get("call", "")
    rows = [("id", sc["id"] + ("  (deleted)" if deleted else "")),
            ("cron", f"{sc['cron']}  ({sc['time_zone']})"),
            ("state", "paused" if sc["paused"] else "active"),
            ("overlap", sc["overlap"]), ("missed", sc["missed"]),
            ("catch-up", f"{sc['catchup_s']:g} s"), ("task", payload[:200]),
            ("next fire", _when(sc["next_fire"]) if sc["next_fire"] else "-"),
            ("fires", f"{sc['fires_total']} fired, {sc['skipped_total']} skipped")]
    for k, v in rows:
        print(f"{k:10} {v}")
    if sc.get("recent"):
        print("recent fires:")
        for f in sc["recent"]:
            slot = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(f["slot"]))
            print(f"  {slot}  {f['outcome']:16} {f['task_id'] or '-'} {f['task_status']}")


COMMANDS = {"submit": cmd_submit, "get": cmd_get, "output": cmd_output, "tasks": cmd_tasks,
            "cancel": cmd_cancel, "watch": cmd_watch, "status": cmd_status, "top": cmd_top,
            "settings": cmd_settings, "schedule": cmd_schedule, "policy": cmd_policy}

if __name__ == "__main__":
    raise SystemExit(main())
