// The Kiln dashboard: plain JavaScript against the gateway's API, no build step, no CDN.
// The API key stays in this browser (localStorage) and goes in an Authorization header; the
// event stream (EventSource cannot send headers) uses a short-lived token for one build.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["build_completed", "build_failed", "build_cancelled"]);
const state = { key: localStorage.getItem("kiln.apiKey") || "", build: null, source: null,
                lastId: null, cursor: null, cap: 0, cost: 0, continuations: 0 };

function usd(micro) { return "$" + (Number(micro || 0) / 1e6).toFixed(4); }

function showError(text) {
  const el = $("error");
  el.textContent = text || "";
  el.hidden = !text;
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + state.key }, options.headers || {});
  if (options.body && typeof options.body !== "string") {
    options.body = JSON.stringify(options.body);
    headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (!resp.ok) {
    let detail = resp.statusText;
    try { detail = (await resp.json()).detail || detail; } catch (e) { /* not JSON */ }
    const err = new Error(`${resp.status}: ${detail}`);
    err.status = resp.status;
    throw err;
  }
  return resp;
}

// ------------------------------------------------------------------ builds list

function row(b) {
  const tr = document.createElement("tr");
  tr.dataset.buildId = b.build_id;
  tr.className = state.build === b.build_id ? "selected" : "";
  for (const text of [b.build_id.slice(0, 10), b.status, b.iteration, usd(b.cost_micro_usd),
                      new Date(b.created_at).toLocaleString()]) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
  }
  tr.children[1].className = "status-" + b.status;
  tr.addEventListener("click", () => openBuild(b.build_id));
  return tr;
}

async function loadBuilds(append = false) {
  if (!state.key) return;
  const status = $("status-filter").value;
  const params = new URLSearchParams({ limit: "20" });
  if (status) params.set("status", status);
  if (append && state.cursor) params.set("cursor", state.cursor);
  try {
    const page = await (await api("/v1/builds?" + params)).json();
    const body = $("builds").tBodies[0];
    if (!append) body.replaceChildren();
    page.builds.forEach((b) => body.appendChild(row(b)));
    state.cursor = page.next_cursor;
    $("more").hidden = !page.next_cursor;
    showError("");
  } catch (e) { showError(e.message); }
}

async function loadBudget() {
  if (!state.key) return;
  try {
    const b = await (await api("/v1/budget")).json();
    $("budget").textContent = `today ${usd(b.spent_today_micro_usd)} of ${usd(b.daily_allowance_micro_usd)} allowance · tier ${b.tier}`;
    state.cap = b.per_build_cap_micro_usd;
    $("cap").textContent = usd(state.cap);
    meter();
  } catch (e) { $("budget").textContent = ""; }
}

// ------------------------------------------------------------------ one build

function meter() {
  $("cost").textContent = usd(state.cost);
  const pct = state.cap ? Math.min(100, (100 * state.cost) / state.cap) : 0;
  $("cost-bar").style.width = pct + "%";
}

function setStatus(status) {
  $("status").textContent = status;
  $("status").className = "status-" + status;
  const finished = ["completed", "failed", "cancelled"].includes(status);
  $("wake").disabled = finished;
  $("cancel").disabled = finished;
}

function logEvent(id, kind, data) {
  const li = document.createElement("li");
  li.value = id;
  const k = document.createElement("span");
  k.className = "kind";
  k.textContent = kind;
  li.appendChild(k);
  let text = "";
  if (kind === "tool_call") text = ` ${data.tool} ${JSON.stringify(data.input).slice(0, 120)}`;
  else if (kind === "tool_result") text = ` exit ${data.exit_code} ${String(data.output || "").split("\n").filter(Boolean).slice(-1)[0] || ""}`.slice(0, 160);
  else if (kind === "iteration_completed") text = ` #${data.iteration} ${usd(data.cost_micro_usd)}`;
  else if (kind === "send_user_message") text = ` ${String(data.text || "").slice(0, 160)}`;
  else if (data.reason) text = ` ${data.reason}`;
  li.appendChild(document.createTextNode(text));
  $("log").appendChild(li);
  $("log").scrollTop = $("log").scrollHeight;
}

function onEvent(kind, msg) {
  const data = JSON.parse(msg.data);
  state.lastId = msg.lastEventId || state.lastId;
  logEvent(msg.lastEventId, kind, data);
  if (kind === "agent_narrated" && data.text) {
    const p = document.createElement("p");
    p.textContent = data.text;
    if (data.source === "thinking") p.className = "thinking";
    $("narration").appendChild(p);
  } else if (kind === "tool_call") {
    $("tool").textContent = data.tool;
    $("iteration").textContent = data.iteration;
  } else if (kind === "iteration_completed") {
    $("iteration").textContent = data.iteration;
    state.cost += Number(data.cost_micro_usd || 0);
    meter();
  } else if (kind === "build_requested" || kind === "build_resumed" || kind === "build_continued") {
    setStatus("running");
  } else if (TERMINAL.has(kind) && Number(data.continuation || 0) < state.continuations) {
    // the end of a run the build has continued from: the stream goes on
  } else if (kind === "build_sleeping") {
    setStatus("sleeping");
    $("tool").textContent = "–";
  } else if (TERMINAL.has(kind)) {
    setStatus(kind.replace("build_", ""));
    $("tool").textContent = "–";
    state.cost = Math.max(state.cost, Number(data.cost_micro_usd || 0));
    meter();
    $("summary").textContent = data.summary || data.detail || "";
    closeStream();
    loadBuilds();
    loadBudget();
  }
}

function closeStream() {
  if (state.source) { state.source.close(); state.source = null; }
}

async function openStream(buildId) {
  closeStream();
  const t = await (await api(`/v1/builds/${buildId}/events/token`, { method: "POST" })).json();
  if (state.build !== buildId) return;
  const params = new URLSearchParams({ token: t.token });
  if (state.lastId) params.set("last_event_id", state.lastId);
  const source = new EventSource(`${t.events_url}?${params}`);
  state.source = source;
  const kinds = ["build_requested", "tool_call", "tool_result", "iteration_completed",
    "checkpoint_saved", "snapshot_saved", "agent_narrated", "build_sleeping", "build_resumed",
    "sandbox_started", "sandbox_restored", "sandbox_stopped", "sleep_requested",
    "wake_requested", "cancel_requested", "send_user_message", "build_continued",
    "build_completed", "build_failed", "build_cancelled"];
  for (const kind of kinds) source.addEventListener(kind, (msg) => onEvent(kind, msg));
  source.onerror = () => {
    // The browser reconnects by itself (with Last-Event-ID); when the stream was closed for
    // good (e.g. the token expired), open a new one after the last event seen.
    if (source.readyState === EventSource.CLOSED && state.source === source) {
      setTimeout(() => { if (state.build === buildId) openStream(buildId).catch(() => {}); }, 2000);
    }
  };
}

async function openBuild(buildId) {
  state.build = buildId;
  state.lastId = null;
  state.cost = 0;
  location.hash = buildId;
  for (const tr of $("builds").tBodies[0].rows) tr.className = tr.dataset.buildId === buildId ? "selected" : "";
  $("detail").hidden = false;
  $("build-id").textContent = buildId;
  $("narration").replaceChildren();
  $("log").replaceChildren();
  $("summary").textContent = "";
  $("tool").textContent = "–";
  try {
    const b = await (await api(`/v1/builds/${buildId}`)).json();
    state.continuations = b.continuations || 0;
    setStatus(b.status);
    $("iteration").textContent = b.iteration;
    meter();
    await openStream(buildId);
    showError("");
  } catch (e) { showError(e.message); }
}

async function command(what) {
  try {
    await api(`/v1/builds/${state.build}/${what}`, { method: "POST" });
    showError("");
  } catch (e) { showError(e.message); }
}

async function download() {
  try {
    const resp = await api(`/v1/builds/${state.build}/files`);
    const url = URL.createObjectURL(await resp.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = `kiln-${state.build}.tar.gz`;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    showError("");
  } catch (e) { showError(e.message); }
}

// ------------------------------------------------------------------ wiring

$("api-key").value = state.key;
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("api-key").value.trim();
  localStorage.setItem("kiln.apiKey", state.key);
  loadBuilds();
  loadBudget();
});
$("new-build").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const resp = await api("/v1/builds", {
      method: "POST",
      body: { idea_brief: $("brief").value },
      headers: { "Idempotency-Key": crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) },
    });
    const b = await resp.json();
    $("brief").value = "";
    await loadBuilds();
    await openBuild(b.build_id);
  } catch (e) { showError(e.message); }
});
$("status-filter").addEventListener("change", () => loadBuilds());
$("more").addEventListener("click", () => loadBuilds(true));
$("wake").addEventListener("click", () => command("wake"));
$("cancel").addEventListener("click", () => command("cancel"));
$("download").addEventListener("click", download);

loadBuilds();
loadBudget();
if (location.hash.length > 1 && state.key) openBuild(location.hash.slice(1));
setInterval(() => { if (!document.hidden) loadBuilds(); }, 5000);
