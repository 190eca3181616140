"""Size limits for every JSON type, and the HTTP server against browsers used as
weapons (DNS rebinding, cross-site requests), on a real node process on loopback.

- ``args`` sent as a JSON list or object over the 256 KiB limit is refused over
  HTTP (400 naming the field) and over gRPC (INVALID_ARGUMENT), and nothing of it
  is stored; the CLI names the field too;
- a ``Host`` that is not one of the node's names gets 421 before anything runs; a
  write whose ``Origin`` is another origin gets 403; a browser's body that is not
  ``application/json`` gets 415; curl without those headers works as the README says;
- every response carries the security headers; the dashboard runs in headless
  Chromium under its Content-Security-Policy without a violation, and a page on
  another origin (real Chromium, real requests) cannot make the node take a task.

Every wait polls with a deadline; the node is ended by pid by the fixture.
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from harness import Cluster, serve
from taskandgo.node.client import TaskAndGoError
from taskandgo.node.tasks import MAX_PAYLOAD

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
#: Names the node is configured to answer to besides its own.
ALLOWED = "tasks.example.test,.svc.example.test"
JSON = {"Content-Type": "application/json"}
#: Security headers every response must carry (the CSP is checked by its parts).
HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff",
           "referrer-policy": "no-referrer"}


# ---------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One voter on 127.0.0.1 with TASKANDGO_HTTP_ALLOWED_HOSTS; logs shown on failure."""
    c = Cluster(tmp_path_factory.mktemp("hardening"), n=1,
                env={"TASKANDGO_HTTP_ALLOWED_HOSTS": ALLOWED})
    yield from serve(request, c)


def port_of(c: Cluster) -> int:
    return c.http_ports[0]


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One request over http.client, which sends our ``Host`` when we give one:
    (status, headers with lower-case names, JSON body or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        status = resp.status
    finally:
        conn.close()
    if hdrs.get("content-type", "").startswith("application/json") and raw:
        return status, hdrs, json.loads(raw)
    return status, hdrs, raw.decode(errors="replace")


def post(port: int, path: str, obj: Any, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], Any]:
    return call(port, "POST", path, json.dumps(obj).encode(), headers)


def stored(c: Cluster, task_id: str) -> bool:
    """Whether the replicated state holds the task (asked over gRPC)."""
    with c.client() as cl:
        try:
            cl.get(task_id)
        except TaskAndGoError as exc:
            assert exc.code == "NOT_FOUND", exc
            return False
    return True


def wait_final(c: Cluster, task_id: str) -> dict[str, Any]:
    with c.client() as cl:
        (task,) = cl.wait([task_id], timeout_s=60)
    assert task["status"] in ("succeeded", "failed", "cancelled"), task
    return task


# ---------------------------------------------------------------------- A: limits

BIG_LIST = ["x" * 1000] * 1900                               # ~1.9 MB of JSON, in a 2 MiB body
BIG_OBJECT = {f"k{i}": "y" * 1000 for i in range(300)}     # ~0.3 MB


def test_args_as_a_list_or_object_over_the_limit_is_refused_over_http(node: Cluster) -> None:
    port = port_of(node)
    cases = [
        ("/api/v1/tasks", {"task_id": "big-list", "call": "json:dumps", "args": BIG_LIST},
         "args"),
        ("/submit-task", {"task_id": "big-object", "call": "json:dumps", "args": BIG_OBJECT},
         "args"),
        ("/api/v1/tasks", {"tasks": [{"task_id": "big-batch", "call": "json:dumps",
                                      "args": BIG_OBJECT}]}, "tasks[0].args"),
        # A list of empty strings: few characters, many bytes of JSON.
        ("/api/v1/tasks", {"task_id": "big-argv", "argv": [""] * 100_000}, "argv"),
    ]
    for path, body, field in cases:
        status, _, answer = post(port, path, body, JSON)
        assert status == 400, (field, status, answer)
        assert answer["field"] == field and str(MAX_PAYLOAD) in answer["error"], answer
    for task_id in ("big-list", "big-object", "big-batch", "big-argv"):
        assert not stored(node, task_id), f"{task_id} reached the replicated state"
    # Under the limit, the same shapes are taken: the check measures, it does not ban.
    status, _, answer = post(port, "/api/v1/tasks", {
        "task_id": "fits-list", "call": "json:dumps", "args": ["x" * 1000] * 200}, JSON)
    assert status == 201, answer
    assert stored(node, "fits-list")
    assert call(port, "GET", "/readyz")[0] == 200


def test_args_over_the_limit_are_refused_over_grpc(node: Cluster) -> None:
    # 150,000 characters but 300,000 bytes of UTF-8: the limit is on bytes.
    wide = json.dumps(["é" * 150_000], ensure_ascii=False)
    cases = [({"id": "grpc-wide", "call": "json:dumps", "args_json": wide}, "args_json"),
             ({"id": "grpc-argv", "argv": [""] * 100_000}, "argv")]
    with node.client() as cl:
        for spec, field in cases:
            with pytest.raises(TaskAndGoError) as info:
                cl.submit_many([spec])
            assert info.value.code == "INVALID_ARGUMENT", info.value
            assert info.value.message.startswith(field + ":"), info.value.message
    assert not stored(node, "grpc-wide") and not stored(node, "grpc-argv")


def test_cli_names_the_field_and_still_submits(node: Cluster) -> None:
    cli = [sys.executable, "-m", "taskandgo", "submit", "--node", node.addr(0)]
    res = subprocess.run([*cli, "--id", "cli-argv", "--", *[""] * 100_000],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2, res
    assert "INVALID_ARGUMENT" in res.stderr and "argv" in res.stderr, res.stderr
    assert not stored(node, "cli-argv")
    res = subprocess.run([*cli, "--id", "cli-ok", "--wait", "--", "sh: echo cli works"],
                         capture_output=True, text=True, timeout=90, check=False)
    assert res.returncode == 0, res
    assert "cli works" in res.stdout


# ---------------------------------------------------------------------- B: Host

def test_a_foreign_host_is_refused_before_anything_runs(node: Cluster, tmp_path: Path) -> None:
    port = port_of(node)
    marker = tmp_path / "ran"
    # What a rebinding page sends: its own name, its own origin, a "simple" body type.
    status, _, body = post(port, "/submit-task",
                              {"task_id": "rebind-1", "data": f"sh: touch {marker}"},
                              {"Host": f"evil.example:{port}",
                               "Origin": f"http://evil.example:{port}",
                               "Content-Type": "text/plain"})
    assert status == 421 and body["field"] == "Host", body
    assert "--http-allowed-hosts" in body["error"]
    assert not stored(node, "rebind-1") and not marker.exists()
    for host in ("evil.example", f"localhost.evil.example:{port}", "127.0.0.1.evil.example",
                 "tasks.example.test.evil.example", "svc.example.test.evil", "203.0.113.9",
                 f"127.0.0.1:{port}@evil.example", "", "[::1"):
        for path in ("/", "/api/v1/tasks", "/healthz"):
            status, _, body = call(port, "GET", path, headers={"Host": host})
            assert status == 421, (host, path, status, body)
    # The node's own names (bound to loopback: the loopback names too) and the
    # configured ones, whatever the port (a Service or proxy may map it).
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST.",
                 "tasks.example.test", "rel-taskandgo.demo.svc.example.test:80",
                 "svc.example.test"):
        status, _, body = call(port, "GET", "/healthz", headers={"Host": host})
        assert status == 200, (host, status, body)
    # HTTP/1.1 requires a Host.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", "/healthz", skip_host=True)
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 400 and json.loads(resp.read())["field"] == "Host"
    finally:
        conn.close()


def test_probes_reach_a_node_bound_to_every_address_by_its_own_addresses() -> None:
    """The kubelet probes a pod at its IP (Host: <pod IP>:<port>): a node bound to
    0.0.0.0 answers to every address of its interfaces, to the loopback names and
    to its advertised name, and to nothing else."""
    cfg = SimpleNamespace(advertise="rel-taskandgo-0.rel-taskandgo-headless.demo.svc.cluster.local",
                          http_allowed_hosts=())
    from taskandgo.node.http import HostPolicy

    policy = HostPolicy.for_node(cfg, "0.0.0.0")
    addresses = [a.address.split("%")[0] for nic in psutil.net_if_addrs().values() for a in nic
                 if a.family in (socket.AF_INET, socket.AF_INET6)]
    assert addresses
    for ip in addresses:
        host = f"[{ip}]:8080" if ":" in ip else f"{ip}:8080"
        assert policy.host_ok(host), host
    for host in ("localhost:8080", "127.0.0.1", cfg.advertise + ":8080", "[::1]:8080"):
        assert policy.host_ok(host), host
    for host in ("evil.example:8080", "203.0.113.9:8080", "rel-taskandgo.demo.svc.cluster.local"):
        assert not policy.host_ok(host), host
    # Bound to one address: that address (and the advertised name), not the others.
    one = HostPolicy.for_node(SimpleNamespace(advertise="10.1.2.3", http_allowed_hosts=()),
                              "10.1.2.3")
    assert one.host_ok("10.1.2.3:8080") and not one.host_ok("localhost:8080")
    # "*" opens the Host check but never cross-origin writes.
    anyhost = HostPolicy.for_node(SimpleNamespace(advertise="127.0.0.1",
                                                  http_allowed_hosts=("*",)), "127.0.0.1")
    assert anyhost.host_ok("evil.example")
    assert not anyhost.origin_ok("http://evil.example", "127.0.0.1:8080")
    assert anyhost.origin_ok("http://evil.example", "evil.example")  # same origin


# ---------------------------------------------------------------------- B: Origin

def test_cross_origin_writes_are_refused(node: Cluster) -> None:
    port = port_of(node)
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}",
                   f"http://localhost:{port}", "file://", "garbage"):
        status, _, body = post(port, "/submit-task", {"task_id": "xo-1", "data": "x"},
                               {**JSON, "Origin": origin})
        assert status == 403 and body["field"] == "Origin", (origin, status, body)
    assert not stored(node, "xo-1")

    # A cancel from another origin leaves the task alone, DELETE or POST.
    status, _, body = post(port, "/api/v1/tasks",
                           {"task_id": "victim", "data": "sh: sleep 60"}, JSON)
    assert status == 201, body
    evil = {"Origin": "http://evil.example"}
    assert call(port, "DELETE", "/api/v1/tasks/victim", headers=evil)[0] == 403
    assert call(port, "POST", "/api/v1/tasks/victim/cancel", headers=evil)[0] == 403
    status, _, body = call(port, "POST", "/api/v1/tasks/victim/cancel",
                           headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and body["field"] == "Sec-Fetch-Site", body
    with node.client() as cl:
        assert cl.get("victim")["status"] in ("queued", "running")
    # The node's own origin (the dashboard) may write; so may a configured name.
    status, _, body = call(port, "POST", "/api/v1/tasks/victim/cancel",
                           headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200 and body["status"] == "cancelled", body
    status, _, body = post(port, "/submit-task", {"task_id": "xo-ok", "data": "x"},
                           {**JSON, "Origin": "https://tasks.example.test",
                            "Host": "tasks.example.test"})
    assert status == 201, body
    status, _, body = post(port, "/submit-task", {"task_id": "xo-ok2", "data": "x"},
                           {**JSON, "Origin": "https://tasks.example.test"})
    assert status == 201, "a configured name may post to the node under another name"


def test_a_browser_must_send_json_as_application_json(node: Cluster) -> None:
    port = port_of(node)
    same = f"http://127.0.0.1:{port}"
    refused = [
        {"Origin": same, "Content-Type": "text/plain"},
        {"Origin": same, "Content-Type": "application/x-www-form-urlencoded"},
        {"Origin": same},
        {"Sec-Fetch-Site": "same-origin", "Content-Type": "text/plain"},
        {"Sec-Fetch-Mode": "no-cors", "Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "multipart/form-data; boundary=x"},
    ]
    for headers in refused:
        for path in ("/submit-task", "/api/v1/tasks"):
            status, _, body = post(port, path, {"task_id": "plain-1", "data": "x"}, headers)
            assert status == 415 and body["field"] == "Content-Type", (headers, status, body)
    assert not stored(node, "plain-1")
    # Not a browser: curl's defaults and no type at all are taken, as is JSON with
    # a charset from anyone.
    for i, headers in enumerate([{"Content-Type": "application/x-www-form-urlencoded"},
                                 {"Content-Type": "text/plain"}, {},
                                 {"Origin": same,
                                  "Content-Type": "application/json; charset=utf-8"}]):
        status, _, body = post(port, "/submit-task", {"task_id": f"plain-ok-{i}", "data": "x"},
                               headers)
        assert status == 201, (headers, status, body)


def test_readme_curl_command_still_works(node: Cluster) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("needs curl")
    readme = (ROOT / "README.md").read_text()
    line = next(ln for ln in readme.splitlines()
                if ln.startswith("curl ") and "/submit-task" in ln)
    argv = [re.sub(r"^http://[^/]+", f"http://127.0.0.1:{port_of(node)}", a)
            for a in shlex.split(line)]
    res = subprocess.run([argv[0], "-sS", "-w", "\n%{http_code}", *argv[1:]],
                         capture_output=True, text=True, timeout=30, check=False)
    body, _, code = res.stdout.rpartition("\n")
    assert res.returncode == 0 and code == "201", res
    answer = json.loads(body)
    assert answer["created"] is True
    task = wait_final(node, answer["task_id"])
    assert task["status"] == "succeeded" and "task details" in task["result"]


# ---------------------------------------------------------------------- headers, page

class _PageScan(HTMLParser):
    """Inline code in a page: script bodies, <style>, style= and on*= attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script":
            self._in_script = True
            self.scripts.append(names.get("src") or "")
        if tag == "style":
            self.inline.append("<style>")
        self.inline += [f"{tag} {k}=" for k in names if k == "style" or k.startswith("on")]

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("script body")


def test_every_response_carries_the_security_headers(node: Cluster) -> None:
    port = port_of(node)
    requests = [("GET", "/", {}), ("HEAD", "/", {}), ("GET", "/index.html", {}),
                ("GET", "/dashboard.js", {}), ("GET", "/dashboard.css", {}),
                ("GET", "/openapi.json", {}), ("GET", "/api/v1/node", {}),
                ("GET", "/api/v1/tasks", {}), ("GET", "/healthz", {}), ("GET", "/metrics", {}),
                ("GET", "/api/v1/events?max_s=0.2", {}), ("OPTIONS", "/submit-task", {}),
                ("GET", "/no/such/path", {}), ("GET", "/", {"Host": "evil.example"}),
                ("POST", "/submit-task", {"Origin": "http://evil.example"})]
    for method, path, headers in requests:
        status, hdrs, _ = call(port, method, path, headers=headers)
        for name, value in HEADERS.items():
            assert hdrs.get(name) == value, (method, path, status, name)
        csp = [d.strip() for d in hdrs.get("content-security-policy", "").split(";")]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, (path, csp)
        # No inline script or style, nothing from elsewhere.
        assert not any("unsafe-inline" in d or "*" in d or "http" in d for d in csp), csp
        script = [d for d in csp if d.startswith("script-src")]
        assert script in ([], ["script-src 'self'"]), csp  # no inline script, no eval
    assert call(port, "POST", "/submit-task", b"{", JSON)[1]["x-frame-options"] == "DENY"

    status, hdrs, page = call(port, "GET", "/")
    assert status == 200 and hdrs["content-type"].startswith("text/html")
    scan = _PageScan()
    scan.feed(page)
    assert scan.inline == [], f"inline code the policy would block: {scan.inline}"
    assert scan.scripts == ["dashboard.js"]
    assert call(port, "GET", "/dashboard.js")[1]["content-type"].startswith("text/javascript")


class _AttackSite:
    """Another origin: a plain web server on loopback serving an attacker's pages
    that try to make the node take a task (fetch with a "simple" body type, and a
    text/plain form that needs no script)."""

    def __init__(self, node_port: int) -> None:
        target = f"http://127.0.0.1:{node_port}"
        task = json.dumps({"task_id": "csrf-fetch", "data": "sh: echo pwned"})
        pages = {
            "/fetch.html": f"""<!doctype html><title>fetch</title><script>
                Promise.allSettled([
                  fetch("{target}/submit-task", {{method: "POST", mode: "no-cors",
                    headers: {{"Content-Type": "text/plain"}}, body: {json.dumps(task)}}}),
                  fetch("{target}/api/v1/tasks", {{method: "POST", mode: "no-cors",
                    body: {json.dumps(task.replace("csrf-fetch", "csrf-fetch-2"))}}}),
                ]).then(() => {{ document.title = "done"; }});
                </script>""",
            "/form.html": f"""<!doctype html><title>form</title>
                <form id="f" method="POST" action="{target}/submit-task" enctype="text/plain">
                <input name='{{"task_id": "csrf-form", "data": "x", "labels": {{"p": "'
                 value='"}}}}'>
                </form><script>document.getElementById("f").submit();</script>""",
        }

        class Pages(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.get(self.path, "").encode()
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_in_chromium_the_dashboard_runs_under_its_policy_and_other_sites_cannot_submit(
        node: Cluster, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="needs the playwright package (pip install playwright)")
    from test_dashboard import CHROMIUM_FLAGS, UI_TIMEOUT_MS, _chromium

    executable = _chromium()
    port = port_of(node)
    site = _AttackSite(port)
    # evil.test resolves to loopback inside this browser only: the rebinding case.
    flags = [*CHROMIUM_FLAGS, "--host-resolver-rules=MAP evil.test 127.0.0.1"]
    try:
        with sync_api.sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=executable, headless=True,
                args=flags)
            try:
                context.add_init_script(
                    "window.violations = [];"
                    "document.addEventListener('securitypolicyviolation', e =>"
                    " window.violations.push(e.violatedDirective + ' ' + e.blockedURI));")
                page = context.new_page()
                page.set_default_timeout(UI_TIMEOUT_MS)
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))

                # The dashboard: renders, submits through its form, no violation.
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#nodes tr[data-role=leader]")
                page.fill("textarea[name=data]", "sh: echo from the dashboard")
                page.fill("input[name=task_id]", "dash-1")
                page.click("#submit-form button[type=submit]")
                page.wait_for_selector("#submitted-id")
                assert page.inner_text("#submitted-id") == "dash-1"
                page.wait_for_selector('#tasks tr[data-task-id="dash-1"][data-status="succeeded"]')
                page.wait_for_selector(".meter i")  # a width set through the CSSOM
                assert page.evaluate("window.violations") == []
                assert errors == []

                # Another site's script posts to the node: refused, nothing stored.
                page.goto(f"http://evil.test:{site.port}/fetch.html")
                page.wait_for_function("document.title === 'done'")
                with page.expect_response(lambda r: r.url.endswith("/submit-task")) as form:
                    page.goto(f"http://evil.test:{site.port}/form.html")
                assert form.value.status == 403

                # DNS rebinding: the attacker's name now points at the node.
                resp = page.goto(f"http://evil.test:{port}/")
                assert resp is not None and resp.status == 421
            finally:
                context.close()
    finally:
        site.close()
    for task_id in ("csrf-fetch", "csrf-fetch-2", "csrf-form"):
        assert not stored(node, task_id), f"a page on another origin submitted {task_id}"
    assert stored(node, "dash-1")
