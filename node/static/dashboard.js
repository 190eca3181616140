// The TaskAndGo dashboard's script (dashboard.html), served from this node: the
// Content-Security-Policy runs no inline script.
"use strict";

const RECENT = 30;            // finished tasks shown
const PERIODIC_MS = 3000;     // refresh without events (CPU, memory, heartbeats)
const DEBOUNCE_MS = 150;      // events within this window cause one refetch
const FETCH_TIMEOUT_MS = 6000;
const PRIORITIES = ["critical", "high", "medium", "low"];
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const STATUS_ORDER = {running: 0, queued: 1};
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

let shownTasks = [];

/** Render the task table (again, from the last data when called without any). */
function renderTasks(tasks = shownTasks) {
  shownTasks = tasks;
  $("tasks").replaceChildren(...tasks.flatMap((t) => {
    const active = t.status === "running" || t.status === "queued";
    const cancel = active ? h("button", {class: "small cancel", title: "Cancel (kills it if running)",
      onclick: (e) => cancelTask(t.id, e.target)}, "Cancel") : "";
    const nodes = t.node || [...new Set(t.chunks.map((c) => c.node).filter(Boolean))].join(" ");
    const row = h("tr", {"data-task-id": t.id, "data-status": t.status},
      h("td", {class: "mono"}, t.id, t.chunk_count ? chunkProgress(t) : ""),
      h("td", {class: "status"}, badge(t.status)),
      h("td", {}, t.priority_name || t.priority),
      h("td", {}, t.strategy),
      h("td", {class: "nowrap"}, nodes || "–"),
      h("td", {class: "num"}, t.attempts),
      h("td", {class: "nowrap"}, clock(t.created_at)),
      h("td", {class: "num"}, secs(t.created_at, t.started_at || null)),
      h("td", {class: "num"}, t.started_at ? secs(t.started_at, t.finished_at || null) : "–"),
      h("td", {class: `result mono ${t.error && t.status !== "succeeded" ? "err" : ""}`,
        title: t.result || t.error}, t.status === "succeeded" ? t.result : (t.error || t.result)),
      h("td", {}, cancel));
    return t.chunk_count && openChunks.has(t.id) ? [row, chunkRow(t)] : [row];
  }));
}

// ------------------------------------------------------------------ data

async function loadTasks() {
  const [running, queued, head] = await Promise.all([
    api("/api/v1/tasks?status=running&limit=200"),
    api("/api/v1/tasks?status=queued&limit=100"),
    api("/api/v1/tasks?limit=1"),
  ]);
  const offset = Math.max(0, head.total - RECENT);
  const recent = head.total > 1 ? (await api(`/api/v1/tasks?limit=${RECENT}&page_token=${offset}`)).tasks
                                : head.tasks;
  const byId = new Map();
  for (const t of [...running.tasks, ...queued.tasks, ...recent]) byId.set(t.id, t);
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
  const [node, cluster, tasks] = await Promise.all([
    attempt("this node", api("/api/v1/node")),
    attempt("cluster", api("/api/v1/cluster")),
    attempt("tasks", loadTasks()),
  ]);
  if (node) {
    $("self").textContent = `${node.id} (${node.role})`;
    $("term").textContent = node.raft_term ?? "–";
  }
  if (cluster) renderNodes(cluster);
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
