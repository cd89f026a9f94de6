// voxbridge operator console: plain JS, no build, no framework, served by the bridge (bridge/api.py).
//
// The API token lives in sessionStorage (this tab only) and goes in an Authorization header on every
// request — including the event stream, which is why /v1/events is read with fetch and a stream
// reader rather than EventSource (which cannot send headers). Every value from the API is written
// with textContent, never as HTML: transcripts and tool arguments come from callers and AIs.
"use strict";

const TOKEN_KEY = "voxbridge.token";
const PAGE_SIZE = 25;
const MEDIA_POLL_MS = 2000;
const BACKOFF_MIN_MS = 500, BACKOFF_MAX_MS = 10000;
// Mid-call commands (the API's contract), offered only when GET /v1/calls/{id} lists them in `capabilities`.
const COMMANDS = [
  {cap: "context", label: "Add context", method: "POST", path: "context", field: "text", placeholder: "e.g. this caller is a VIP"},
  {cap: "say", label: "Say now", method: "POST", path: "say", field: "text", placeholder: "what the AI says"},
  {cap: "tools", label: "Set tools", method: "PUT", path: "tools", field: "tools", placeholder: "tool names, comma-separated"},
  {cap: "tag", label: "Tag", method: "POST", path: "tags", field: "tags", placeholder: "key=value, key2=value2"},
  {cap: "mute", label: "Mute caller", method: "POST", path: "mute"},
  {cap: "mute", label: "Unmute caller", method: "POST", path: "unmute"},
];

const $ = (sel) => document.querySelector(sel);
const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  live: new Map(),          // call_id → call info (GET /v1/calls?state=active), updated by events
  ended: new Set(),          // calls whose call.ended arrived (a list fetched before it must not re-add them)
  running: new Map(),       // call_id → Set of tool_call_ids started and not completed
  providers: {},            // profile → provider (GET /v1/profiles)
  current: null,            // the call shown in the call view
  historyOffset: 0,
  stream: null,             // AbortController of the event stream
  recordingUrl: null,       // blob: URL of the recording being played
};

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, detail) { super(`${status}: ${detail}`); this.status = status; this.detail = detail; }
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h.Authorization = "Bearer " + state.token;
  return h;
}

async function api(method, path, body) {
  const init = {method, headers: headers(body === undefined ? {} : {"Content-Type": "application/json"}),
                cache: "no-store"};
  if (body !== undefined) init.body = JSON.stringify(body);
  const res = await fetch(path, init);
  if (res.status === 401) { signOut("The token was refused: sign in again."); throw new ApiError(401, "unauthorised"); }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!res.ok) throw new ApiError(res.status, describe(data && data.detail !== undefined ? data.detail : data));
  return data;
}

// A FastAPI error detail (a string, or a list of validation errors) as one readable line.
function describe(detail) {
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  if (detail && typeof detail === "object") return JSON.stringify(detail);
  return String(detail);
}

// ------------------------------------------------------------------ helpers

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") e.className = v; else if (k === "dataset") Object.assign(e.dataset, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function seconds(s) {
  if (s == null) return "";
  s = Math.max(0, Math.round(s));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : ""; }

function show(view) {
  for (const v of ["signin", "live", "call", "history"]) $("#view-" + v).hidden = v !== view;
  $("#nav").hidden = view === "signin";
}

// Media health: the call's frame counters, then what its leg counts (an RTP leg's late, lost,
// reordered, concealed packets): only the non-zero ones of those, so a healthy leg says little.
function media(info) {
  const m = info.media;
  if (!m) return "";
  const {leg, ...call} = m;
  const parts = Object.entries(call).map(([k, v]) => `${k.replace(/_/g, " ")} ${v}`);
  if (leg) {
    for (const [k, v] of Object.entries(leg)) {
      if (v && !["received", "delivered"].includes(k)) parts.push(`rtp ${k.replace(/_/g, " ")} ${v}`);
    }
    parts.push(`rtp received ${leg.received ?? 0}`);
  }
  return parts.join(" · ");
}

// ------------------------------------------------------------------ sign-in

async function signIn(token) {
  state.token = token || null;
  try {
    await api("GET", "/v1/auth");
  } catch (e) {
    state.token = null;
    $("#signin-error").textContent = e.status === 401 ? "Wrong token." : "Cannot reach the API: " + e.message;
    return false;
  }
  if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token); else sessionStorage.removeItem(TOKEN_KEY);
  $("#signin-error").textContent = "";
  state.signedIn = true;
  startStream();
  try {
    const p = await api("GET", "/v1/profiles");
    for (const x of p.profiles) state.providers[x.name] = x.provider;
  } catch (e) { /* the backend column stays empty */ }
  await refreshLive();
  route();
  return true;
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  if (state.stream) state.stream.abort();
  state.stream = null;
  $("#signin-error").textContent = message || "";
  show("signin");
}

// ------------------------------------------------------------------ the event stream (SSE over fetch)

function setStreamStatus(text, cls) {
  const s = $("#stream-status");
  s.textContent = text;
  s.className = "status " + (cls || "");
}

function startStream() {
  if (state.stream) state.stream.abort();
  const ctl = new AbortController();
  state.stream = ctl;
  (async () => {
    let backoff = BACKOFF_MIN_MS;
    while (!ctl.signal.aborted) {
      try {
        const res = await fetch("/v1/events", {headers: headers({Accept: "text/event-stream"}), signal: ctl.signal,
                                               cache: "no-store"});
        if (res.status === 401) { signOut("The token was refused: sign in again."); return; }
        if (!res.ok || !res.body) throw new Error("HTTP " + res.status);
        setStreamStatus("live", "live");
        backoff = BACKOFF_MIN_MS;
        refreshLive();  // whatever happened while the stream was down
        await readEvents(res.body, onEvent);
      } catch (e) {
        if (ctl.signal.aborted) return;
      }
      setStreamStatus(`reconnecting in ${Math.round(backoff / 1000)} s`, "down");
      await new Promise((r) => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    }
  })();
}

// Server-sent events, parsed as the spec says: fields until a blank line; comments (":…") ignored.
async function readEvents(body, handle) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", data = [], type = "message";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let nl;
    while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
      if (line === "") {
        if (data.length) {
          try { handle(type, JSON.parse(data.join("\n"))); } catch (e) { console.error("event", e); }
        }
        data = []; type = "message";
      } else if (!line.startsWith(":")) {
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") data.push(val); else if (field === "event") type = val;
      }
    }
  }
}

function onEvent(type, ev) {
  const id = ev.call_id, d = ev.data || {};
  let call = state.live.get(id);
  switch (type) {
    case "call.started":
      call = Object.assign(call || {}, d, {call_id: id, state: "connecting", started_at: ev.ts, duration_s: 0,
                                           _eventAt: performance.now()});
      state.live.set(id, call);
      break;
    case "call.answered":
      if (call) call.state = "active";
      break;
    case "call.ended": case "call.failed":
      if (type === "call.ended") {
        state.live.delete(id); state.running.delete(id); state.ended.add(id);
        if (state.ended.size > 1000) state.ended.delete(state.ended.values().next().value);
      }
      break;
    case "tool.called":
      if (!state.running.has(id)) state.running.set(id, new Set());
      state.running.get(id).add(d.tool_call_id);
      break;
    case "tool.completed":
      if (state.running.has(id)) state.running.get(id).delete(d.tool_call_id);
      break;
  }
  renderLive();
  if (state.current && state.current.call_id === id) onCallEvent(type, ev);
}

// ------------------------------------------------------------------ live calls

// The list of calls in progress (with media health, which events do not carry). Events that arrive
// while it is being fetched win: a call that started meanwhile is kept, one that ended is not re-added.
async function refreshLive() {
  const asked = performance.now();
  try {
    const res = await api("GET", "/v1/calls?state=active&limit=500");
    const seen = new Set();
    for (const c of res.calls) {
      seen.add(c.call_id);
      if (state.ended.has(c.call_id)) continue;
      state.live.set(c.call_id, Object.assign(state.live.get(c.call_id) || {}, c));
    }
    for (const [id, c] of [...state.live]) if (!seen.has(id) && !(c._eventAt > asked)) state.live.delete(id);
    renderLive();
  } catch (e) { /* shown by the stream status; retried on the next poll */ }
}

function renderLive() {
  const body = $("#live-calls tbody");
  const rows = [];
  for (const c of state.live.values()) {
    const dur = c.started_at ? Date.now() / 1000 - c.started_at : c.duration_s;
    const running = state.running.get(c.call_id);
    const tr = el("tr", {dataset: {callId: c.call_id}},
      el("td", {class: "state"}, c.state), el("td", {}, c.profile), el("td", {class: "caller"}, c.caller),
      el("td", {}, c.called), el("td", {class: "duration"}, seconds(dur)),
      el("td", {}, state.providers[c.profile] || ""), el("td", {class: "tools-running"}, running ? running.size : 0),
      el("td", {class: "media"}, media(c)));
    tr.addEventListener("click", () => { location.hash = "#/call/" + encodeURIComponent(c.call_id); });
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  $("#live-count").textContent = rows.length ? `(${rows.length})` : "";
  $("#live-empty").hidden = rows.length > 0;
}

// ------------------------------------------------------------------ one call

async function openCall(id) {
  show("call");
  state.current = {call_id: id, tools: new Map()};
  $("#call-id").textContent = id;
  for (const s of ["#transcript", "#tools", "#call-events", "#call-info", "#commands"]) $(s).replaceChildren();
  $("#action-result").textContent = "";
  $("#recording-box").hidden = true;
  if (state.recordingUrl) { URL.revokeObjectURL(state.recordingUrl); state.recordingUrl = null; }
  let call;
  try { call = await api("GET", "/v1/calls/" + encodeURIComponent(id)); } catch (e) {
    $("#call-state").textContent = "";
    $("#action-result").textContent = e.message;
    return;
  }
  if (!state.current || state.current.call_id !== id) return;
  state.current.call = call;
  renderCallInfo(call);
  for (const t of call.transcript || []) addTranscript(t);
  let tools = call.tools || [];
  if (!isLive(call)) {
    try { tools = (await api("GET", `/v1/calls/${encodeURIComponent(id)}/tools`)).tools; } catch (e) { /* summary */ }
  }
  for (const t of tools) addTool(t.tool_call_id || t.tool + Math.random(), t, t.outcome ? "completed" : "called");
  renderActions(call);
  if (!isLive(call) && call.recording) loadRecording(call.recording);
}

function isLive(call) { return call && !["ended", "failed"].includes(call.state); }

function renderCallInfo(call) {
  $("#call-state").textContent = call.state;
  const fields = [["Profile", call.profile], ["AI backend", state.providers[call.profile]], ["Caller", call.caller],
    ["Called", call.called], ["Direction", call.direction], ["Started", when(call.started_at)],
    ["Duration", seconds(call.duration_s)], ["End reason", call.end_reason], ["Media", media(call)],
    ["Tags", call.tags ? JSON.stringify(call.tags) : null], ["Metadata", call.metadata && Object.keys(call.metadata).length
      ? JSON.stringify(call.metadata) : null]];
  $("#call-info").replaceChildren(...fields.filter(([, v]) => v != null && v !== "")
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {dataset: {field: k}}, v)]));
}

function addTranscript(t) {
  $("#transcript").append(el("li", {class: t.role}, t.text));
  const box = $("#transcript");
  box.scrollTop = box.scrollHeight;
}

function addTool(key, t, phase) {
  const tools = state.current.tools;
  let li = tools.get(key);
  if (!li) {
    li = el("li", {class: "tool", dataset: {toolCallId: key}});
    tools.set(key, li);
    $("#tools").append(li);
    li._t = {};
  }
  Object.assign(li._t, t);
  const x = li._t;
  const parts = [el("strong", {}, x.tool)];
  if (x.args !== undefined && x.args !== null) parts.push(" ", el("code", {class: "args"}, JSON.stringify(x.args)));
  if (phase === "completed" || x.outcome) {
    parts.push(" → ", el("span", {class: "outcome outcome-" + x.outcome}, x.outcome));
    if (x.duration_ms != null) parts.push(el("span", {class: "muted"}, ` (${Math.round(x.duration_ms)} ms)`));
    if (x.result != null) parts.push(" ", el("code", {class: "result"},
      typeof x.result === "string" ? x.result : JSON.stringify(x.result)));
  } else {
    parts.push(" ", el("span", {class: "muted running"}, "running…"));
  }
  li.replaceChildren(...parts);
}

function addCallEvent(text, ts) {
  $("#call-events").append(el("li", {}, `${new Date((ts || Date.now() / 1000) * 1000).toLocaleTimeString()} ${text}`));
}

function onCallEvent(type, ev) {
  const d = ev.data || {};
  const call = state.current.call;
  switch (type) {
    case "transcript": addTranscript(d); break;
    case "tool.called": addTool(d.tool_call_id, {tool: d.tool, args: d.args}, "called"); break;
    case "tool.completed": addTool(d.tool_call_id, {tool: d.tool, outcome: d.outcome, result: d.result,
                                                     duration_ms: d.duration_ms}, "completed"); break;
    case "dtmf": addCallEvent("DTMF " + d.digit, ev.ts); break;
    case "barge_in": addCallEvent("caller barged in", ev.ts); break;
    case "call.answered":
      addCallEvent("answered", ev.ts);
      if (call) { call.state = "active"; renderCallInfo(call); }
      break;
    case "call.failed": addCallEvent("failed: " + (d.reason || ""), ev.ts); break;
    case "call.ended":
      addCallEvent("ended: " + d.reason, ev.ts);
      // The history has it now, with the recording's link and every tool call in full.
      setTimeout(() => { if (state.current && state.current.call_id === ev.call_id) openCall(ev.call_id); }, 300);
      break;
    default: addCallEvent(type, ev.ts);
  }
}

function renderActions(call) {
  const live = isLive(call);
  $("#actions").hidden = !live;
  if (!live) return;
  const caps = call.capabilities;
  const has = (c) => Array.isArray(caps) ? caps.includes(c) : !!(caps && caps[c]);
  const box = $("#commands");
  box.replaceChildren();
  for (const cmd of COMMANDS) {
    if (!has(cmd.cap)) continue;
    if (!cmd.field) {
      const b = el("button", {type: "button", className: "cmd-" + cmd.path}, cmd.label);
      b.addEventListener("click", () => act(cmd.method, cmd.path, undefined));
      box.append(b);
      continue;
    }
    const input = el("input", {placeholder: cmd.placeholder, required: true});
    const form = el("form", {class: "inline cmd-" + cmd.path}, input, el("button", {}, cmd.label));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      let value = input.value;
      if (cmd.field === "tools") value = value.split(",").map((s) => s.trim()).filter(Boolean);
      if (cmd.field === "tags") {
        value = Object.fromEntries(input.value.split(",").map((s) => s.split("=").map((x) => x.trim()))
          .filter((kv) => kv[0]).map(([k, v]) => [k, v === undefined ? "" : v]));
      }
      act(cmd.method, cmd.path, {[cmd.field]: value});
    });
    box.append(form);
  }
}

async function act(method, path, body) {
  const id = state.current.call_id;
  const out = $("#action-result");
  out.className = "";
  out.textContent = "…";
  try {
    const res = await api(method, `/v1/calls/${encodeURIComponent(id)}/${path}`, body);
    out.textContent = `${path}: ${JSON.stringify(res)}`;
  } catch (e) {
    out.className = "error";
    out.textContent = `${path} refused (${e.status}): ${e.detail}`;
  }
}

// <audio> cannot send the token: the WAV is fetched with it and played from a blob: URL.
async function loadRecording(url) {
  try {
    const res = await fetch(url, {headers: headers(), cache: "no-store"});
    if (!res.ok) throw new ApiError(res.status, describe((await res.json().catch(() => ({}))).detail));
    const blob = await res.blob();
    if (state.recordingUrl) URL.revokeObjectURL(state.recordingUrl);
    state.recordingUrl = URL.createObjectURL(blob);
    const audio = $("#recording");
    audio.src = state.recordingUrl;
    $("#recording-box").hidden = false;
  } catch (e) {
    $("#action-result").textContent = "recording: " + e.message;
  }
}

// ------------------------------------------------------------------ history

async function loadHistory() {
  show("history");
  const form = new FormData($("#history-filter"));
  const q = new URLSearchParams({limit: String(PAGE_SIZE + 1), offset: String(state.historyOffset)});
  for (const [k, v] of form.entries()) {
    if (!v) continue;
    // A date picks that whole day, in the browser's time zone: "to" includes its day.
    if (k === "since" || k === "until") {
      const d = new Date(v + "T00:00:00");
      if (k === "until") d.setDate(d.getDate() + 1);
      q.set(k, d.toISOString());
    } else q.set(k, v);
  }
  $("#history-error").textContent = "";
  let calls;
  try { calls = (await api("GET", "/v1/calls?" + q)).calls; } catch (e) {
    $("#history-error").textContent = e.message;
    return;
  }
  const more = calls.length > PAGE_SIZE;
  $("#history tbody").replaceChildren(...calls.slice(0, PAGE_SIZE).map((c) => {
    const tr = el("tr", {dataset: {callId: c.call_id}}, el("td", {}, when(c.started_at)), el("td", {}, c.state),
      el("td", {}, c.profile), el("td", {}, c.caller), el("td", {}, c.called), el("td", {}, seconds(c.duration_s)),
      el("td", {class: "end-reason"}, c.end_reason), el("td", {}, c.recording ? "▶" : ""));
    tr.addEventListener("click", () => { location.hash = "#/call/" + encodeURIComponent(c.call_id); });
    return tr;
  }));
  $("#page-prev").disabled = state.historyOffset === 0;
  $("#page-next").disabled = !more;
  $("#page-no").textContent = `page ${state.historyOffset / PAGE_SIZE + 1}`;
}

// ------------------------------------------------------------------ routing and start-up

function route() {
  if (!state.token && !state.signedIn) { show("signin"); return; }
  const h = location.hash;
  if (h.startsWith("#/call/")) openCall(decodeURIComponent(h.slice(7)));
  else if (h === "#/history") { state.current = null; loadHistory(); }
  else { state.current = null; show("live"); renderLive(); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (await signIn($("#token").value.trim())) { state.signedIn = true; $("#token").value = ""; }
  });
  $("#sign-out").addEventListener("click", () => { state.signedIn = false; signOut(""); });
  $("#act-hangup").addEventListener("click", () => act("POST", "hangup", undefined));
  $("#act-transfer").addEventListener("submit", (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    const body = {extension: f.get("extension")};
    if (f.get("context")) body.context = f.get("context");
    act("POST", "transfer", body);
  });
  $("#act-dtmf").addEventListener("submit", (e) => {
    e.preventDefault();
    act("POST", "dtmf", {digits: new FormData(e.target).get("digits")});
  });
  $("#history-filter").addEventListener("submit", (e) => { e.preventDefault(); state.historyOffset = 0; loadHistory(); });
  $("#page-prev").addEventListener("click", () => { state.historyOffset = Math.max(0, state.historyOffset - PAGE_SIZE); loadHistory(); });
  $("#page-next").addEventListener("click", () => { state.historyOffset += PAGE_SIZE; loadHistory(); });
  window.addEventListener("hashchange", route);
  // Durations tick every second; media health (not in events) is polled while calls are up.
  setInterval(() => { if (!$("#view-live").hidden) renderLive(); }, 1000);
  setInterval(() => {
    if (!state.signedIn || !state.live.size) return;
    refreshLive();
    const c = state.current;
    if (c && c.call && isLive(c.call)) {
      api("GET", "/v1/calls/" + encodeURIComponent(c.call_id)).then((call) => {
        if (state.current === c && isLive(call)) { c.call = call; renderCallInfo(call); }
      }).catch(() => {});
    }
  }, MEDIA_POLL_MS);
  if (state.token) { state.signedIn = true; signIn(state.token); } else show("signin");
});
