// The TaskAndGo dashboard's script (dashboard.html), served from this node: the
// Content-Security-Policy runs no inline script.
"use strict";

const RECENT = 30;            // finished tasks shown
const PERIODIC_MS = 3000;     // refresh without events (CPU, memory, heartbeats)
const DEBOUNCE_MS = 150;      // events within this window cause one refetch
const FETCH_TIMEOUT_MS = 6000;
const PRIORITIES = ["critical", "high", "medium", "low"];
const STATUSES = ["scheduled", "waiting", "queued", "running", "succeeded", "failed",
  "cancelled", "upstream_failed"];
const STATUS_ORDER = {running: 0, queued: 1, scheduled: 2, waiting: 3};
const SETTLE_MS = 800;        // one more refetch after a burst (slots, running sets)

const $ = (id) => document.getElementById(id);
const openChunks = new Set();  // split tasks whose chunk list is expanded
const nameByAddress = {};      // grpc address -> node id, to name unreachable voters

/** h("td", {class: "x"}, child...) builds an element; strings become text nodes. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    // Through the CSSOM: the Content-Security-Policy forbids style attributes.
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== undefined && c !== null) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

// A node with API tokens answers 401 until the token is given (kept for this tab).
let token = sessionStorage.getItem("taskandgo-token") || "";

async function api(path, options = {}) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
  const headers = {...options.headers, ...(token ? {Authorization: `Bearer ${token}`} : {})};
  try {
    const res = await fetch(path, {...options, headers, signal: ctl.signal, cache: "no-store"});
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      const err = new Error(body.error || `${res.status} ${res.statusText}`);
      err.field = body.field;
      err.status = res.status;
      throw err;
    }
    return body;
  } finally {
    clearTimeout(timer);
  }
}

// ------------------------------------------------------------------ formatting

const pct = (x) => `${Math.round(x || 0)}%`;
const mb = (b) => b ? `${Math.round(b / 1048576)} MiB` : "";
const clock = (t) => t ? new Date(t * 1000).toLocaleTimeString() : "–";
function secs(a, b) {
  if (!a) return "–";
  const s = Math.max(0, (b || Date.now() / 1000) - a);
  return s < 10 ? `${s.toFixed(2)} s` : s < 120 ? `${s.toFixed(1)} s` : `${Math.round(s / 60)} min`;
}
/** How far off a start time is ("in 42 s", "in 5 min", "due"). */
function startsIn(at) {
  const s = at - Date.now() / 1000;
  return s <= 0 ? "due" : s < 120 ? `in ${Math.ceil(s)} s` : s < 7200 ? `in ${Math.round(s / 60)} min`
    : `in ${(s / 3600).toFixed(1)} h`;
}
const badge = (text) => h("span", {class: `badge s-${text}`}, text);
function meter(value, label) {
  const v = Math.max(0, Math.min(100, value || 0));
  return h("div", {class: "meter"}, h("i", {style: `width:${v}%`}), h("span", {}, label));
}

// ------------------------------------------------------------------ rendering

// A voter the leader has not heard from: "unknown" during a new leader's first
// lease, "unreachable" after it.
const missing = (n) => n.role === "unreachable" || n.role === "unknown";

function renderNodes(cluster) {
  const tbody = $("nodes");
  const rows = [...cluster.nodes].map((n) => {
    if (!missing(n)) nameByAddress[n.grpc_address] = n.id;
    return {...n, name: missing(n) ? (nameByAddress[n.grpc_address] || n.id) : n.id};
  }).sort((a, b) => a.name.localeCompare(b.name, undefined, {numeric: true}));
  tbody.replaceChildren(...rows.map((n) => {
    const down = missing(n);
    const health = n.role === "unknown" ? "not reported yet"
      : down ? "unreachable" : n.ready ? "ready" : "not ready";
    return h("tr", {"data-node": n.name, "data-role": n.role},
      h("td", {}, h("b", {}, n.name),
        h("div", {class: "muted mono"}, n.http_address || n.grpc_address)),
      h("td", {class: "role"}, badge(n.role)),
      h("td", {class: "health", title: down ? "" : `last heartbeat ${n.last_seen_s} s ago`},
        h("span", {class: `dot ${down ? "off" : n.ready ? "on" : "wait"}`}), health),
      h("td", {}, down ? "–" : meter(n.cpu_percent, pct(n.cpu_percent))),
      h("td", {}, down ? "–" : meter(n.memory_percent,
        `${pct(n.memory_percent)} · ${mb(n.memory_rss)}`)),
      h("td", {class: "num"}, down ? "–" : `${n.free_slots} / ${n.slots}`),
      h("td", {class: "runs mono", title: (n.running || []).join(" ")},
        (n.running || []).length ? `${n.running.length}: ${n.running.join(" ")}` : "–"));
  }));
  $("nodes-count").textContent = `${rows.filter((n) => !missing(n)).length} up`
    + ` of ${rows.length}`;
  $("leader").textContent = cluster.leader_id || "–";
  $("committed").textContent = cluster.committed_results;
  const counts = cluster.tasks_by_status || {};
  $("counts").replaceChildren(...STATUSES.filter((s) => s in counts).map(
    (s) => h("span", {}, `${s} `, h("b", {}, counts[s]))));
}

function renderQueue(node, queued) {
  let byPriority = node && node.voter ? {...node.queue_by_priority} : null;
  if (!byPriority) {  // a worker holds no replica: count the queued tasks instead
    byPriority = {};
    for (const t of queued) byPriority[t.priority_name] = (byPriority[t.priority_name] || 0) + 1;
  }
  const names = [...PRIORITIES, ...Object.keys(byPriority).filter((p) => !PRIORITIES.includes(p))
    .sort((a, b) => Number(b) - Number(a))];
  const total = Object.values(byPriority).reduce((a, b) => a + b, 0);
  const most = Math.max(1, ...Object.values(byPriority));
  $("queue").replaceChildren(...names.map((p) => h("div", {class: "qrow", "data-priority": p},
    badge(p), meter(100 * (byPriority[p] || 0) / most, ""),
    h("span", {class: "num"}, byPriority[p] || 0))));
  $("queued-total").textContent = `${total} queued unit${total === 1 ? "" : "s"}`;
}

function chunkProgress(t) {
  const done = t.chunks_done, n = t.chunk_count;
  const open = openChunks.has(t.id);
  return h("div", {class: "progress", title: `${done} of ${n} chunks done`},
    meter(100 * done / n, ""), h("span", {class: "mono"}, `${done}/${n}`),
    h("button", {class: "link toggle", type: "button",
      onclick: () => { open ? openChunks.delete(t.id) : openChunks.add(t.id); renderTasks(); }},
      open ? "hide chunks" : "chunks"));
}

/** A split task's chunks, as a row under the task's own. */
function chunkRow(t) {
  return h("tr", {class: "chunks-row", "data-chunks-of": t.id}, h("td", {colspan: 11},
    h("table", {class: "chunks"},
      h("tr", {}, ["chunk", "status", "node", "attempts", "ran", "result"].map(
        (c) => h("th", {}, c))),
      t.chunks.map((c) => h("tr", {"data-chunk": c.index},
        h("td", {class: "num"}, c.index), h("td", {}, badge(c.status)),
        h("td", {}, c.node || "–"), h("td", {class: "num"}, c.attempts),
        h("td", {class: "num"}, c.started_at ? secs(c.started_at, c.finished_at) : "–"),
        h("td", {class: "result mono", title: c.result || c.error},
          c.result || c.error || ""))))));
}

/** A task's parents (it waits for them) and children (they wait for it), if any. */
function relations(t) {
  const line = (label, ids) => h("div", {class: "muted relations", title: ids.join(" ")},
    `${label} ${ids.slice(0, 3).join(", ")}${ids.length > 3 ? ` +${ids.length - 3}` : ""}`);
  return [
    t.parents && t.parents.length ? line("after", t.parents) : "",
    t.children && t.children.length ? line("then", t.children) : "",
    t.schedule_id ? h("div", {class: "muted relations"}, `schedule ${t.schedule_id}`) : "",
  ];
}

/** The schedules table: next fire time and the last slot's task and its status. */
function renderSchedules(schedules) {
  $("schedules-panel").hidden = schedules.length === 0;
  $("schedules").replaceChildren(...schedules.map((s) => {
    const last = s.recent.length ? s.recent[s.recent.length - 1] : null;
    return h("tr", {"data-schedule-id": s.id},
      h("td", {class: "mono"}, s.id),
      h("td", {class: "mono nowrap"}, `${s.cron} (${s.time_zone})`),
      h("td", {}, badge(s.paused ? "paused" : "active")),
      h("td", {class: "nowrap", "data-next-fire": s.next_fire},
        s.next_fire ? `${clock(s.next_fire)} (${startsIn(s.next_fire)})` : "–"),
      h("td", {class: "num"}, s.fires_total),
      h("td", {class: "num"}, s.skipped_total),
      h("td", {class: "mono nowrap"}, last ? [last.task_id || last.outcome, " ",
        last.task_status ? badge(last.task_status) : ""] : "–"));
  }));
}

let shownTasks = [];

/** Render the task table (again, from the last data when called without any). */
function renderTasks(tasks = shownTasks) {
  shownTasks = tasks;
  $("tasks").replaceChildren(...tasks.flatMap((t) => {
    const active = ["running", "queued", "scheduled", "waiting"].includes(t.status);
    const cancel = active ? h("button", {class: "small cancel", title: "Cancel (kills it if running)",
      onclick: (e) => cancelTask(t.id, e.target)}, "Cancel") : "";
    const nodes = t.node || [...new Set(t.chunks.map((c) => c.node).filter(Boolean))].join(" ");
    const row = h("tr", {"data-task-id": t.id, "data-status": t.status},
      h("td", {class: "mono"}, t.id, t.chunk_count ? chunkProgress(t) : "", relations(t)),
      h("td", {class: "status"}, badge(t.status)),
      h("td", {}, t.priority_name || t.priority),
      h("td", {}, (t.spec && t.spec.on_every_node) ? `${t.strategy} (on every node)` : t.strategy),
      h("td", {class: "nowrap"}, nodes || "–"),
      h("td", {class: "num"}, t.attempts),
      h("td", {class: "nowrap"}, clock(t.created_at)),
      h("td", {class: "num"}, secs(t.created_at, t.started_at || null)),
      h("td", {class: "num"}, t.started_at ? secs(t.started_at, t.finished_at || null) : "–"),
      t.status === "scheduled" && t.run_at
        ? h("td", {class: "result nowrap", "data-run-at": t.run_at},
          `runs at ${clock(t.run_at)} (${startsIn(t.run_at)})`)
        : ["queued", "waiting"].includes(t.status)
        ? h("td", {class: "result"}, h("button", {class: "small why",
          title: "Why has it not started? (asks the node: GET /api/v1/tasks/ID)",
          onclick: (e) => whyPending(t.id, e.target)}, "Why pending?"))
        : h("td", {class: `result mono ${t.error && t.status !== "succeeded" ? "err" : ""}`,
          title: t.result || t.error}, t.status === "succeeded" ? t.result : (t.error || t.result)),
      h("td", {}, cancel));
    return t.chunk_count && openChunks.has(t.id) ? [row, chunkRow(t)] : [row];
  }));
}

/** Replace the button with the task's pending_reason, as planning sees it now. */
async function whyPending(id, button) {
  button.disabled = true;
  try {
    const t = await api(`/api/v1/tasks/${encodeURIComponent(id)}`);
    button.replaceWith(h("span", {class: "muted pending-reason"},
      t.pending_reason || (t.status === "running" ? "started" : t.status)));
  } catch (err) {
    button.disabled = false;
    button.title = String(err);
  }
}

// ------------------------------------------------------------------ data

async function loadTasks() {
  const [running, queued, head, scheduled, waiting] = await Promise.all([
    api("/api/v1/tasks?status=running&limit=200"),
    api("/api/v1/tasks?status=queued&limit=100"),
    api("/api/v1/tasks?limit=1"),
    api("/api/v1/tasks?status=scheduled&limit=100"),
    api("/api/v1/tasks?status=waiting&limit=100"),
  ]);
  const offset = Math.max(0, head.total - RECENT);
  const recent = head.total > 1 ? (await api(`/api/v1/tasks?limit=${RECENT}&page_token=${offset}`)).tasks
                                : head.tasks;
  const byId = new Map();
  for (const t of [...running.tasks, ...queued.tasks, ...scheduled.tasks, ...waiting.tasks,
    ...recent]) {
    byId.set(t.id, t);
  }
  const tasks = [...byId.values()].sort((a, b) =>
    (STATUS_ORDER[a.status] ?? 2) - (STATUS_ORDER[b.status] ?? 2) || b.created_at - a.created_at);
  return {tasks, queued: queued.tasks};
}

let refreshing = false, again = false, debounce = null, settle = null, periodic = null;

/** Refetch everything; concurrent calls collapse into one follow-up refresh. */
async function refresh() {
  if (refreshing) { again = true; return; }
  refreshing = true;
  clearTimeout(periodic);
  const errors = [];
  let unauthorized = false;
  const attempt = (label, promise) => promise.catch((e) => {
    errors.push(`${label}: ${e.message}`);
    unauthorized ||= e.status === 401;
    return null;
  });
  const [node, cluster, tasks, schedules] = await Promise.all([
    attempt("this node", api("/api/v1/node")),
    attempt("cluster", api("/api/v1/cluster")),
    attempt("tasks", loadTasks()),
    attempt("schedules", api("/api/v1/schedules")),
  ]);
  if (schedules) renderSchedules(schedules.schedules);
  $("schedules-panel").classList.toggle("stale", !schedules);
  if (node) {
    $("self").textContent = `${node.id} (${node.role})`;
    $("term").textContent = node.raft_term ?? "–";
  }
  if (cluster) {
    renderNodes(cluster);
    slotsByNode = Object.fromEntries(cluster.nodes.filter((n) => !missing(n))
      .map((n) => [n.id, n.slots]));
  }
  $("nodes-panel").classList.toggle("stale", !cluster);
  if (tasks) {
    renderTasks(tasks.tasks);
    renderQueue(node, tasks.queued);
  }
  $("tasks-panel").classList.toggle("stale", !tasks);
  $("token-form").hidden = !unauthorized;
  $("banner").hidden = errors.length === 0;
  $("banner").textContent = errors.length ? `Retrying: ${errors.join("; ")}` : "";
  refreshing = false;
  if (again) { again = false; scheduleRefresh(); }
  // After an error (say, during an election) retry soon; otherwise refresh slowly.
  periodic = setTimeout(refresh, errors.length ? 1000 : PERIODIC_MS);
}

/** Refetch soon, once per burst of events, and once more when the burst has
 *  settled: free slots and running sets arrive with the next heartbeat. */
function scheduleRefresh() {
  clearTimeout(settle);
  settle = setTimeout(refresh, SETTLE_MS);
  if (debounce) return;
  debounce = setTimeout(() => { debounce = null; refresh(); }, DEBOUNCE_MS);
}

// ------------------------------------------------------------------ charts

// Drawn by hand as SVG from GET /api/v1/history: no chart library, nothing fetched
// from elsewhere. SVG presentation attributes (stroke, fill) are not style
// attributes: the Content-Security-Policy allows them.
const SVG_NS = "http://www.w3.org/2000/svg";
const HISTORY_MS = 2000;      // how often the charts and the task stream are redrawn
const STREAM_S = 60;          // seconds shown in the task stream
const CHART_W = 460, CHART_H = 170;
const MARGIN = {left: 44, right: 10, top: 8, bottom: 26};
const PRIORITY_COLORS = {critical: "#dc2626", high: "#ea580c", medium: "#2563eb",
                         low: "#64748b"};
const PALETTE = ["#2563eb", "#16a34a", "#ea580c", "#9333ea", "#0891b2", "#ca8a04", "#db2777",
                 "#4b5563"];
const priorityColor = (name) => PRIORITY_COLORS[name] || "#9333ea";

/** s("rect", {x: 1}, child...) builds an SVG element. */
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== undefined && c !== null) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

/** A round step for an axis from 0 to max with about `count` ticks. */
function niceStep(max, count) {
  const raw = Math.max(max, 1e-9) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw);
}

const fmtNum = (v) => Math.abs(v) >= 100 || Number.isInteger(v) ? String(Math.round(v))
  : v.toFixed(Math.abs(v) >= 10 ? 1 : 2).replace(/\.?0+$/, "");

/** Time axis labels: minutes (or seconds) before `t1`. */
function timeTicks(t0, t1) {
  const span = t1 - t0;
  const step = span > 240 ? 60 : span > 90 ? 30 : span > 40 ? 10 : 5;
  const out = [];
  for (let ago = 0; ago <= span + 1e-6; ago += step) {
    out.push({t: t1 - ago, label: ago === 0 ? "now"
      : step >= 60 ? `-${ago / 60} min` : `-${ago} s`});
  }
  return out;
}

/**
 * A line chart into `figure`: title and unit above, y axis with ticks from 0, a time
 * axis, one path per series (data-series = its name; a null value breaks the line
 * unless opts.connect), and a legend.
 */
function lineChart(figure, opts) {
  const {title, unit, t0, t1, series} = opts;
  const w = CHART_W - MARGIN.left - MARGIN.right, ht = CHART_H - MARGIN.top - MARGIN.bottom;
  const values = series.flatMap((se) => se.points.map((p) => p[1])).filter((v) => v !== null);
  const top = Math.max(opts.minTop || 1, ...values);
  const step = niceStep(top, 4);
  const yMax = Math.ceil(top / step) * step;
  const x = (t) => MARGIN.left + w * (t - t0) / Math.max(1e-9, t1 - t0);
  const y = (v) => MARGIN.top + ht * (1 - v / yMax);
  const grid = [];
  for (let v = 0; v <= yMax + step / 2; v += step) {
    grid.push(s("line", {class: "grid", x1: MARGIN.left, x2: MARGIN.left + w, y1: y(v), y2: y(v)}),
      s("text", {x: MARGIN.left - 4, y: y(v) + 3, "text-anchor": "end"}, fmtNum(v)));
  }
  for (const tick of timeTicks(t0, t1)) {
    grid.push(s("line", {class: "axis", x1: x(tick.t), x2: x(tick.t), y1: MARGIN.top + ht,
      y2: MARGIN.top + ht + 4}),
    s("text", {x: x(tick.t), y: MARGIN.top + ht + 15, "text-anchor": "middle"}, tick.label));
  }
  const paths = series.map((se) => {
    let d = "", pen = false;
    for (const [t, v] of se.points) {
      if (t < t0) continue;
      if (v === null) { if (!opts.connect) pen = false; continue; }
      d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    }
    // data-sum: what the line adds up to in the window (for tests and curious users).
    const sum = se.points.reduce((acc, [t, v]) => acc + (t >= t0 && v !== null ? v : 0), 0);
    return s("path", {class: "line", d: d || "M0,0", stroke: se.color, "data-series": se.name,
      "data-sum": fmtNum(sum), "stroke-opacity": d ? 1 : 0});
  });
  // Sparse series (a latency only where tasks ended): a dot per value, so a lone
  // value shows too.
  const dots = opts.dots ? series.flatMap((se) => se.points
    .filter(([t, v]) => v !== null && t >= t0)
    .map(([t, v]) => s("circle", {cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 2,
      fill: se.color}))) : [];
  const svg = s("svg", {viewBox: `0 0 ${CHART_W} ${CHART_H}`, role: "img",
    "aria-label": `${title} (${unit})`},
  grid,
  s("line", {class: "axis", x1: MARGIN.left, x2: MARGIN.left + w, y1: MARGIN.top + ht,
    y2: MARGIN.top + ht}),
  s("line", {class: "axis", x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top,
    y2: MARGIN.top + ht}),
  paths, dots,
  values.length ? null : s("text", {class: "empty", x: MARGIN.left + w / 2,
    y: MARGIN.top + ht / 2, "text-anchor": "middle"}, opts.empty || "no data yet"));
  const legend = h("div", {class: "legend"}, series.map((se) => h("span", {"data-legend": se.name},
    s("svg", {viewBox: "0 0 14 8"}, s("rect", {width: 14, height: 8, rx: 2, fill: se.color})),
    se.label || se.name)));
  figure.replaceChildren(h("figcaption", {}, title, h("span", {class: "muted"}, ` (${unit})`)),
    svg, legend);
}

/** One series per key of sample[field] (an object), its value picked by `pick`. */
function keyedSeries(samples, field, pick, colorOf) {
  const names = [];
  for (const smp of samples) {
    for (const k of Object.keys(smp[field] || {})) if (!names.includes(k)) names.push(k);
  }
  names.sort((a, b) => a.localeCompare(b, undefined, {numeric: true}));
  return names.map((name, i) => ({name, color: colorOf(name, i), points: samples.map(
    (smp) => [smp.t + 0.5, smp[field] && name in smp[field] ? pick(smp[field][name]) : null])}));
}

function renderCharts(hist) {
  const win = Number($("window").value);
  const t1 = hist.now, t0 = t1 - win;
  const smp = hist.samples.filter((x) => x.t + 1 >= t0);
  const at = (x) => x.t + 0.5;
  lineChart($("chart-throughput"), {title: "Throughput", unit: "unit runs per second", t0, t1,
    series: [
      {name: "started", color: "#2563eb", points: smp.map((x) => [at(x), x.started])},
      {name: "finished", color: "#16a34a", points: smp.map((x) => [at(x), x.finished])}]});
  // Queue depth: every priority seen in the window; a sample without a queue (a node
  // that could not read it) breaks the line. Missing priority in a sample = 0 queued.
  const prios = [...new Set(smp.flatMap((x) => Object.keys(x.queue || {})))];
  const order = (p) => { const i = PRIORITIES.indexOf(p); return i < 0 ? -Number(p) : i - 1e9; };
  prios.sort((a, b) => order(a) - order(b));
  lineChart($("chart-queue"), {title: "Queue depth by priority", unit: "queued units", t0, t1,
    empty: "nothing queued",
    series: (prios.length ? prios : ["critical", "high", "medium", "low"]).map((p) => ({
      name: p, color: priorityColor(p),
      points: smp.map((x) => [at(x), x.queue ? (x.queue[p] || 0) : null])}))});
  lineChart($("chart-latency"), {title: "Submit → result latency", unit: "seconds", t0, t1,
    connect: true, dots: true, minTop: 0.1, empty: "no task finished yet",
    series: [
      {name: "p50", color: "#2563eb", points: smp.map((x) => [at(x), x.p50_s])},
      {name: "p99", color: "#dc2626", points: smp.map((x) => [at(x), x.p99_s])}]});
  const nodeColor = (name, i) => PALETTE[i % PALETTE.length];
  lineChart($("chart-cpu"), {title: "CPU per node", unit: "% of its limit", t0, t1, minTop: 10,
    series: keyedSeries(smp, "nodes", (n) => n.cpu_percent, nodeColor)});
  lineChart($("chart-memory"), {title: "Memory per node", unit: "MiB resident", t0, t1,
    minTop: 10, series: keyedSeries(smp, "nodes", (n) => n.memory_rss / 1048576, nodeColor)});
}

/**
 * The task stream: one row per slot of each node (runs packed into rows greedily,
 * at least the node's slot count), each run a bar from start to end (to now while
 * running), coloured by its task's priority; hovering names the task and chunk.
 */
function renderStream(hist, slotsByNode) {
  const t1 = hist.now, t0 = t1 - STREAM_S;
  const runs = hist.spans.filter((sp) => (sp.end ?? t1) >= t0)
    .sort((a, b) => a.start - b.start);
  const nodes = [...new Set([...Object.keys(slotsByNode), ...runs.map((r) => r.node)])]
    .sort((a, b) => a.localeCompare(b, undefined, {numeric: true}));
  const lanes = [];  // {node, slot, until}
  const laneOf = new Map();
  for (const node of nodes) {
    const mine = [];
    for (let i = 0; i < (slotsByNode[node] || 0); i++) mine.push({node, slot: i + 1, until: -Infinity});
    for (const r of runs.filter((x) => x.node === node)) {
      let lane = mine.find((l) => l.until <= r.start + 1e-3);
      if (!lane) { lane = {node, slot: mine.length + 1, until: -Infinity}; mine.push(lane); }
      lane.until = r.end ?? Infinity;
      laneOf.set(r, lane);
    }
    lanes.push(...mine);
  }
  const rowH = 14, left = 90, right = 10, top = 4, bottom = 24, W = 1300;
  const w = W - left - right, H = top + bottom + Math.max(1, lanes.length) * rowH;
  const x = (t) => left + w * (Math.max(t0, Math.min(t1, t)) - t0) / STREAM_S;
  const rowY = new Map(lanes.map((l, i) => [l, top + i * rowH]));
  const items = [];
  lanes.forEach((l, i) => {
    const yy = top + i * rowH;
    if (l.slot === 1) {
      items.push(s("line", {class: "lane-line", x1: 0, x2: W - right, y1: yy, y2: yy}),
        s("text", {class: "lane", x: 4, y: yy + 11}, l.node));
    }
    // Rows beyond the node's slots hold units assigned ahead of a free slot (the
    // prefetch window): their bars start at the assignment until the worker reports
    // when the unit really started.
    const extra = l.slot > (slotsByNode[l.node] || 0);
    items.push(s("text", {x: left - 6, y: yy + 11, "text-anchor": "end"},
      extra ? "prefetched" : `slot ${l.slot}`));
  });
  for (const tick of timeTicks(t0, t1)) {
    items.push(s("line", {class: "grid", x1: x(tick.t), x2: x(tick.t), y1: top,
      y2: H - bottom}),
    s("text", {x: x(tick.t), y: H - bottom + 14, "text-anchor": "middle"}, tick.label));
  }
  for (const r of runs) {
    const lane = laneOf.get(r);
    const end = r.end ?? t1;
    const name = r.priority_name ?? "unknown";
    const label = `${r.task_id}${r.chunk >= 0 ? ` chunk ${r.chunk}` : ""} on ${r.node}: `
      + `${name} priority, ${(end - r.start).toFixed(2)} s, ${r.end === null ? "running" : r.status}`;
    items.push(s("rect", {class: `run ${r.end === null ? "open" : ""} ${r.status}`,
      x: x(r.start).toFixed(1), y: rowY.get(lane) + 2,
      width: Math.max(2, x(end) - x(r.start)).toFixed(1), height: rowH - 4, rx: 2,
      fill: r.priority_name ? priorityColor(name) : "#94a3b8",
      "data-task": r.task_id, "data-chunk": r.chunk, "data-node": r.node,
      "data-priority": name}, s("title", {}, label)));
  }
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "Task stream: unit runs per node slot over time"}, items,
  runs.length ? null : s("text", {class: "empty", x: left + w / 2, y: top + 10,
    "text-anchor": "middle"}, "no unit ran in the last minute"));
  const legend = h("div", {class: "legend"}, ["critical", "high", "medium", "low"].map((p) =>
    h("span", {}, s("svg", {viewBox: "0 0 14 8"},
      s("rect", {width: 14, height: 8, rx: 2, fill: priorityColor(p)})), p)),
  h("span", {}, "lighter: still running; red outline: failed"));
  $("stream").replaceChildren(svg, legend);
}

let slotsByNode = {};
let historyTimer = null;

/** Fetch the history and redraw; keeps the last drawing (marked stale) on error. */
async function refreshHistory() {
  clearTimeout(historyTimer);
  try {
    const hist = await api(`/api/v1/history?window_s=${$("window").value}&spans=2000`);
    renderCharts(hist);
    renderStream(hist, slotsByNode);
    $("history-source").textContent = hist.forwarded_from
      ? `· recorded by ${hist.forwarded_from}` : `· recorded by ${hist.node}`;
    $("charts-panel").classList.remove("stale");
    $("stream-panel").classList.remove("stale");
  } catch (e) {
    $("charts-panel").classList.add("stale");
    $("stream-panel").classList.add("stale");
  }
  historyTimer = setTimeout(refreshHistory, HISTORY_MS);
}
$("window").addEventListener("change", refreshHistory);

// ------------------------------------------------------------------ live events

function setConn(state, text) {
  $("conn").replaceChildren(h("span", {class: `dot ${state}`}), text);
}

let source = null;
let lastEventId = "";
let reconnect = null;
/** Opens the event stream. EventSource cannot send headers, and a token in the URL
 *  would end up in logs and history: with a token, ask for a stream ticket first
 *  (good for 30 s and one stream) and open the stream with it. A ticket cannot be
 *  used twice, so every reconnect (the browser's own included) starts here again,
 *  resuming after the last event seen. */
async function connectEvents() {
  clearTimeout(reconnect);
  if (source) source.close();
  source = null;
  const params = new URLSearchParams();
  if (lastEventId) params.set("after", lastEventId);
  if (token) {
    try {
      params.set("ticket", (await api("/api/v1/events/ticket", {method: "POST"})).ticket);
    } catch (e) {
      setConn("wait", e.status === 401 ? "token needed" : "reconnecting");
      reconnect = setTimeout(connectEvents, 2000);
      return;
    }
  }
  const query = params.toString();
  const es = source = new EventSource("/api/v1/events" + (query ? `?${query}` : ""));
  es.onopen = () => { setConn("on", "live"); scheduleRefresh(); };
  const seen = (e) => { if (e.lastEventId) lastEventId = e.lastEventId; scheduleRefresh(); };
  for (const kind of ["task", "leader", "node", "reset"]) es.addEventListener(kind, seen);
  es.onerror = () => {
    // Not the browser's own reconnect: it would present the used ticket again.
    setConn("wait", "reconnecting");
    es.close();
    if (source === es) reconnect = setTimeout(connectEvents, 1000);
  };
}

// ------------------------------------------------------------------ actions

async function cancelTask(id, button) {
  button.disabled = true;
  try {
    await api(`/api/v1/tasks/${encodeURIComponent(id)}/cancel`, {method: "POST"});
  } catch (e) {
    button.disabled = false;
    alert(`Cancel ${id}: ${e.message}`);
  }
  scheduleRefresh();
}

$("submit-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = e.target, out = $("submit-result");
  const f = Object.fromEntries(new FormData(form));
  for (const el of form.elements) el.classList.remove("invalid");
  const spec = {data: f.data.trim(), priority: f.priority};
  if (f.strategy) spec.strategy = f.strategy;
  if (Number(f.shards)) spec.shards = Number(f.shards);
  if (Number(f.retries)) spec.retries = Number(f.retries);
  if (f.task_id.trim()) spec.task_id = f.task_id.trim();
  if (f.labels.trim()) {
    spec.labels = Object.fromEntries(f.labels.split(",").map((kv) => kv.trim()).filter(Boolean)
      .map((kv) => [kv.split("=")[0], kv.split("=").slice(1).join("=")]));
  }
  out.className = "muted";
  out.textContent = "submitting…";
  try {
    const res = await api("/api/v1/tasks", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(spec)});
    out.className = "";
    out.replaceChildren("Submitted ", h("b", {class: "mono", id: "submitted-id"}, res.task_id),
      res.created ? "" : " (already known)");
    form.elements.task_id.value = "";
  } catch (err) {
    out.className = "err";
    out.textContent = err.message;
    const name = {task_id: "task_id", id: "task_id"}[err.field] || err.field;
    if (name && form.elements[name]) form.elements[name].classList.add("invalid");
  }
  scheduleRefresh();
});

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = e.target.elements.token.value.trim();
  sessionStorage.setItem("taskandgo-token", token);
  connectEvents();
  scheduleRefresh();
});

connectEvents();
refresh();
refreshHistory();
