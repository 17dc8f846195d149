// memfit operator dashboard: plain JS, hand-written SVG charts, nothing loaded from outside memfit.
// Knowledge: GET /versions (each version's evaluation). Serving: GET /dashboard/data, polled; rates
// and per-window percentiles come from the difference of two polls (Prometheus' histogram_quantile).
// The plotted numbers are written to <script id="plotted"> after each render.
"use strict";

const POLL_MS = 5000;
const HISTORY = 120; // polls kept (10 minutes at 5 s)
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];
const SVGNS = "http://www.w3.org/2000/svg";

const state = {
  key: sessionStorage.getItem("memfit-key") || "",
  versions: [],
  active: null,
  data: null,
  polls: [], // {t, snapshot}
  plotted: { knowledge: {}, serving: {}, cards: {} },
};

// ---- requests -----------------------------------------------------------------------------------
async function api(path, opts = {}) {
  const headers = Object.assign({ Accept: "application/json" }, opts.headers || {});
  if (state.key) headers.Authorization = "Bearer " + state.key;
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {
    method: opts.method || "GET",
    headers,
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
  });
  let payload = null;
  try { payload = await resp.json(); } catch (e) { payload = null; }
  if (!resp.ok) {
    const msg = payload && payload.error ? payload.error.message : resp.status + " " + resp.statusText;
    throw new Error(path + ": " + msg);
  }
  return payload;
}

function setStatus(text, isError) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.classList.toggle("error", !!isError);
}

// ---- numbers --------------------------------------------------------------------------------------
function num(x) { return typeof x === "number" && isFinite(x) ? x : null; }
function pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%"; }
function fix(x, d) { return x === null || x === undefined ? "–" : Number(x).toFixed(d); }
function secs(x) {
  if (x === null || x === undefined) return "–";
  return x < 1 ? (1000 * x).toFixed(x < 0.01 ? 2 : 0) + " ms" : x.toFixed(2) + " s";
}

// Prometheus histogram_quantile over cumulative [[le, count], ...] (le may be "+Inf")
function histogramQuantile(q, buckets) {
  const b = buckets.map(([le, c]) => [le === "+Inf" ? Infinity : Number(le), Number(c)])
    .sort((x, y) => x[0] - y[0]);
  if (!b.length || b[b.length - 1][1] <= 0) return null;
  const rank = q * b[b.length - 1][1];
  let prevLe = 0, prevC = 0;
  for (const [le, c] of b) {
    if (c >= rank) {
      if (!isFinite(le)) return prevLe;
      if (c === prevC) return le;
      return prevLe + (le - prevLe) * (rank - prevC) / (c - prevC);
    }
    prevLe = le; prevC = c;
  }
  return prevLe;
}

function bucketDiff(now, before) {
  const old = new Map((before || []).map(([le, c]) => [String(le), c]));
  return now.map(([le, c]) => [le, c - (old.get(String(le)) || 0)]);
}

// ---- charts -----------------------------------------------------------------------------------------
// series: [{name, values: [y|null per x], color?, dashed?, marks?: [bool per x]}]; xs: labels
function lineChart(svg, xs, series, opts = {}) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = svg.clientWidth || 480, H = svg.clientHeight || 220;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const L = 46, R = 10, T = 10, B = 34;
  const all = series.flatMap((s) => s.values.filter((v) => v !== null));
  svg.dataset.series = JSON.stringify({ x: xs, series: series.map((s) => ({ name: s.name, values: s.values })) });
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  };
  if (!xs.length || !all.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, opts.empty || "no data yet");
    return;
  }
  let lo = opts.min !== undefined ? Math.min(opts.min, ...all) : Math.min(...all);
  let hi = opts.max !== undefined ? Math.max(opts.max, ...all) : Math.max(...all);
  if (hi === lo) { hi = lo + (Math.abs(lo) || 1) * 0.1; lo = lo - (hi - lo); if (opts.min !== undefined) lo = Math.max(lo, opts.min); }
  const x = (i) => L + (xs.length === 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (xs.length - 1));
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  const fmt = opts.format || ((v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3)));
  for (let k = 0; k <= 4; k++) {
    const v = lo + ((hi - lo) * k) / 4;
    el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "axis" });
    el("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, fmt(v));
  }
  const step = Math.max(1, Math.ceil(xs.length / 10));
  xs.forEach((label, i) => {
    if (i % step === 0 || i === xs.length - 1) el("text", { x: x(i), y: H - B + 14, "text-anchor": "middle" }, String(label));
  });
  series.forEach((s, si) => {
    const color = s.color || COLORS[si % COLORS.length];
    let d = "", pen = false;
    s.values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      d += (pen ? "L" : "M") + x(i).toFixed(1) + " " + y(v).toFixed(1);
      pen = true;
    });
    if (d) el("path", { d, fill: "none", stroke: color, "stroke-width": 1.8, "stroke-dasharray": s.dashed ? "5 4" : "none" });
    if (!s.dashed) {
      s.values.forEach((v, i) => {
        if (v === null) return;
        const bad = s.marks && s.marks[i];
        const c = el("circle", { cx: x(i), cy: y(v), r: bad ? 4 : 2.5, fill: bad ? "#fff" : color, stroke: bad ? "#c62828" : color });
        const t = document.createElementNS(SVGNS, "title");
        t.textContent = `${s.name} @ ${xs[i]}: ${fmt(v)}${bad ? " (rejected)" : ""}`;
        c.appendChild(t);
      });
    }
  });
  let lx = L + 4;
  series.forEach((s, si) => {
    const color = s.color || COLORS[si % COLORS.length];
    el("rect", { x: lx, y: H - 12, width: 10, height: 3, fill: color });
    const t = el("text", { x: lx + 13, y: H - 8 }, s.name);
    lx += 20 + (t.getComputedTextLength ? t.getComputedTextLength() : s.name.length * 6);
  });
}

// ---- knowledge view (from /versions) -------------------------------------------------------------------
function renderKnowledge() {
  const evaluated = state.versions.filter((v) => v.evaluation && num(v.evaluation.retention) !== null);
  const xs = evaluated.map((v) => v.id);
  const pick = (k) => evaluated.map((v) => num(v.evaluation[k]));
  const rejected = evaluated.map((v) => v.state === "rejected");
  const k = {
    versions: xs,
    states: evaluated.map((v) => v.state),
    learning: pick("learning"),
    learning_heldout: pick("learning_heldout"),
    retention: pick("retention"),
    retention_base: pick("retention_base"),
    forgetting: pick("forgetting"),
    forgetting_base: pick("forgetting_base"),
    perplexity: pick("perplexity"),
  };
  state.plotted.knowledge = k;
  const gate = (state.data && state.data.gate) || {};
  const flat = (v) => xs.map(() => (v === undefined ? null : v));
  lineChart(document.getElementById("chart-learning"), xs, [
    { name: "ingested wording", values: k.learning, marks: rejected },
    { name: "held-out wording", values: k.learning_heldout, marks: rejected },
  ], { min: 0, max: 1, format: (v) => (100 * v).toFixed(0) + "%", empty: "no evaluated update yet" });
  lineChart(document.getElementById("chart-forgetting"), xs, [
    { name: "retention", values: k.retention, marks: rejected },
    { name: "forgetting vs parent", values: k.forgetting, marks: rejected },
    { name: "forgetting vs base", values: k.forgetting_base, marks: rejected },
    { name: "gate (parent)", values: flat(gate.max_forgetting), dashed: true, color: "#999" },
  ], { min: 0, max: 1, format: (v) => (100 * v).toFixed(0) + "%", empty: "no evaluated update yet" });
  lineChart(document.getElementById("chart-perplexity"), xs, [
    { name: "held-out perplexity", values: k.perplexity, marks: rejected },
  ], { empty: "no evaluated update yet" });
}

function renderVersions() {
  const tbody = document.querySelector("#versions-table tbody");
  tbody.textContent = "";
  const rows = [...state.versions].sort((a, b) => b.id - a.id);
  for (const v of rows) {
    const ev = v.evaluation || {};
    const tr = document.createElement("tr");
    tr.dataset.version = v.id;
    tr.dataset.state = v.state;
    const cells = [
      v.id, v.parent === null || v.parent === undefined ? "–" : v.parent,
      v.created_at ? new Date(v.created_at * 1000).toLocaleString() : "–",
      null, v.slots_changed,
      pct(num(ev.learning)), pct(num(ev.learning_heldout)), pct(num(ev.retention)),
      pct(num(ev.forgetting)) + " / " + pct(num(ev.forgetting_base)), fix(num(ev.perplexity), 2), v.state + (v.label ? " (" + v.label + ")" : ""),
    ];
    cells.forEach((c, i) => {
      const td = document.createElement("td");
      if (i === 3) {
        td.className = "docs";
        const docs = v.documents || [];
        td.textContent = docs.length ? docs.length + ": " + docs.slice(0, 3).join(", ") + (docs.length > 3 ? "…" : "") : "–";
        td.title = docs.join(", ");
      } else {
        td.textContent = c;
      }
      if (i === 10) td.className = "state-" + v.state;
      tr.appendChild(td);
    });
    const act = document.createElement("td");
    if (!v.active) {
      const b = document.createElement("button");
      b.textContent = v.state === "rejected" ? "activate anyway" : "activate";
      b.className = "activate";
      b.onclick = () => activate(v);
      act.appendChild(b);
    }
    if (v.id !== 0 && v.in_active_chain !== false && v.state !== "rejected" && isInActiveChain(v.id)) {
      const b = document.createElement("button");
      b.textContent = "revert";
      b.className = "revert";
      b.onclick = () => revert(v);
      act.appendChild(b);
    }
    tr.appendChild(act);
    tbody.appendChild(tr);
  }
}

function isInActiveChain(id) {
  const byId = new Map(state.versions.map((v) => [v.id, v]));
  let cur = byId.get(state.active);
  const seen = new Set();
  while (cur && !seen.has(cur.id)) {
    if (cur.id === id) return true;
    seen.add(cur.id);
    cur = cur.parent === null || cur.parent === undefined ? null : byId.get(cur.parent);
  }
  return false;
}

async function activate(v) {
  const msg = v.state === "rejected"
    ? `Version ${v.id} was rejected by the evaluation gate (${((v.evaluation.gate || {}).reasons || []).join("; ")}). Activate it anyway?`
    : `Activate version ${v.id}? New requests will be served by it.`;
  if (!confirm(msg)) return;
  try {
    const body = { why: "dashboard" };
    if (v.state === "rejected") body.force = true;
    await api(`/versions/${v.id}/activate`, { method: "POST", body });
    setStatus(`version ${v.id} activated`);
  } catch (e) { setStatus(e.message, true); }
  await refreshVersions();
}

async function revert(v) {
  if (!confirm(`Revert version ${v.id}? A new version that undoes its slot changes is published and activated.`)) return;
  try {
    const r = await api(`/versions/${v.id}/revert`, { method: "POST", body: { why: "dashboard" } });
    setStatus(`version ${v.id} reverted: version ${r.active} is active`);
  } catch (e) { setStatus(e.message, true); }
  await refreshVersions();
}

// ---- serving view (from /dashboard/data) ------------------------------------------------------------------
function renderServing() {
  const polls = state.polls;
  const xs = [], s = { e2e_p50: [], e2e_p95: [], e2e_p99: [], ttft_p50: [], ttft_p95: [],
    tokens_per_s: [], prompt_tokens_per_s: [], queue_depth: [], in_flight: [], errors_per_s: [] };
  // the first point covers everything since the process started; later ones the window since the last poll
  const zero = (d) => ({ time: d.serving.started_at, serving: { histograms: { e2e: [], ttft: [] },
    generation_tokens_total: 0, prompt_tokens_total: 0, errors_total: 0 } });
  for (let i = 0; i < polls.length; i++) {
    const prev = i === 0 ? zero(polls[0].d) : polls[i - 1].d;
    const a = prev.serving, b = polls[i].d.serving, dt = polls[i].d.time - prev.time;
    if (!(dt > 0)) continue;
    xs.push(new Date(polls[i].d.time * 1000).toLocaleTimeString());
    const e2e = bucketDiff(b.histograms.e2e, a.histograms.e2e);
    const ttft = bucketDiff(b.histograms.ttft, a.histograms.ttft);
    s.e2e_p50.push(histogramQuantile(0.5, e2e));
    s.e2e_p95.push(histogramQuantile(0.95, e2e));
    s.e2e_p99.push(histogramQuantile(0.99, e2e));
    s.ttft_p50.push(histogramQuantile(0.5, ttft));
    s.ttft_p95.push(histogramQuantile(0.95, ttft));
    s.tokens_per_s.push((b.generation_tokens_total - a.generation_tokens_total) / dt);
    s.prompt_tokens_per_s.push((b.prompt_tokens_total - a.prompt_tokens_total) / dt);
    s.queue_depth.push(polls[i].d.update_queue_depth ?? null);
    s.in_flight.push(b.in_flight);
    s.errors_per_s.push((b.errors_total - a.errors_total) / dt);
  }
  state.plotted.serving = Object.assign({ t: xs }, s);
  const msg = "no requests yet";
  lineChart(document.getElementById("chart-latency"), xs, [
    { name: "p50", values: s.e2e_p50 }, { name: "p95", values: s.e2e_p95 }, { name: "p99", values: s.e2e_p99 },
  ], { min: 0, empty: msg });
  lineChart(document.getElementById("chart-ttft"), xs, [
    { name: "p50", values: s.ttft_p50 }, { name: "p95", values: s.ttft_p95 },
  ], { min: 0, empty: msg });
  lineChart(document.getElementById("chart-tokens"), xs, [
    { name: "generated", values: s.tokens_per_s }, { name: "prompt", values: s.prompt_tokens_per_s },
  ], { min: 0, empty: msg });
  lineChart(document.getElementById("chart-queue"), xs, [
    { name: "update jobs queued", values: s.queue_depth }, { name: "HTTP requests in flight", values: s.in_flight },
  ], { min: 0, empty: msg });
  lineChart(document.getElementById("chart-errors"), xs, [
    { name: "errors / s", values: s.errors_per_s, color: "#c62828" },
  ], { min: 0, empty: msg });
}

function renderCards() {
  const d = state.data;
  if (!d) return;
  const sv = d.serving, mem = d.memory || {}, versions = d.versions || {};
  const e2e = sv.histograms.e2e, ttft = sv.histograms.ttft;
  const c = {
    active: d.active_version,
    replica_version: d.replica_version,
    rejected: versions.rejected ?? null,
    slots_written_ratio: mem.slots_written_ratio ?? null,
    slots_written: mem.slots_written ?? null,
    slots: mem.slots ?? null,
    top_slots_write_share: mem.top_slots_write_share ?? null,
    slot_rewrites_max: mem.slot_rewrites_max ?? null,
    generation_requests: sv.generation_requests,
    e2e_p50: histogramQuantile(0.5, e2e),
    e2e_p95: histogramQuantile(0.95, e2e),
    ttft_p50: histogramQuantile(0.5, ttft),
    generation_tokens_total: sv.generation_tokens_total,
    update_queue_depth: d.update_queue_depth ?? null,
    errors_total: sv.errors_total,
  };
  state.plotted.cards = c;
  const set = (id, text) => { document.getElementById(id).textContent = text; };
  set("replica-version", "serving version " + d.replica_version);
  set("card-active", String(c.active));
  set("card-rejected", c.rejected === null ? "–" : String(c.rejected));
  set("card-capacity", pct(c.slots_written_ratio));
  set("card-capacity-sub", c.slots === null ? "" : `${c.slots_written} of ${c.slots} slots`);
  set("card-topshare", pct(c.top_slots_write_share));
  set("card-rewrites", c.slot_rewrites_max === null ? "" : `most rewritten slot: ${c.slot_rewrites_max} writes`);
  set("card-requests", String(c.generation_requests));
  set("card-e2e", secs(c.e2e_p50) + " / " + secs(c.e2e_p95));
  set("card-ttft", secs(c.ttft_p50));
  set("card-tokens", String(c.generation_tokens_total));
  set("card-queue", c.update_queue_depth === null ? "–" : String(c.update_queue_depth));
  set("card-errors", String(c.errors_total));
}

function publishPlotted() {
  document.getElementById("plotted").textContent = JSON.stringify(state.plotted);
  document.body.dataset.ready = state.versionsLoaded && state.data ? "1" : "0";
}

// ---- loops --------------------------------------------------------------------------------------------------
async function refreshVersions() {
  try {
    const r = await api("/versions");
    state.versions = r.versions || [];
    state.active = r.active ?? (state.versions.find((v) => v.active) || {}).id;
    state.versionsLoaded = true;
    renderKnowledge();
    renderVersions();
  } catch (e) { setStatus(e.message, true); }
  publishPlotted();
}

async function poll() {
  try {
    const d = await api("/dashboard/data");
    state.data = d;
    state.polls.push({ d });
    if (state.polls.length > HISTORY) state.polls.shift();
    renderCards();
    renderServing();
    if (d.active_version !== state.active) await refreshVersions();
    else renderKnowledge();
    setStatus("updated " + new Date(d.time * 1000).toLocaleTimeString());
  } catch (e) { setStatus(e.message, true); }
  publishPlotted();
}

function init() {
  document.getElementById("poll-s").textContent = String(POLL_MS / 1000);
  const keyInput = document.getElementById("api-key");
  keyInput.value = state.key;
  keyInput.addEventListener("change", () => {
    state.key = keyInput.value.trim();
    sessionStorage.setItem("memfit-key", state.key);
    refreshVersions().then(poll);
  });
  refreshVersions().then(poll);
  setInterval(poll, POLL_MS);
  setInterval(refreshVersions, 6 * POLL_MS);
}

init();
