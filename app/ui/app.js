// Jobdock's dashboard: plain JavaScript, no build step, no third-party code.
// Every API call goes through api(), which sends the API key kept in sessionStorage.
// Job-provided text is only ever set with textContent, never parsed as HTML.
"use strict";

const KEY_STORAGE = "jobdock.apiKey";
const POLL_MS = 2000;
const TERMINAL = new Set(["succeeded", "failed", "timed_out", "cancelled"]);
// The page is served at <root>/ui/: the API is its parent path.
const API_BASE = new URL("..", window.location.href).pathname.replace(/\/$/, "");

const $ = (id) => document.getElementById(id);

// ---- API access ----------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return window.sessionStorage.getItem(KEY_STORAGE) || "";
}

// The message of an error answer: `detail` is a string, or FastAPI's list of
// {loc, msg} for a 422.
function errorMessage(status, body, fallback) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((error) => {
        const loc = (error.loc || []).filter((part) => part !== "body").join(".");
        return loc ? `${loc}: ${error.msg}` : String(error.msg);
      })
      .join("; ");
  }
  return fallback || `HTTP ${status}`;
}

// fetch() against the API with the key. Answers the Response for `raw`, else the
// parsed JSON; throws ApiError on any non-2xx answer (and asks for a key on 401).
async function api(path, { method = "GET", body, signal, raw = false, accept } = {}) {
  const headers = { Accept: accept || "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(API_BASE + path, {
      method,
      headers,
      signal,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `${method} ${path}: the service does not answer (${error.message})`);
  }
  if (response.ok) return raw ? response : response.status === 204 ? null : response.json();
  let parsed = null;
  try {
    parsed = await response.json();
  } catch {
    // Not JSON: fall back to the status line.
  }
  const message = errorMessage(response.status, parsed, `${response.status} ${response.statusText}`);
  if (response.status === 401) askForKey(message);
  throw new ApiError(response.status, message);
}

// ---- Errors shown to the user ----------------------------------------------------------

const errors = new Map();

function showError(source, error) {
  if (error && error.name === "AbortError") return;
  // A 401's message is in the key panel that asks for a key (see api()).
  if (error instanceof ApiError && error.status === 401) return;
  errors.set(source, error instanceof Error ? error.message : String(error));
  renderErrors();
}

function clearError(source) {
  if (errors.delete(source)) renderErrors();
}

function renderErrors() {
  const box = $("errors");
  box.replaceChildren(
    ...[...errors.values()].map((message) => {
      const item = document.createElement("p");
      item.textContent = message;
      return item;
    }),
  );
}

// ---- The API key -----------------------------------------------------------------------

function askForKey(message) {
  $("key-message").textContent = apiKey()
    ? `This key was refused: ${message}. Enter another API key.`
    : `This service needs an API key (${message}). Enter one made by "jobdock keys create"; ` +
      "it is kept in this browser tab only.";
  $("key-panel").hidden = false;
  $("key-input").focus();
}

function renderKeyButton() {
  $("key-button").textContent = apiKey() ? "API key ✓" : "API key";
}

function setUpKeyPanel() {
  $("key-button").addEventListener("click", () => {
    $("key-message").textContent =
      'Enter an API key (made by "jobdock keys create"). It is kept in this browser tab ' +
      'only, and sent as "Authorization: Bearer <key>".';
    $("key-panel").hidden = !$("key-panel").hidden;
    if (!$("key-panel").hidden) $("key-input").focus();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    window.sessionStorage.setItem(KEY_STORAGE, key);
    $("key-input").value = "";
    $("key-panel").hidden = true;
    errors.clear();
    renderErrors();
    renderKeyButton();
    route();
  });
  $("key-forget").addEventListener("click", () => {
    window.sessionStorage.removeItem(KEY_STORAGE);
    $("key-panel").hidden = true;
    renderKeyButton();
    route();
  });
  $("key-close").addEventListener("click", () => {
    $("key-panel").hidden = true;
  });
  renderKeyButton();
}

// ---- Formatting ----------------------------------------------------------------------

function pad(n) {
  return String(n).padStart(2, "0");
}

function formatTime(iso, withDate = true) {
  if (!iso) return "—";
  const t = new Date(iso);
  const time = `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`;
  return withDate ? `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ${time}` : time;
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 120) return `${Math.round(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 120) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function secondsBetween(from, to) {
  if (!from) return null;
  const end = to ? new Date(to) : new Date();
  return Math.max(0, (end - new Date(from)) / 1000);
}

// How long a job ran (so far, while running).
function runTime(job) {
  return job.started_at ? secondsBetween(job.started_at, job.finished_at) : null;
}

function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

// A command as a shell line: each argument quoted only when it needs to be.
function shellQuote(argv) {
  if (!argv) return "(the image's default)";
  return argv
    .map((arg) => (/^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, "'\\''")}'`))
    .join(" ");
}

function formatLabels(labels) {
  return Object.entries(labels || {})
    .map(([key, value]) => `${key}=${value}`)
    .join(" ");
}

function badge(state) {
  const span = document.createElement("span");
  span.className = `badge state-${state}`;
  span.textContent = state;
  return span;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

// ---- The command field: shell-like splitting or a JSON array ---------------------------

class CommandError extends Error {}

// Splits like a POSIX shell: 'single' quotes keep everything, "double" quotes keep all but
// \" \\ \$ \`, a backslash outside quotes escapes the next character. No expansion.
function splitShell(line) {
  const args = [];
  let current = "";
  let inArg = false;
  let i = 0;
  while (i < line.length) {
    const c = line[i];
    if (c === "'") {
      const end = line.indexOf("'", i + 1);
      if (end < 0) throw new CommandError("a ' quote is not closed");
      current += line.slice(i + 1, end);
      inArg = true;
      i = end + 1;
    } else if (c === '"') {
      i += 1;
      for (;;) {
        if (i >= line.length) throw new CommandError('a " quote is not closed');
        const d = line[i];
        if (d === '"') break;
        if (d === "\\" && i + 1 < line.length && '"\\$`'.includes(line[i + 1])) {
          current += line[i + 1];
          i += 2;
        } else {
          current += d;
          i += 1;
        }
      }
      inArg = true;
      i += 1;
    } else if (c === "\\") {
      if (i + 1 >= line.length) throw new CommandError("a trailing \\ escapes nothing");
      current += line[i + 1];
      inArg = true;
      i += 2;
    } else if (/\s/.test(c)) {
      if (inArg) args.push(current);
      current = "";
      inArg = false;
      i += 1;
    } else {
      current += c;
      inArg = true;
      i += 1;
    }
  }
  if (inArg) args.push(current);
  return args;
}

// The argv of the command field; null for an empty field (the image's default command).
function parseCommand(text) {
  const trimmed = text.trim();
  if (!trimmed) return null;
  if (trimmed.startsWith("[")) {
    let parsed;
    try {
      parsed = JSON.parse(trimmed);
    } catch (error) {
      throw new CommandError(`not a JSON array: ${error.message}`);
    }
    if (!Array.isArray(parsed) || !parsed.every((arg) => typeof arg === "string")) {
      throw new CommandError("a JSON command must be an array of strings");
    }
    return parsed;
  }
  return splitShell(trimmed);
}

// KEY=value lines (also accepts key:value for labels) into an object.
function parsePairs(text, what) {
  const pairs = {};
  for (const [index, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (!line) continue;
    const at = line.indexOf("=");
    if (at <= 0) throw new CommandError(`${what} line ${index + 1} must be KEY=value: ${line}`);
    pairs[line.slice(0, at).trim()] = line.slice(at + 1);
  }
  return pairs;
}

// ---- Views -----------------------------------------------------------------------------

// What the current view runs (timers, streams): stopped when the route changes.
let viewController = new AbortController();

function every(ms, signal, tick) {
  let timer = null;
  const run = async () => {
    if (signal.aborted) return;
    await tick();
    if (!signal.aborted) timer = window.setTimeout(run, ms);
  };
  signal.addEventListener("abort", () => window.clearTimeout(timer));
  run();
}

function showView(name) {
  for (const view of ["jobs", "job", "submit"]) $(`view-${view}`).hidden = view !== name;
  $("nav-jobs").classList.toggle("active", name === "jobs");
  $("nav-submit").classList.toggle("active", name === "submit");
}

// -- The jobs list --

const listState = { cursors: [null], filters: new URLSearchParams() };

function filterQuery(filters) {
  const query = new URLSearchParams();
  if (filters.get("state")) query.set("state", filters.get("state"));
  if (filters.get("image")) query.set("image", filters.get("image"));
  for (const label of (filters.get("label") || "").split(/\s+/)) {
    if (label) query.append("label", label);
  }
  return query;
}

function renderJobs(page, filtered) {
  const rows = page.items.map((job) => {
    const tr = document.createElement("tr");
    tr.dataset.jobId = job.id;
    tr.dataset.state = job.state;
    const idCell = document.createElement("td");
    const link = document.createElement("a");
    link.href = `#/jobs/${job.id}`;
    link.textContent = job.id.slice(0, 8);
    link.title = job.id;
    link.className = "mono";
    idCell.append(link);
    const stateCell = document.createElement("td");
    stateCell.append(badge(job.state));
    tr.append(
      idCell,
      stateCell,
      cell(job.image, "mono"),
      cell(shellQuote(job.command), "mono command"),
      cell(formatLabels(job.labels), "labels"),
      cell(job.exit_code === null ? "" : String(job.exit_code), "num"),
      cell(formatTime(job.created_at), "time"),
      cell(job.started_at ? formatDuration(runTime(job)) : "", "num"),
    );
    tr.addEventListener("click", (event) => {
      if (event.target.closest("a")) return;
      window.location.hash = `#/jobs/${job.id}`;
    });
    return tr;
  });
  $("jobs-body").replaceChildren(...rows);
  const empty = $("jobs-empty");
  empty.hidden = page.items.length > 0;
  empty.textContent = filtered ? "No job matches these filters." : "No jobs yet: submit one.";
  const depth = listState.cursors.length;
  $("page-newest").disabled = depth <= 1;
  $("page-older").disabled = !page.next_cursor;
  listState.next = page.next_cursor;
}

function showJobs(params) {
  showView("jobs");
  const form = $("filters");
  form.elements.state.value = params.get("state") || "";
  form.elements.image.value = params.get("image") || "";
  form.elements.label.value = params.get("label") || "";
  if (params.toString() !== listState.filters.toString()) listState.cursors = [null];
  listState.filters = params;
  listState.seen = null;
  const signal = viewController.signal;
  listState.reload = async () => {
    const query = filterQuery(params);
    query.set("limit", "50");
    const cursor = listState.cursors[listState.cursors.length - 1];
    if (cursor) query.set("cursor", cursor);
    try {
      const page = await api(`/jobs?${query}`, { signal });
      if (signal.aborted) return;
      // Unchanged rows are left alone (a selection in the table survives the refresh),
      // unless a running job's time needs updating.
      const seen = JSON.stringify(page);
      if (seen !== listState.seen || page.items.some((job) => job.state === "running")) {
        renderJobs(page, filterQuery(params).toString() !== "");
        listState.seen = seen;
      }
      $("jobs-updated").textContent = `Updated ${formatTime(new Date().toISOString(), false)}`;
      clearError("jobs");
    } catch (error) {
      showError("jobs", error);
    }
  };
  every(POLL_MS, signal, listState.reload);
}

function setUpJobsView() {
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.target;
    const params = new URLSearchParams();
    for (const name of ["state", "image", "label"]) {
      const value = form.elements[name].value.trim();
      if (value) params.set(name, value);
    }
    const query = params.toString();
    window.location.hash = query ? `#/?${query}` : "#/";
  });
  $("filters").elements.state.addEventListener("change", () => $("filters").requestSubmit());
  $("filters-clear").addEventListener("click", () => {
    window.location.hash = "#/";
  });
  $("page-older").addEventListener("click", () => {
    if (!listState.next) return;
    listState.cursors.push(listState.next);
    listState.seen = null;
    listState.reload();
  });
  $("page-newest").addEventListener("click", () => {
    listState.cursors = [null];
    listState.seen = null;
    listState.reload();
  });
}

// -- One job --

function field(name, value, { mono = false, id } = {}) {
  const wrap = document.createElement("div");
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  if (value instanceof Node) dd.append(value);
  else dd.textContent = value === null || value === undefined || value === "" ? "—" : String(value);
  if (mono) dd.className = "mono";
  if (id) dd.id = id;
  wrap.append(dt, dd);
  return wrap;
}

function renderJob(job) {
  $("job-id").textContent = job.id;
  const state = $("job-state");
  state.className = `badge state-${job.state}`;
  state.textContent = job.state;
  $("job-cancel").hidden = TERMINAL.has(job.state);
  $("job-cancel").disabled = Boolean(job.cancel_requested);
  $("job-cancel").textContent = job.cancel_requested ? "Cancelling…" : "Cancel";
  const limits = job.limits || {};
  const resources = job.resources || {};
  const fields = [
    field("Image", job.image, { mono: true }),
    field("Command", shellQuote(job.command), { mono: true }),
    field("State", job.state),
    field("Exit code", job.exit_code, { id: "job-exit-code" }),
    field("Error", job.error, { id: "job-error" }),
    field("Attempt", `${job.attempt} of ${job.max_attempts}`),
    field("Priority", job.priority),
    field("Created", formatTime(job.created_at)),
    field("Started", formatTime(job.started_at)),
    field("Finished", formatTime(job.finished_at)),
    field("Waited", formatDuration(secondsBetween(job.created_at, job.started_at || job.finished_at))),
    field("Ran", job.started_at ? formatDuration(runTime(job)) : "—", { id: "job-ran" }),
    field("Timeout", `${job.timeout_seconds} s`),
    field("Memory", `${job.memory_mb} MB`),
    field("CPU", `${job.cpus === null ? "no cap" : `${job.cpus} CPU${job.cpus === 1 ? "" : "s"}`}, shares ${job.cpu_shares}`),
    field("Labels", formatLabels(job.labels), { mono: true }),
    field("Environment", formatLabels(job.env), { mono: true }),
    field("Working dir", job.working_dir, { mono: true }),
    field(
      "Applied limits",
      job.limits
        ? `memory ${formatBytes(limits.memory_bytes)}, pids ${limits.pids_limit}, ` +
            `network ${limits.network_mode}, user ${limits.user ?? "—"}`
        : null,
    ),
    field(
      "Resources",
      job.resources
        ? `wall ${formatDuration(resources.wall_seconds)}, CPU ${formatDuration(resources.cpu_seconds)}, ` +
            `peak memory ${formatBytes(resources.peak_memory_bytes)}`
        : null,
    ),
    field("Output truncated", job.output_truncated ? "yes" : "no"),
  ];
  if (job.callback_url) fields.push(field("Webhook", `${job.callback_url} (${job.callback_state})`));
  $("job-fields").replaceChildren(...fields);
}

// Reads a server-sent event stream from a fetch() Response (EventSource cannot send the
// Authorization header) and calls onEvent({event, data, id}) for each event.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // A chunk may end between the \r and \n of a line break: keep that \r for the next.
    const upTo = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
    const lines = buffer.slice(0, upTo).split(/\r\n|\r|\n/);
    buffer = lines.pop() + buffer.slice(upTo);
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) onEvent({ ...event, data: event.data.join("\n") });
        event = { event: "message", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) continue; // a comment: the server's keep-alive
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      let text = colon < 0 ? "" : line.slice(colon + 1);
      if (text.startsWith(" ")) text = text.slice(1);
      if (name === "event") event.event = text;
      else if (name === "data") event.data.push(text);
      else if (name === "id") event.id = text;
    }
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = window.setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      window.clearTimeout(timer);
      resolve();
    });
  });
}

// Follows the job's log live until its `end` event; reconnects from the last event id.
async function followLog(jobId, signal, onEnd) {
  const log = $("job-log");
  const status = $("log-status");
  log.replaceChildren();
  let offset = 0;
  let lastAttempt = null;
  while (!signal.aborted) {
    let ended = false;
    try {
      status.textContent = "(live)";
      const response = await api(`/jobs/${jobId}/logs?follow=true&offset=${offset}`, {
        signal,
        raw: true,
        accept: "text/event-stream",
      });
      await readEvents(response, (event) => {
        if (event.id !== null && /^\d+$/.test(event.id)) offset = Number(event.id);
        const data = JSON.parse(event.data);
        if (event.event === "log") {
          const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
          if (lastAttempt !== null && data.attempt !== lastAttempt) {
            const marker = document.createElement("span");
            marker.className = "attempt";
            marker.textContent = `── attempt ${data.attempt} ──\n`;
            log.append(marker);
          }
          lastAttempt = data.attempt;
          const span = document.createElement("span");
          span.className = `stream-${data.stream}`;
          span.textContent = data.text;
          log.append(span);
          if (stick) log.scrollTop = log.scrollHeight;
        } else if (event.event === "end") {
          ended = true;
          onEnd(data);
        }
      });
      clearError("log");
    } catch (error) {
      if (signal.aborted) return;
      showError("log", error);
      if (error instanceof ApiError && error.status >= 400 && error.status < 500) {
        status.textContent = "";
        return;
      }
    }
    if (ended) {
      status.textContent = log.childNodes.length ? "(complete)" : "(no output)";
      return;
    }
    status.textContent = "(reconnecting…)";
    await sleep(1000, signal);
  }
}

function showJob(jobId) {
  showView("job");
  const signal = viewController.signal;
  $("job-id").textContent = jobId;
  $("job-state").textContent = "";
  $("job-state").className = "badge";
  $("job-fields").replaceChildren();
  $("job-cancel").hidden = true;
  let job = null;
  const load = async () => {
    try {
      job = await api(`/jobs/${encodeURIComponent(jobId)}`, { signal });
      if (signal.aborted) return;
      renderJob(job);
      clearError("job");
    } catch (error) {
      showError("job", error);
    }
  };
  // Re-read while the job may still change; the log's `end` event reads it once more.
  every(POLL_MS, signal, async () => {
    if (job === null || !TERMINAL.has(job.state)) await load();
  });
  followLog(encodeURIComponent(jobId), signal, () => load());
  $("job-cancel").onclick = async () => {
    $("job-cancel").disabled = true;
    try {
      renderJob(await api(`/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST", signal }));
      clearError("cancel");
    } catch (error) {
      showError("cancel", error);
      $("job-cancel").disabled = false;
    }
  };
}

// -- Submitting --

function optionalNumber(form, name) {
  const value = form.elements[name].value.trim();
  return value === "" ? undefined : Number(value);
}

function jobFromForm(form) {
  const job = { image: form.elements.image.value.trim() };
  const command = parseCommand(form.elements.command.value);
  if (command !== null) job.command = command;
  const env = parsePairs(form.elements.env.value, "Environment");
  if (Object.keys(env).length) job.env = env;
  const labels = parsePairs(form.elements.labels.value, "Labels");
  if (Object.keys(labels).length) job.labels = labels;
  for (const name of ["timeout_seconds", "memory_mb", "cpus", "priority"]) {
    const value = optionalNumber(form, name);
    if (value !== undefined) job[name] = value;
  }
  return job;
}

function setUpSubmitView() {
  const form = $("submit-form");
  const preview = () => {
    try {
      const argv = parseCommand(form.elements.command.value);
      $("command-preview").textContent = argv === null ? "(the image's default)" : JSON.stringify(argv);
    } catch (error) {
      $("command-preview").textContent = error.message;
    }
  };
  form.elements.command.addEventListener("input", preview);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let job;
    try {
      job = jobFromForm(form);
    } catch (error) {
      showError("submit", error);
      return;
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const created = await api("/jobs", { method: "POST", body: job });
      clearError("submit");
      window.location.hash = `#/jobs/${created.id}`;
    } catch (error) {
      showError("submit", error);
    } finally {
      button.disabled = false;
    }
  });
  preview();
}

// ---- The top bar: queue depth and workers ------------------------------------------------

function setStat(id, value) {
  $(id).textContent = value === null || value === undefined ? "—" : String(value);
}

async function loadStats() {
  try {
    const stats = await api("/stats");
    setStat("stat-queued", stats.jobs && stats.jobs.queued);
    setStat("stat-running", stats.jobs && stats.jobs.running);
    const workers = stats.workers || {};
    setStat("stat-workers", workers.active);
    setStat(
      "stat-slots",
      workers.slots === null || workers.slots === undefined ? null : `${workers.busy ?? 0} / ${workers.slots}`,
    );
    clearError("stats");
  } catch (error) {
    for (const id of ["stat-queued", "stat-running", "stat-workers", "stat-slots"]) setStat(id, null);
    // A service without /stats (404) is not an error worth a banner; anything else is.
    if (!(error instanceof ApiError) || (error.status !== 404 && error.status !== 401)) {
      showError("stats", error);
    }
  }
}

// ---- Routing -----------------------------------------------------------------------------

function route() {
  viewController.abort();
  viewController = new AbortController();
  const hash = window.location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = hash.split("?", 2);
  for (const source of ["job", "log", "cancel", "jobs"]) clearError(source);
  const jobMatch = path.match(/^\/jobs\/([^/]+)$/);
  if (jobMatch) {
    showJob(decodeURIComponent(jobMatch[1]));
  } else if (path === "/submit") {
    showView("submit");
    $("submit-form").elements.image.focus();
  } else {
    showJobs(new URLSearchParams(query));
  }
}

function main() {
  setUpKeyPanel();
  setUpJobsView();
  setUpSubmitView();
  window.addEventListener("hashchange", route);
  route();
  let statsTimer = null;
  const pollStats = async () => {
    await loadStats();
    statsTimer = window.setTimeout(pollStats, POLL_MS);
  };
  pollStats();
  document.addEventListener("visibilitychange", () => {
    // Refresh at once when the tab comes back.
    if (!document.hidden) {
      window.clearTimeout(statsTimer);
      pollStats();
    }
  });
}

main();
