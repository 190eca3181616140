"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright
(never a downloaded browser), against a 3-node cluster on loopback. The page is
opened on a follower, so it survives the leader's kill -9.

Chromium comes from the Debian package ``chromium``: the test installs it with
apt-get when it runs as root and it is missing, and skips (saying why) otherwise.
Screenshots land in ``test-artifacts/`` (git-ignored): the page after a split task,
its charts and task stream under load, and after the leader's kill.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Cluster, wait_for
from taskandgo.node.client import task_spec

pytestmark = pytest.mark.cluster

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
#: Headless, no GPU, nothing fetched from the network by the browser itself.
#: (Playwright passes --headless and the fresh --user-data-dir itself.)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 20_000


def _apt_install_chromium() -> str:
    """Install Debian's chromium as root; return why not, or "" on success."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root"
    if not shutil.which("apt-get"):
        return "no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "install", "-y", "chromium"],
                 ["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        res = subprocess.run(step, capture_output=True, text=True, timeout=900, env=env,
                             check=False)
        if step[1] == "install" and res.returncode == 0 and os.path.exists(CHROMIUM):
            return ""
    return f"apt-get install chromium failed: {res.stderr.strip()[-300:]}"


def _chromium() -> str:
    if not os.path.exists(CHROMIUM):
        why = _apt_install_chromium()
        if why:
            pytest.skip(f"needs Debian's chromium at {CHROMIUM} ({why}); "
                        "install it with: apt-get install -y chromium")
    return CHROMIUM


@pytest.fixture(scope="module")
def page(cluster3: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The dashboard of a follower, open in headless Chromium; page errors fail."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="needs the playwright package (pip install playwright)")
    executable = _chromium()
    leader = cluster3.leader_index()
    follower = next(i for i in range(cluster3.n) if i != leader)
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=executable,
            headless=True, args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000},
            # Playwright's polling wait_for_function evaluates strings in the page; the
            # node's CSP rightly forbids eval (tests/cluster/test_http_hardening.py checks the CSP).
            bypass_csp=True)
        try:
            pg = context.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            pg.set_default_timeout(UI_TIMEOUT_MS)
            pg.goto(cluster3.http(follower) + "/")
            pg.evaluate("window.notReloaded = true")
            yield pg
            assert not errors, f"JavaScript errors on the page: {errors}"
        finally:
            context.close()


def _screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_charts_and_task_stream_draw_under_the_pages_own_policy(
        cluster3: Cluster, tmp_path: Path) -> None:
    """The fixture's page bypasses the Content-Security-Policy (for Playwright's
    polling); this one does not: the charts and the stream draw with no violation.
    First in the module: Playwright's sync API runs one instance at a time, and the
    fixture's stays open from its first use to the module's end."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="needs the playwright package (pip install playwright)")
    executable = _chromium()
    with cluster3.client() as c:
        task_id = c.submit("sh: echo under the policy", strategy="batch")
        wait_for(lambda: c.get(task_id)["status"] == "succeeded" or None, 60, "the task")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=executable, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        try:
            context.add_init_script(
                "window.violations = [];"
                "document.addEventListener('securitypolicyviolation', e =>"
                " window.violations.push(e.violatedDirective + ' ' + e.blockedURI));")
            pg = context.new_page()
            pg.set_default_timeout(UI_TIMEOUT_MS)
            errors: list[str] = []
            pg.on("pageerror", lambda exc: errors.append(str(exc)))
            pg.goto(cluster3.http(0) + "/")
            pg.wait_for_selector('#chart-throughput path[data-series="started"]')
            pg.wait_for_selector("#chart-memory path[data-series=node-0]")
            pg.wait_for_selector(f'#stream rect[data-task="{task_id}"]')
            pg.wait_for_selector(".legend svg rect")
            assert pg.evaluate("window.violations") == []
            assert errors == []
        finally:
            context.close()


def test_dashboard_lists_every_node_and_one_leader(cluster3: Cluster, page: Any) -> None:
    page.wait_for_function(
        "document.querySelectorAll('#nodes tr[data-role]:not([data-role=unreachable])')"
        ".length === 3")
    rows = page.eval_on_selector_all(
        "#nodes tr", "rows => rows.map(r => [r.dataset.node, r.dataset.role])")
    assert sorted(n for n, _ in rows) == ["node-0", "node-1", "node-2"]
    leaders = [n for n, role in rows if role == "leader"]
    assert leaders == [f"node-{cluster3.leader_index()}"]
    assert page.inner_text("#leader") == leaders[0]
    assert page.inner_text("#nodes tr[data-role=leader] .health").strip() == "ready"
    page.wait_for_function("document.querySelector('#conn').textContent.includes('live')")


def test_task_submitted_through_the_form_reaches_succeeded_without_a_reload(
        cluster3: Cluster, page: Any) -> None:
    page.fill("textarea[name=data]",
              "sh: sleep 0.5; echo chunk $TASKANDGO_CHUNK_INDEX of $TASKANDGO_CHUNK_COUNT")
    page.select_option("select[name=priority]", "high")
    page.select_option("select[name=strategy]", "split")
    page.fill("input[name=shards]", "6")
    page.click("#submit-form button[type=submit]")
    page.wait_for_selector("#submitted-id")
    task_id = page.inner_text("#submitted-id")
    row = f'#tasks tr[data-task-id="{task_id}"]'
    page.wait_for_selector(row)
    page.wait_for_selector(f'{row}[data-status="succeeded"]')
    assert page.evaluate("window.notReloaded === true"), "the page was reloaded"
    assert "6/6" in page.inner_text(f"{row} .progress")
    with cluster3.client() as c:
        task = c.get(task_id)
    assert task["status"] == "succeeded" and task["chunk_count"] == 6
    assert task["priority_name"] == "high"

    # Live: a task submitted elsewhere shows up from the event stream, well before
    # the page's slow periodic refresh would fetch it.
    with cluster3.client() as c:
        other = c.submit("python: print('from the API')", strategy="batch")
        accepted = time.monotonic()
    page.wait_for_selector(f'#tasks tr[data-task-id="{other}"]')
    assert time.monotonic() - accepted < 2.5, "the page did not update from the event stream"
    page.wait_for_selector(f'#tasks tr[data-task-id="{other}"][data-status="succeeded"]')
    # A task run once on every node is shown as such.
    with cluster3.client() as c:
        every = c.submit("sh: echo here", on_every_node=True)
    page.wait_for_selector(f'#tasks tr[data-task-id="{every}"][data-status="succeeded"]')
    assert "split (on every node)" in page.inner_text(f'#tasks tr[data-task-id="{every}"]')
    # Free slots and running sets come with the workers' heartbeats, after the
    # results: the page catches up without a reload too.
    page.wait_for_function("[...document.querySelectorAll('#nodes td.runs')]"
                           ".every(td => td.textContent === '–')")  # noqa: RUF001
    page.click(f"{row} button.toggle")
    page.wait_for_selector(f'#tasks tr[data-chunks-of="{task_id}"] tr[data-chunk="5"]')
    _screenshot(page, "dashboard.png")


def _series_sum(page: Any, chart: str, series: str) -> float:
    """What a chart's line adds up to over its window (the path's data-sum)."""
    value = page.get_attribute(f'#{chart} path[data-series="{series}"]', "data-sum")
    return float(value or 0)


def test_charts_move_under_load_and_the_task_stream_shows_a_fan_out_and_an_urgent_task(
        cluster3: Cluster, page: Any) -> None:
    page.wait_for_selector('#chart-throughput path[data-series="started"]')
    page.wait_for_selector("#chart-cpu path[data-series=node-0]")
    before_d = page.get_attribute('#chart-throughput path[data-series="started"]', "d")
    before = _series_sum(page, "chart-throughput", "started")
    with cluster3.client() as c:
        # Many short tasks (more than the 12 slots: some wait in the queue), then a
        # split task fanned out over the nodes, then an urgent one.
        c.submit_many([task_spec("sh: sleep 0.3", priority="low", strategy="batch")
                       for _ in range(60)])
        split = c.submit("sh: sleep 1.5; echo $TASKANDGO_CHUNK_INDEX", strategy="split",
                         shards=6, priority="medium")
        urgent = c.submit("sh: sleep 0.5; echo urgent", strategy="batch", priority="critical")
    # Throughput: 60 + 6 + 1 unit runs started, drawn without a reload.
    page.wait_for_function(
        """([before]) => {
             const p = document.querySelector('#chart-throughput path[data-series="started"]');
             const f = document.querySelector('#chart-throughput path[data-series="finished"]');
             return Number(p.dataset.sum) >= before + 67 && Number(f.dataset.sum) >= 67;
           }""", arg=[before], timeout=60_000)
    assert page.get_attribute('#chart-throughput path[data-series="started"]', "d") != before_d
    # The queue had low-priority units waiting; latencies were drawn.
    assert _series_sum(page, "chart-queue", "low") > 0
    assert page.eval_on_selector_all("#chart-latency circle", "cs => cs.length") > 0
    assert _series_sum(page, "chart-latency", "p99") > 0
    # CPU and memory: a line per node.
    names = page.eval_on_selector_all("#chart-memory path[data-series]",
                                      "ps => ps.map(p => p.dataset.series)")
    assert sorted(names) == ["node-0", "node-1", "node-2"]
    # The task stream: the split's six chunks as bars on several nodes, and the
    # urgent task's bar in the critical colour.
    page.wait_for_function(
        """([split, urgent]) => {
             const bars = [...document.querySelectorAll(`#stream rect[data-task="${split}"]`)];
             const chunks = new Set(bars.map(b => b.dataset.chunk));
             const nodes = new Set(bars.map(b => b.dataset.node));
             const hot = document.querySelector(
               `#stream rect[data-task="${urgent}"][data-priority="critical"]`);
             return chunks.size === 6 && nodes.size >= 2 && hot !== null
               && !hot.classList.contains('open');
           }""", arg=[split, urgent], timeout=60_000)
    lanes = page.eval_on_selector_all("#stream text.lane", "ts => ts.map(t => t.textContent)")
    assert sorted(lanes) == ["node-0", "node-1", "node-2"]
    # The charts keep moving: a later sample differs again.
    later = page.get_attribute('#chart-throughput path[data-series="started"]', "d")
    page.wait_for_function(
        """([d]) => document.querySelector('#chart-throughput path[data-series="started"]')
                      .getAttribute('d') !== d""", arg=[later])
    assert page.evaluate("window.notReloaded === true")
    page.locator("#charts-panel").scroll_into_view_if_needed()
    _screenshot(page, "dashboard-charts.png")


def test_scheduled_waiting_and_schedules_show_with_their_times(cluster3: Cluster,
                                                              page: Any) -> None:
    """A delayed task shows as scheduled with its start time, a dependent one as waiting
    with its parent under its id, and a schedule with its next fire (issue 17)."""
    with cluster3.client() as c:
        c.submit("sh: echo later", id="dash-later", delay_s=600)
        c.submit("sh: echo child", id="dash-child", after=["dash-later"])
        c.create_schedule(id="dash-hourly", cron="@hourly", task={"data": "sh: echo h"})
    page.wait_for_function(
        "document.querySelector('#tasks tr[data-task-id=\"dash-later\"]')"
        " && document.querySelector('#schedules tr[data-schedule-id=\"dash-hourly\"]')")
    later = page.inner_text('#tasks tr[data-task-id="dash-later"]')
    assert "scheduled" in later and "runs at" in later and "in 10 min" in later, later
    child = page.inner_text('#tasks tr[data-task-id="dash-child"]')
    assert "waiting" in child and "after dash-later" in child, child
    assert "then dash-child" in later, later
    row = page.inner_text('#schedules tr[data-schedule-id="dash-hourly"]')
    assert "@hourly" in row and "active" in row and "min" in row, row
    with cluster3.client() as c:
        c.cancel("dash-later")
        c.delete_schedule("dash-hourly")
    _screenshot(page, "dashboard-schedules.png")


def test_page_shows_the_new_leader_after_the_leader_is_killed(
        cluster3: Cluster, page: Any) -> None:
    old = cluster3.leader_index()
    assert old is not None
    cluster3.kill(old)  # kill -9

    def new_leader() -> str | None:
        i = cluster3.leader_index()
        return f"node-{i}" if i not in (None, old) else None

    leader = wait_for(new_leader, 30, "a new leader")
    page.wait_for_function(
        """([leader, dead]) => {
             const rows = [...document.querySelectorAll('#nodes tr')];
             const leaders = rows.filter(r => r.dataset.role === 'leader');
             return document.querySelector('#leader').textContent === leader
               && leaders.length === 1 && leaders[0].dataset.node === leader
               && rows.some(r => r.dataset.node === dead && r.dataset.role === 'unreachable');
           }""", arg=[leader, f"node-{old}"])
    assert page.evaluate("window.notReloaded === true")
    # The task stream goes on under the new leader: runs started after the kill are
    # drawn, ended.
    with cluster3.client() as c:
        ids = [r["task_id"] for r in c.submit_many(
            [task_spec("sh: echo after", strategy="batch") for _ in range(8)])]
    page.wait_for_function(
        """([ids]) => ids.every(id => document.querySelector(
             `#stream rect[data-task="${id}"]:not(.open)`))""", arg=[ids], timeout=60_000)
    _screenshot(page, "dashboard-after-leader-kill.png")
