// The Kiln dashboard: plain JavaScript against the gateway's API, no build step, no CDN.
// The API key stays in this browser (localStorage) and goes in an Authorization header; the
// event stream (EventSource cannot send headers) uses a short-lived token for one build.
// Text from builds (briefs, messages, tool input and output, files) is only ever put in the
// page as text nodes (el(), textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["build_completed", "build_failed", "build_cancelled"]);
const state = { key: localStorage.getItem("kiln.apiKey") || "", build: null, source: null,
                lastId: null, cursor: null, cap: 0, cost: 0, continuations: 0,
                calls: new Map(), snapshots: [], snapshot: null, pending: null, refresh: null };

function usd(micro) { return "$" + (Number(micro || 0) / 1e6).toFixed(4); }

// An element with attributes (className, dataset.*, other properties) and children (strings
// become text nodes).
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else node[name] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function newKey() { return crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random(); }

function size(bytes) {
  const n = Number(bytes || 0);
  return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`;
}

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
    const err = new Error(`${resp.status} ${resp.statusText || ""}: ${detail}`.replace(" :", ":"));
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
  converse(kind, data);
  if (kind === "tool_call") {
    $("tool").textContent = data.tool;
    $("iteration").textContent = data.iteration;
  } else if (kind === "iteration_completed") {
    $("iteration").textContent = data.iteration;
    state.cost += Number(data.cost_micro_usd || 0);
    meter();
  } else if (kind === "snapshot_saved") {
    refreshSnapshots();
  } else if (kind === "preview_available") {
    state.previews.set(Number(data.port), data);
    showPreview();
  } else if (kind === "preview_gone") {
    const shown = state.previews.get(Number(data.port));
    if (shown && shown.process_id === data.process_id) {
      state.previews.delete(Number(data.port));
      showPreview(`The preview on port ${data.port} is gone: ${data.reason || "no longer listening"}.`);
    }
  } else if (kind === "tool_result" && (data.files_changed || []).length && state.previews.size) {
    reloadPreview();
  } else if (kind === "build_requested" || kind === "build_resumed") {
    setStatus("running");
  } else if (kind === "build_continued") {
    state.continuations = Math.max(state.continuations, Number(data.continuation || 0));
    setStatus("running");
  } else if (TERMINAL.has(kind) && Number(data.continuation || 0) < state.continuations) {
    // the end of a run the build has continued from: the stream goes on
  } else if (kind === "build_sleeping") {
    setStatus("sleeping");
    $("tool").textContent = "–";
    state.previews.clear();
    showPreview("The build is sleeping: its app is stopped until it wakes and starts it again.");
  } else if (TERMINAL.has(kind)) {
    state.previews.clear();
    showPreview(`The build is ${kind.replace("build_", "")}: its app is no longer running.`);
    setStatus(kind.replace("build_", ""));
    $("tool").textContent = "–";
    state.cost = Math.max(state.cost, Number(data.cost_micro_usd || 0));
    meter();
    $("summary").textContent = data.summary || data.detail || "";
    closeStream();
    loadBuilds();
    loadBudget();
    awaitFinalSnapshot(state.build, Number(data.iterations || 0));
  }
}

// The preview: the newest port a process of the build listens on, in a frame of its own origin
// (sandboxed), with a preview token in its address for the gateway's proxy (local provider).
async function previewSrc(p) {
  if (!String(p.url).startsWith("/")) return p.url;
  const now = Date.now() / 1000;
  if (!state.previewToken || state.previewToken.build !== state.build || state.previewToken.expires_at - 60 < now) {
    const t = await (await api(`/v1/builds/${state.build}/preview/token`, { method: "POST" })).json();
    state.previewToken = { ...t, build: state.build };
  }
  return `${state.previewToken.url_prefix}${p.port}/`;
}

async function showPreview(gone = "") {
  const frame = $("preview-frame");
  const last = [...state.previews.values()].pop();
  $("preview").hidden = !last && !gone && !state.previewShown;
  $("beside").classList.toggle("previewing", !$("preview").hidden);
  if (!last) {
    if (gone) $("preview-status").textContent = gone;
    frame.hidden = true;
    frame.removeAttribute("src");
    $("preview-open").hidden = true;
    $("preview-port").textContent = "";
    state.previewSrc = null;
    return;
  }
  state.previewShown = true;
  const build = state.build;
  const src = await previewSrc(last);
  if (state.build !== build) return;
  $("preview-port").textContent = `port ${last.port}`;
  $("preview-status").textContent = last.traffic_access_token
    ? "This sandbox's traffic is private: open it with its traffic token (e2b-traffic-access-token)."
    : "";
  $("preview-open").href = src;
  $("preview-open").hidden = false;
  frame.hidden = false;
  if (state.previewSrc !== src) { frame.src = src; state.previewSrc = src; }
}

function reloadPreview() {
  clearTimeout(state.previewReload);
  state.previewReload = setTimeout(() => {
    const frame = $("preview-frame");
    if (state.previewSrc) { frame.src = state.previewSrc; }
  }, 300);
}

// The final snapshot is written after the build's end, which closes the stream: look for it.
async function awaitFinalSnapshot(buildId, iterations) {
  for (let i = 0; i < 30 && state.build === buildId && !state.source; i++) {
    await loadSnapshots().catch(() => {});
    if (state.snapshots.some((s) => s.reason === "final" && s.iteration >= iterations)) return;
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// ------------------------------------------------------------------ the conversation

// Add to the conversation; follow it down unless the reader has scrolled up.
function append(item) {
  const c = $("conversation");
  const following = c.scrollHeight - c.scrollTop - c.clientHeight < 40;
  c.append(item);
  if (following) c.scrollTop = c.scrollHeight;
  return item;
}

function say(who, text, className) {
  return append(el("li", { className: `turn ${className}` }, el("span", { className: "who" }, who), text));
}

function mark(text, className = "", ...extra) {
  return append(el("li", { className: `marker ${className}` }, el("span", {}, text), ...extra));
}

function gist(input) {
  const first = input.path || input.command || input.pattern || input.file_path || "";
  return String(first).split("\n")[0].slice(0, 100);
}

function toolCall(data) {
  if (state.calls.has(data.call_id)) return;  // a call republished after a crash is the same call
  const status = el("span", { className: "result" }, " …");
  const output = el("pre", { className: "output" }, "(waiting for the result)");
  const details = el("details", { className: "tool", dataset: { callId: data.call_id } },
    el("summary", {}, `⚙ ${data.tool} `, el("span", { className: "gist" }, gist(data.input || {})), status),
    el("div", { className: "muted" }, "input"),
    el("pre", { className: "input" }, JSON.stringify(data.input, null, 2)),
    el("div", { className: "muted" }, "output"),
    output);
  state.calls.set(data.call_id, { status, output, details });
  append(el("li", {}, details));
}

function toolResult(data) {
  const call = state.calls.get(data.call_id);
  if (!call) return;
  call.output.textContent = data.output || "(no output)";
  const exit = data.exit_code === null || data.exit_code === undefined ? "" : ` exit ${data.exit_code}`;
  call.status.textContent = ` → ${data.is_error ? "error" : "ok"}${exit} · ${data.duration_ms} ms`;
  call.details.classList.toggle("error", Boolean(data.is_error));
}

function forkButton(iteration) {
  const button = el("button", { type: "button", className: "fork", dataset: { iteration: String(iteration) },
    title: "A new build with this build's conversation and files as they were at this iteration" },
    "Fork from here");
  button.addEventListener("click", () => fork(iteration));
  const back = el("button", { type: "button", className: "rollback", dataset: { iteration: String(iteration) },
    title: "Go back to this iteration: a fork from here, and this build cancelled if it is still running" },
    "Roll back to here");
  back.addEventListener("click", () => fork(iteration, { rollback: true }));
  return el("span", { className: "fork-actions" }, button, back);
}

function converse(kind, data) {
  if (kind === "build_requested") {
    say("brief", data.idea_brief, "user brief");
    for (const qa of data.understanding_qna || []) say("Q&A", `${qa.question}\n→ ${qa.answer}`, "user qna");
  } else if (kind === "send_user_message") {
    const shown = [...$("conversation").querySelectorAll(".turn.message")].find((t) => t.dataset.messageId === data.message_id);
    if (shown) shown.classList.remove("sending");
    else say(`you (message ${data.seq})`, data.text, "user message").dataset.messageId = data.message_id;
  } else if (kind === "agent_narrated" && data.text) {
    const thinking = data.source === "thinking";
    say(thinking ? "thinking (summary)" : "agent", data.text, thinking ? "assistant thinking" : "assistant");
  } else if (kind === "tool_call") {
    toolCall(data);
  } else if (kind === "tool_result") {
    toolResult(data);
  } else if (kind === "iteration_completed" && data.purpose === "summary") {
    mark(`older turns summarised to fit the context window · ${usd(data.cost_micro_usd)}`, "iteration");
  } else if (kind === "iteration_completed") {
    mark(`iteration ${data.iteration} · ${usd(data.cost_micro_usd)} · ${data.stop_reason}`, "iteration",
      forkButton(data.iteration));
  } else if (kind === "build_continued") {
    mark(`continued (#${data.continuation}) after it ${data.after}: a fresh sandbox from its final snapshot`, "continued");
  } else if (kind === "build_sleeping") {
    mark(`sleeping: ${data.reason}${data.wake_at ? " · wakes " + new Date(data.wake_at).toLocaleString() : ""}`, "sleeping");
  } else if (kind === "build_resumed") {
    mark(`resumed: ${data.reason}`, "resumed");
  } else if (TERMINAL.has(kind)) {
    const what = kind.replace("build_", "");
    mark(`${what}: ${data.summary || data.detail || data.reason || ""}`, `ended ${what}`);
  } else if (kind === "build_rejected") {
    mark(`rejected: ${data.reason}`, "ended rejected");
  }
}

// ------------------------------------------------------------------ writing to the build, forking

function showProblem(id, text) {
  $(id).textContent = text || "";
  $(id).hidden = !text;
}

async function sendMessage(ev) {
  ev.preventDefault();
  const text = $("message").value.trim();
  if (!text || !state.build) return;
  // A retry of the same text (after an error) keeps its Idempotency-Key: sent at most once.
  if (!state.pending || state.pending.text !== text || state.pending.build !== state.build) {
    state.pending = { text, build: state.build, key: newKey() };
  }
  $("send").disabled = true;
  try {
    const resp = await api(`/v1/builds/${state.build}/messages`, {
      method: "POST", body: { text }, headers: { "Idempotency-Key": state.pending.key },
    });
    const m = await resp.json();
    state.pending = null;
    // Shown at once (greyed until the build's history has it; a retry's repeat is not shown twice).
    const known = [...$("conversation").querySelectorAll(".turn.message")].some((t) => t.dataset.messageId === m.message_id);
    if (!known) say(`you (message ${m.seq})`, text, "user message sending").dataset.messageId = m.message_id;
    $("message").value = "";
    showProblem("message-error", "");
    if (!state.source) await followContinuation(state.build);
  } catch (e) {
    showProblem("message-error", `Not sent: ${e.message}`);
  } finally {
    $("send").disabled = false;
  }
}

// A message to a finished build continues it: once the gateway has seen it continue (it may
// have ended again already), follow its events from the last one seen.
async function followContinuation(buildId) {
  const before = state.continuations;
  for (let i = 0; i < 60 && state.build === buildId && !state.source; i++) {
    const b = await (await api(`/v1/builds/${buildId}`)).json();
    if (b.continuations > before || !["completed", "failed", "cancelled"].includes(b.status)) {
      setStatus(b.status);
      await openStream(buildId);
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

async function fork(iteration, { rollback = false } = {}) {
  const source = state.build;
  try {
    const resp = await api(`/v1/builds/${source}/fork`, {
      method: "POST", body: { iteration }, headers: { "Idempotency-Key": newKey() },
    });
    const b = await resp.json();
    showError("");
    if (rollback) {
      // a roll back leaves one build going on: the fork; the source stops if it still runs
      const current = await (await api(`/v1/builds/${source}`)).json();
      if (!["completed", "failed", "cancelled", "rejected"].includes(current.status)) {
        await api(`/v1/builds/${source}/cancel`, { method: "POST" });
      }
    }
    await loadBuilds();
    await openBuild(b.build_id);
  } catch (e) { showError(`Fork failed: ${e.message}`); }
}

// ------------------------------------------------------------------ files and diffs

function refreshSnapshots() {
  // snapshots come in bursts (one per checkpoint): read the list once they settle
  clearTimeout(state.refresh);
  state.refresh = setTimeout(() => loadSnapshots().catch((e) => showError(e.message)), 800);
}

function option(value, text) { return el("option", { value: String(value) }, text); }

async function loadSnapshots() {
  const buildId = state.build;
  const list = await (await api(`/v1/builds/${buildId}/snapshots`)).json();
  if (state.build !== buildId) return;
  state.snapshots = list.snapshots;
  const chosen = $("snapshot").dataset.chosen ? $("snapshot").value : null;
  $("snapshot").replaceChildren(...list.snapshots.map((s) => {
    const o = option(s.snapshot_id, `iteration ${s.iteration} · ${s.reason} · ${s.files} files${s.latest ? " · latest" : ""}`);
    o.dataset.iteration = String(s.iteration);
    return o;
  }));
  // The diff's iterations: the user's choice while it exists, else the last two.
  const iterations = [...new Set(list.snapshots.map((s) => s.iteration))];
  const last = iterations.length - 1;
  const defaults = { "diff-from": iterations[Math.max(0, last - 1)], "diff-to": iterations[last] };
  for (const id of ["diff-from", "diff-to"]) {
    const before = $(id).value;
    $(id).replaceChildren(...iterations.map((n) => option(n, String(n))));
    const keep = $(id).dataset.chosen && iterations.includes(Number(before));
    if (iterations.length) $(id).value = String(keep ? before : defaults[id]);
  }
  $("diff-run").disabled = iterations.length === 0;
  if (!list.snapshots.length) {
    $("snapshot-facts").textContent = "no snapshot yet";
    return;
  }
  // The snapshot the user chose while it exists, else the newest.
  const keep = list.snapshots.some((s) => s.snapshot_id === chosen) ? chosen : list.snapshots[list.snapshots.length - 1].snapshot_id;
  $("snapshot").value = keep;
  if (keep !== state.snapshot) await loadTree(keep);
}

async function loadTree(snapshotId) {
  const buildId = state.build;
  state.snapshot = snapshotId;
  const tree = await (await api(`/v1/builds/${buildId}/snapshots/${encodeURIComponent(snapshotId)}/tree`)).json();
  if (state.build !== buildId || state.snapshot !== snapshotId) return;
  const s = tree.snapshot;
  $("snapshot-facts").textContent = `${s.files} files · ${size(s.bytes_total)} · ${new Date(s.created_at).toLocaleString()}`;
  $("tree").replaceChildren(...tree.entries.map((e) => {
    const depth = e.path.split("/").length - 1;
    const name = e.path.split("/").pop();
    const li = el("li", { dataset: { path: e.path, type: e.type } });
    li.style.paddingLeft = `${depth * 1.1}em`;
    if (e.type === "file") {
      const b = el("button", { type: "button", title: `${e.path} · ${size(e.size)}` }, name);
      b.addEventListener("click", () => openFile(e.path));
      li.append(b);
    } else if (e.type === "dir") {
      const b = el("button", { type: "button", className: "dir", title: "fold or unfold" }, name + "/");
      b.addEventListener("click", () => fold(li));
      li.append(b);
    } else {
      li.append(el("span", { className: "dir" }, `${name} → ${e.target}`));
    }
    return li;
  }));
}

// Fold a directory of the tree (or unfold it): what it holds is hidden unless every directory
// above it is unfolded.
function fold(dirItem) {
  dirItem.classList.toggle("folded");
  const folded = [...$("tree").querySelectorAll("li.folded")].map((li) => li.dataset.path + "/");
  for (const li of $("tree").children) {
    li.hidden = folded.some((prefix) => li.dataset.path.startsWith(prefix));
  }
}

function filePath(path) { return path.split("/").map(encodeURIComponent).join("/"); }

async function openFile(path) {
  const buildId = state.build;
  const snapshotId = state.snapshot;
  for (const b of $("tree").querySelectorAll("button")) b.classList.toggle("open", b.parentElement.dataset.path === path);
  $("viewer-head").textContent = path;
  $("file-content").textContent = "…";
  try {
    const resp = await api(`/v1/builds/${buildId}/snapshots/${encodeURIComponent(snapshotId)}/files/${filePath(path)}`);
    const type = resp.headers.get("Content-Type") || "";
    const body = await resp.blob();
    if (state.build !== buildId || state.snapshot !== snapshotId) return;
    $("viewer-head").textContent = `${path} · ${size(body.size)} · ${type.split(";")[0]}`;
    if (type.startsWith("text/") || type.startsWith("application/json")) {
      $("file-content").textContent = await body.text();
    } else {
      const link = el("a", { href: URL.createObjectURL(body), download: path.split("/").pop() }, "download it");
      $("file-content").replaceChildren(`binary file (${size(body.size)}): `, link);
    }
  } catch (e) {
    $("file-content").replaceChildren(el("span", { className: "problem" }, e.message));
  }
}

function diffLines(text) {
  return el("pre", {}, ...text.split("\n").map((line) => {
    const cls = line.startsWith("+++") || line.startsWith("---") ? "" : line.startsWith("+") ? "add"
      : line.startsWith("-") ? "del" : line.startsWith("@@") ? "hunk" : "";
    return el("span", { className: cls }, line + "\n");
  }));
}

async function showDiff(ev) {
  if (ev) ev.preventDefault();
  const from = $("diff-from").value;
  const to = $("diff-to").value;
  if (from === "" || to === "") return;
  try {
    const d = await (await api(`/v1/builds/${state.build}/diff?${new URLSearchParams({ from, to })}`)).json();
    $("diff-facts").textContent = `snapshot of iteration ${d.from_snapshot.iteration} → ${d.to_snapshot.iteration}: `
      + `${d.added} added, ${d.removed} removed, ${d.modified} modified${d.truncated ? " (some without a diff: too large)" : ""}`;
    $("diff").replaceChildren(...(d.files.length ? d.files.map((f) => el("details", { open: d.files.length <= 8, dataset: { path: f.path } },
      el("summary", {}, el("span", { className: `change-${f.change}` }, f.change), ` ${f.path}`,
        f.binary ? " (binary file)" : "", f.note && !f.binary ? ` (${f.note})` : "",
        f.old_mode !== null && f.new_mode !== null && f.old_mode !== f.new_mode
          ? ` mode ${f.old_mode.toString(8)} → ${f.new_mode.toString(8)}` : ""),
      f.diff ? diffLines(f.diff) : null)) : [el("p", { className: "muted" }, "no change")]));
  } catch (e) {
    $("diff").replaceChildren(el("p", { className: "problem" }, e.message));
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
    "build_completed", "build_failed", "build_cancelled", "preview_available", "preview_gone"];
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
  $("conversation").replaceChildren();
  $("log").replaceChildren();
  state.calls = new Map();
  state.previews = new Map();
  state.previewShown = false;
  state.previewSrc = null;
  showPreview();
  state.snapshot = null;
  state.snapshots = [];
  for (const id of ["snapshot", "diff-from", "diff-to", "tree", "diff"]) $(id).replaceChildren();
  for (const id of ["snapshot", "diff-from", "diff-to"]) delete $(id).dataset.chosen;
  $("viewer-head").textContent = "choose a file";
  $("file-content").textContent = "";
  $("snapshot-facts").textContent = $("diff-facts").textContent = "";
  showProblem("message-error", "");
  $("summary").textContent = "";
  $("tool").textContent = "–";
  try {
    const b = await (await api(`/v1/builds/${buildId}`)).json();
    state.continuations = b.continuations || 0;
    setStatus(b.status);
    showWaiting(b);
    $("iteration").textContent = b.iteration;
    meter();
    await openStream(buildId);
    showError("");
    await loadSnapshots();
  } catch (e) { showError(e.message); }
}

function showWaiting(b) {
  const w = b.waiting_on;
  $("waiting").textContent = w ? `${w.service}: ${w.what} · ${Math.round(w.seconds)} s` : "–";
}

async function refreshWaiting() {
  if (!state.build) return;
  const buildId = state.build;
  const b = await (await api(`/v1/builds/${buildId}`)).json();
  if (state.build === buildId) showWaiting(b);
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
      headers: { "Idempotency-Key": newKey() },
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
$("message-form").addEventListener("submit", sendMessage);
$("message").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("message-form").requestSubmit();
});
$("snapshot").addEventListener("change", () => {
  $("snapshot").dataset.chosen = "1";
  loadTree($("snapshot").value).catch((e) => showError(e.message));
});
$("diff-form").addEventListener("submit", showDiff);
for (const id of ["diff-from", "diff-to"]) $(id).addEventListener("change", () => { $(id).dataset.chosen = "1"; });

loadBuilds();
loadBudget();
if (location.hash.length > 1 && state.key) openBuild(location.hash.slice(1));
setInterval(() => {
  if (document.hidden) return;
  loadBuilds();
  refreshWaiting().catch(() => {});  // the API down (its database): the list says so
}, 5000);
