// hivemindd dashboard: polls the daemon's JSON API and draws uPlot charts. No build step.
// Test hook: #hm-test-status holds a JSON summary (polls, chart points, swarm rows, errors)
// that a headless browser's --dump-dom returns.
"use strict";

const POLL_MS = 3000;
const MAX_POINTS = 6000;
// A time series breaks (no line drawn) where two samples lie more than this many typical intervals apart:
// a pause, a stopped trainer, a host that slept. uPlot leaves a gap at a null value (spanGaps false).
const GAP_FACTOR = 3;
const status = { polls: 0, errors: [], points: {}, gaps: {}, gpu: "waiting", swarm_rows: 0, swarm_peers: [],
  trainer_state: null };

window.addEventListener("error", (e) => { status.errors.push(String(e.message || e)); writeStatus(); });
window.addEventListener("unhandledrejection", (e) => { status.errors.push("unhandled: " + String(e.reason)); writeStatus(); });

function writeStatus() {
  document.getElementById("hm-test-status").textContent = JSON.stringify(status);
}

// The session's control key: /?token= redirects to /#<key> (a fragment is never sent to any server); the tab
// keeps it in sessionStorage, which no other origin, not even another port of this host, can read. The
// session cookie alone only reads.
const CONTROL_KEY = (() => {
  const fromAddress = location.hash.slice(1);
  if (fromAddress) {
    sessionStorage.setItem("hivemindd-control-key", fromAddress);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("hivemindd-control-key") || "";
})();

async function api(path, options) {
  const opts = Object.assign({ credentials: "same-origin", cache: "no-store" }, options || {});
  opts.headers = Object.assign({ "X-Hivemindd-Dashboard": CONTROL_KEY }, opts.headers || {});
  const response = await fetch(path, opts);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : "HTTP " + response.status;
    const err = new Error(message);
    err.status = response.status;
    throw err;
  }
  return body;
}

function text(id, value) { document.getElementById(id).textContent = value; }
function fmt(value, digits) {
  return (value === null || value === undefined || Number.isNaN(value)) ? "–" : Number(value).toFixed(digits);
}
function pct(value) { return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + "%"; }
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  if (s < 120) return s + "s";
  if (s < 7200) return Math.round(s / 60) + "m";
  if (s < 172800) return Math.floor(s / 3600) + "h" + String(Math.round(s % 3600 / 60)).padStart(2, "0") + "m";
  return Math.round(s / 86400) + "d";
}

// --- charts --------------------------------------------------------------------------------

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

function makeChart(id, title, labels, yLabel, byStep) {
  const el = document.getElementById(id);
  const series = [{ label: byStep ? "step" : "time" }].concat(labels.map((label, i) => ({ label, stroke: COLORS[i],
    width: 1.5, spanGaps: false, points: { show: false } })));
  const opts = { title, width: 460, height: 220, series, scales: { x: { time: !byStep } },
    axes: [{ label: byStep ? "step" : "" }, { label: yLabel, size: 60 }], legend: { live: true } };
  return { plot: new uPlot(opts, [[]].concat(labels.map(() => [])), el), files: [] };
}

// Which columns of which file each chart draws (files: training, validation, system).
const CHARTS = {
  loss: { id: "chart-loss", title: "Loss", y: "loss", lines: [["training", "loss", "train loss"], ["validation", "val_loss", "val loss"]] },
  acc: { id: "chart-acc", title: "Accuracy", y: "top-1 / top-5",
    lines: [["training", "train_top1", "train top-1"], ["validation", "val_top1", "val top-1"], ["validation", "val_top5", "val top-5"]] },
  lr: { id: "chart-lr", title: "Learning rate", y: "lr", lines: [["training", "lr", "lr"]] },
  sps: { id: "chart-sps", title: "Samples/s (this host)", y: "samples/s", lines: [["training", "samples_per_s", "samples/s"]] },
  cpu: { id: "chart-cpu", title: "CPU and memory", y: "%", lines: [["system", "cpu_percent", "cpu %"], ["system", "mem_percent", "memory %"]] },
  net: { id: "chart-net", title: "Network (MiB per 5 s sample)", y: "MiB", lines: [["system", "net_sent_mb", "sent"], ["system", "net_recv_mb", "received"]] },
  gpu: { id: "chart-gpu", title: "GPU", y: "% / GiB", lines: [["system", "gpu_util_percent", "util %"], ["system", "gpu_mem_used_gb", "memory GiB"]] },
};

const charts = {};
const data = { training: {}, validation: {}, system: {} };  // file -> column -> values (timestamp included)
// Training and validation are drawn against the step (a restart after a kill repeats the steps since the
// last checkpoint: those rows replace the old ones); system stats against time.
const X = { training: "step", validation: "step", system: "timestamp" };
let cursor = null;
let historyRun = null;

function appendColumns(file, columns) {
  const xs = columns[X[file]] || [];
  if (!xs.length) return;
  const have = data[file];
  const known = have[X[file]] || [];
  let keep = known.length;
  while (keep > 0 && known[keep - 1] >= xs[0]) keep--;
  for (const [name, values] of Object.entries(columns)) {
    have[name] = (have[name] || []).slice(0, keep).concat(values);
  }
  const n = have[X[file]].length;
  if (n > MAX_POINTS) {  // keep memory bounded on long runs: thin the oldest half
    for (const name of Object.keys(have)) {
      const half = have[name].slice(0, n >> 1).filter((_, i) => i % 2 === 0);
      have[name] = half.concat(have[name].slice(n >> 1));
    }
  }
}

// [xs, ys...] with a row of nulls inserted wherever consecutive xs lie more than GAP_FACTOR typical
// (median) intervals apart, so that no line is drawn across the gap; returns [table, gaps inserted].
function breakAtGaps(table) {
  const xs = table[0];
  if (xs.length < 3) return [table, 0];
  const steps = xs.slice(1).map((x, i) => x - xs[i]).filter((d) => d > 0).sort((a, b) => a - b);
  if (!steps.length) return [table, 0];
  const typical = steps[steps.length >> 1];
  const out = table.map(() => []);
  let gaps = 0;
  for (let i = 0; i < xs.length; i++) {
    if (i > 0 && xs[i] - xs[i - 1] > GAP_FACTOR * typical) {
      out[0].push(xs[i - 1] + typical);
      for (let s = 1; s < table.length; s++) out[s].push(null);
      gaps++;
    }
    for (let s = 0; s < table.length; s++) out[s].push(table[s][i]);
  }
  return [out, gaps];
}

// "no GPU" instead of an empty chart, once the system stats show that the trainer has none to measure.
function showGpu() {
  const cols = data.system;
  const rows = (cols[X.system] || []).length;
  const measured = ["gpu_util_percent", "gpu_mem_used_gb"].some((name) =>
    (cols[name] || []).some((v) => v !== null && v !== undefined && !Number.isNaN(v)));
  status.gpu = measured ? "drawn" : rows ? "none" : "waiting";
  document.getElementById("gpu-none").hidden = status.gpu !== "none";
}

function redraw() {
  for (const [key, spec] of Object.entries(CHARTS)) {
    const tables = [];
    const files = [...new Set(spec.lines.map((l) => l[0]))];
    status.gaps[key] = 0;
    for (const file of files) {
      const cols = data[file];
      const lines = spec.lines.filter((l) => l[0] === file);
      const xs = cols[X[file]] || [];
      let table = [xs].concat(lines.map((l) => cols[l[1]] || xs.map(() => null)));
      if (X[file] === "timestamp") {  // steps have no pauses; time does
        let gaps;
        [table, gaps] = breakAtGaps(table);
        status.gaps[key] += gaps;
      }
      tables.push(table);
    }
    const joined = tables.length === 1 ? tables[0] : uPlot.join(tables);
    // uPlot.join orders series by table; put them back in CHARTS order
    const ordered = [joined[0]];
    let i = 1;
    for (const file of files) {
      for (const line of spec.lines) if (line[0] === file) ordered[1 + spec.lines.indexOf(line)] = joined[i++];
    }
    charts[key].plot.setData(ordered);
    status.points[key] = ordered.slice(1).reduce((sum, s) => sum + s.filter((v) => v !== null && v !== undefined).length, 0);
  }
  showGpu();
}

async function pollHistory() {
  const query = cursor === null ? "" : "?cursor=" + encodeURIComponent(cursor);
  let history;
  try {
    history = await api("/v1/metrics/history" + query);
  } catch (err) {
    if (err.status === 409) return;  // not in a run: nothing to draw
    throw err;
  }
  if (history.run_id !== historyRun) {  // joined another run: start the charts over
    historyRun = history.run_id;
    for (const file of Object.keys(data)) data[file] = {};
    if (cursor !== null) { cursor = null; return pollHistory(); }
  }
  for (const file of ["training", "validation", "system"]) appendColumns(file, history[file] || {});
  cursor = history.cursor;
  redraw();
}

// --- cards, swarm, log ----------------------------------------------------------------------

function setState(id, value, cls) {
  const el = document.getElementById(id);
  el.textContent = value;
  el.className = "value state-" + (cls || value);
}

function renderStatus(st) {
  const t = st.trainer || {};
  text("host", st.hostname + " · " + st.peer_id.slice(0, 12) + "… · v" + st.version);
  text("run", st.run_id || "not joined");
  setState("trainer-state", st.run_id ? (st.paused ? "paused" : t.state) : "idle");
  text("trainer-sub", st.run_id ? "restarts " + t.restarts + " · for " + duration(t.since_s) +
    (t.last_error ? " · " + t.last_error.slice(0, 80) : "") : "");
  text("step", t.step === null || t.step === undefined ? "–" : t.step + " / " + t.epoch);
  text("loss", fmt(t.loss, 4));
  status.trainer_state = t.state;
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = value;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function renderSwarm(view) {
  const body = document.querySelector("#swarm tbody");
  body.replaceChildren();
  for (const p of view.peers) {
    const row = document.createElement("tr");
    cell(row, p.hostname);
    cell(row, p.peer_id.slice(0, 16) + "…", "peer");
    cell(row, p.activity, "state-" + p.activity.replace(" ", "-"));
    cell(row, p.step === null ? "–" : p.step);
    cell(row, p.epoch === null ? "–" : p.epoch);
    cell(row, fmt(p.samples_per_s, 1));
    cell(row, fmt(p.loss, 4));
    cell(row, pct(p.best_val_top1 !== null ? p.best_val_top1 : p.val_top1));
    cell(row, p.device || "–");
    cell(row, duration(p.age_s) + " ago");
    body.appendChild(row);
  }
  const totals = view.totals;
  text("sps", fmt(totals.samples_per_s, 1) + " (" + totals.training + "/" + totals.peers + " training)");
  text("epochs", totals.dataset_epochs === null ? "–" : fmt(totals.dataset_epochs, 2) +
    (totals.last_milestone ? " / " + totals.last_milestone : ""));
  text("eta", totals.eta_s ? "last milestone in " + duration(totals.eta_s) : "");
  text("best", pct(totals.best_val_top1));
  status.swarm_rows = view.peers.length;
  status.swarm_peers = view.peers.map((p) => p.peer_id);
}

async function pollLog() {
  const logs = await api("/v1/logs?source=all&n=60");
  const el = document.getElementById("log");
  const atBottom = el.scrollTop + el.clientHeight >= el.scrollHeight - 4;
  el.textContent = logs.entries.map((e) => (e.source === "daemon" ? "[daemon] " : "") + e.line).join("\n");
  if (atBottom) el.scrollTop = el.scrollHeight;
  status.log_lines = logs.entries.length;
}

async function poll() {
  const errorBox = document.getElementById("error");
  try {
    const [st, view] = await Promise.all([api("/v1/status"), api("/v1/swarm")]);
    renderStatus(st);
    renderSwarm(view);
    await Promise.all([pollHistory(), pollLog()]);
    errorBox.hidden = true;
  } catch (err) {
    errorBox.hidden = false;
    errorBox.textContent = "cannot reach the daemon: " + err.message;
    status.errors.push("poll: " + err.message);
  }
  status.polls += 1;
  writeStatus();
  setTimeout(poll, POLL_MS);
}

// --- predict ---------------------------------------------------------------------------------

async function predict(event) {
  event.preventDefault();
  const file = document.getElementById("predict-file").files[0];
  const out = document.getElementById("predict-result");
  if (!file) { out.textContent = "choose an image first"; return; }
  out.textContent = "classifying…";
  const checkpoint = document.getElementById("predict-checkpoint").value;
  try {
    const result = await api("/v1/predict?top=5&checkpoint=" + checkpoint, {
      method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    const table = document.createElement("table");
    const head = document.createElement("tr");
    for (const h of ["class", "synset", "probability"]) { const th = document.createElement("th"); th.textContent = h; head.appendChild(th); }
    table.appendChild(head);
    for (const c of result.results[0].top) {
      const row = document.createElement("tr");
      cell(row, c.label || c.name || "#" + c.index);
      cell(row, c.synset || "");
      cell(row, pct(c.probability));
      table.appendChild(row);
    }
    out.replaceChildren(table);
    const note = document.createElement("div");
    note.textContent = "checkpoint step " + result.step + " (" + result.checkpoint.split("/").pop() + ")";
    out.appendChild(note);
  } catch (err) {
    out.textContent = "prediction failed: " + err.message;
  }
}

for (const [key, spec] of Object.entries(CHARTS)) {
  charts[key] = makeChart(spec.id, spec.title, spec.lines.map((l) => l[2]), spec.y, spec.lines[0][0] !== "system");
}
document.getElementById("predict-form").addEventListener("submit", predict);
writeStatus();
poll();
