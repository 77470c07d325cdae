// The moedb dashboard: experts, load, imbalance, recent routes, and a query box. Plain DOM + SVG, no
// libraries (the page works offline). Every text from the server is set with textContent.
"use strict";

const COLORS = ["#3465a4", "#cc7a00", "#4e9a06", "#a40000", "#75507b", "#06989a", "#8f5902", "#c4a000"];
const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 5000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
const num = (x, d = 1) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));

// ---------------------------------------------------------------- API calls (with the key, if one is needed)
async function api(path, body) {
  const headers = {};
  const key = sessionStorage.getItem("moedb-key");
  if (key) headers["Authorization"] = "Bearer " + key;
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (resp.status === 401) {
    document.getElementById("key-box").hidden = false;
    throw new Error("an API key is needed");
  }
  const data = await resp.json();
  if (!resp.ok) throw new Error(data.error ? data.error.type + ": " + data.error.message : resp.statusText);
  return data;
}

document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("moedb-key", document.getElementById("key-input").value);
  document.getElementById("key-input").value = "";
  document.getElementById("key-box").hidden = true;
  refresh();
});

// ---------------------------------------------------------------- panels
function showFigures(stats) {
  const imb = stats.imbalance || {};
  const lat = stats.latency_ms || {};
  const items = [
    ["queries", stats.queries], ["routed", stats.routed],
    ["abstained", `${stats.abstained} (${pct(stats.abstention_rate)})`],
    ["latency p50", num(lat.p50) + " ms"], ["latency p95", num(lat.p95) + " ms"],
    ["imbalance CV", num(imb.cv, 2)], ["max / mean", num(imb.max_mean, 2)], ["Gini", num(imb.gini, 2)],
  ];
  const box = document.getElementById("figures");
  box.replaceChildren(...items.map(([label, value]) =>
    el("div", { class: "figure", "data-figure": label }, el("div", { class: "value" }, value ?? "–"),
       el("div", { class: "label" }, label))));
}

function showShareChart(stats) {
  // horizontal bars, the expert's name left of its bar and its share at the bar's end: no legend
  const svg = document.getElementById("share-chart");
  const rows = (stats.experts || []).slice(0, 12);
  const width = svg.clientWidth || 500, rowH = 18, left = 130, right = 60;
  svg.setAttribute("viewBox", `0 0 ${width} ${Math.max(rows.length * rowH + 10, 40)}`);
  svg.style.height = Math.max(rows.length * rowH + 10, 40) + "px";
  svg.replaceChildren();
  if (!rows.length) { svg.append(svgEl("text", { x: 10, y: 20 }, "no experts yet")); return; }
  const top = Math.max(...rows.map((e) => e.share), 1e-9);
  rows.forEach((e, i) => {
    const y = 5 + i * rowH, w = Math.max(0, (width - left - right) * e.share / top);
    svg.append(svgEl("text", { x: left - 6, y: y + 12, "text-anchor": "end" }, e.name.slice(0, 20)));
    svg.append(svgEl("rect", { x: left, y: y + 2, width: w, height: rowH - 5, fill: COLORS[i % COLORS.length],
                               class: "share-bar", "data-expert": e.name }));
    svg.append(svgEl("text", { x: left + w + 4, y: y + 12 }, `${pct(e.share)} (${e.queries})`));
  });
}

function showLoadChart(stats) {
  // one line per busy expert (the top 5), "other" and "abstained"; each labelled at its right end
  const svg = document.getElementById("load-chart");
  const lot = stats.load_over_time || { buckets: [] };
  const buckets = lot.buckets || [];
  const width = svg.clientWidth || 900, height = 240, left = 40, right = 130, top = 10, bottom = 26;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  svg.dataset.points = String(buckets.length);
  svg.dataset.queries = String(buckets.reduce((s, b) => s + b.queries, 0));
  document.getElementById("bucket-width").textContent = lot.bucket_seconds ?
    `(queries per ${lot.bucket_seconds} s bucket)` : "";
  if (!buckets.length) { svg.append(svgEl("text", { x: 10, y: 20 }, "no queries logged yet")); return; }
  const names = (stats.experts || []).filter((e) => e.queries > 0).slice(0, 5).map((e) => e.name);
  const series = names.map((n) => ({ name: n, values: buckets.map((b) => b.by_expert[n] || 0) }));
  const other = buckets.map((b) => Object.entries(b.by_expert).reduce(
    (s, [k, v]) => s + (names.includes(k) ? 0 : v), 0));
  if (other.some((v) => v)) series.push({ name: "other", values: other, dash: "6 3" });
  const abst = buckets.map((b) => b.abstained);
  if (abst.some((v) => v)) series.push({ name: "abstained", values: abst, dash: "2 3", color: "#000" });
  const ymax = Math.max(1, ...series.flatMap((s) => s.values));
  const X = (i) => left + (buckets.length === 1 ? (width - left - right) / 2 :
    i * (width - left - right) / (buckets.length - 1));
  const Y = (v) => top + (height - top - bottom) * (1 - v / ymax);
  for (const t of [0, 0.5, 1]) {
    const v = Math.round(ymax * t);
    svg.append(svgEl("line", { x1: left, x2: width - right, y1: Y(v), y2: Y(v), class: "grid" }));
    svg.append(svgEl("text", { x: left - 5, y: Y(v) + 4, "text-anchor": "end" }, String(v)));
  }
  svg.append(svgEl("line", { x1: left, x2: width - right, y1: Y(0), y2: Y(0), class: "axis" }));
  const fmt = (ts) => new Date(ts * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  svg.append(svgEl("text", { x: left, y: height - 6 }, fmt(buckets[0].start)));
  svg.append(svgEl("text", { x: width - right, y: height - 6, "text-anchor": "end" }, fmt(buckets[buckets.length - 1].start)));
  const labelsY = [];
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const pts = s.values.map((v, j) => `${X(j)},${Y(v)}`).join(" ");
    svg.append(svgEl("polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 2,
                                   "stroke-dasharray": s.dash || "", class: "load-line", "data-series": s.name }));
    s.values.forEach((v, j) => svg.append(svgEl("circle", { cx: X(j), cy: Y(v), r: 2.5, fill: color })));
    let y = Y(s.values[s.values.length - 1]) + 4;   // the label at the line's end, nudged off the others
    while (labelsY.some((o) => Math.abs(o - y) < 12)) y += 12;
    labelsY.push(y);
    svg.append(svgEl("text", { x: width - right + 6, y, fill: color }, s.name.slice(0, 18)));
  });
}

function showExperts(experts, stats) {
  const byName = Object.fromEntries((stats.experts || []).map((e) => [e.name, e]));
  const body = document.querySelector("#experts-table tbody");
  const top = Math.max(1e-9, ...(stats.experts || []).map((e) => e.share));
  body.replaceChildren(...experts.map((x) => {
    const s = byName[x.name] || {};
    const share = s.share || 0;
    const ok = s.feedback_success_rate;
    return el("tr", { "data-expert": x.name },
      el("td", {}, x.name + (x.refuse ? " (refuses)" : "")), el("td", { class: "num" }, x.size),
      el("td", {}, el("span", { class: "bar-track" }, el("span", { class: "bar", style: `width:${100 * share / top}%` })),
         pct(share)),
      el("td", { class: "num" }, s.queries ?? 0), el("td", { class: "num" }, num(s.mean_confidence, 2)),
      el("td", { class: "num" }, ok === null || ok === undefined ? "–" : `${pct(ok)} of ${s.feedback}`),
      el("td", { class: "num" }, num(s.latency_p50_ms)), el("td", { class: "num" }, num(s.latency_p95_ms)));
  }));
}

function showRecent(recent) {
  const body = document.querySelector("#recent-table tbody");
  body.replaceChildren(...recent.map((r) => {
    const who = r.abstained ?
      el("span", { class: "abstained" }, r.refused_by ? `abstained (refused by ${r.refused_by})` : "abstained") :
      r.experts.map((e) => `${e.name} (${num(e.confidence, 2)})`).join(", ");
    return el("tr", {}, el("td", {}, new Date(r.time * 1000).toLocaleTimeString()), el("td", {}, r.via),
              el("td", {}, r.query), el("td", {}, who), el("td", { class: "num" }, num(r.latency_ms)));
  }));
}

// ---------------------------------------------------------------- the query box
function showRoute(r) {
  const box = document.getElementById("route-result");
  box.className = "";
  const parts = [];
  if (r.abstained) {
    parts.push(el("p", { class: "abstained" }, r.refused_by ?
      `Refused: the query looks like the out-of-scope examples in ${r.refused_by} (abstained).` :
      "No expert is confident enough for this query (abstained)."));
  }
  for (const e of r.experts) {
    parts.push(el("div", { class: "routed-expert", "data-expert": e.name }, el("span", { class: "name" }, e.name),
      el("span", { class: "bar-track" }, el("span", { class: "bar", style: `width:${100 * e.confidence}%` })),
      `confidence ${num(e.confidence, 3)}`));
  }
  const x = r.explanation;
  if (x) {
    const best = x.best_rejected ? ` (best rejected: ${x.best_rejected.name} at ${num(x.best_rejected.confidence, 3)})` : "";
    const mix = Object.entries(x.mix || {}).map(([k, v]) => `${k} ${num(v, 2)}`).join(", ");
    const words = (x.lexical_terms || []).map((t) => t[0]).join(", ");
    parts.push(el("p", { class: "explanation" }, `threshold ${num(x.threshold, 3)}${best}; scored ` +
      `${x.experts_scored} of ${x.experts_total} experts; mix ${mix}` + (words ? `; words: ${words}` : "")));
  }
  for (const h of r.hits) {
    parts.push(el("div", { class: "passage", "data-expert": h.expert },
      el("div", { class: "meta" }, `${h.expert} · score ${num(h.score, 3)} · ${h.source || h.id}`), h.text));
  }
  parts.push(el("p", { class: "muted" }, `query id ${r.query_id ?? "–"} · ${num(r.latency_ms)} ms`));
  box.replaceChildren(...parts);
}

document.getElementById("query-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const query = document.getElementById("query-input").value;
  const k = parseInt(document.getElementById("query-k").value, 10) || 5;
  const box = document.getElementById("route-result");
  box.textContent = "routing…";
  try {
    showRoute(await api("/v1/route", { query, k, explain: true }));
    refresh();
  } catch (e) {
    box.className = "error";
    box.textContent = e.message;
  }
});

// ---------------------------------------------------------------- refresh loop
async function refresh() {
  try {
    const [info, experts, stats, recent] = await Promise.all([
      api("/v1/info"), api("/v1/experts"), api("/v1/stats?buckets=30"), api("/v1/recent?limit=20")]);
    document.getElementById("file-info").textContent =
      `${info.path} · ${info.experts} experts · ${info.documents} documents · ${info.queries_logged} queries logged · ` +
      `embedder ${info.embedder ? info.embedder.name : "?"}`;
    showFigures(stats);
    showShareChart(stats);
    showLoadChart(stats);
    showExperts(experts, stats);
    showRecent(recent);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("updated").textContent = e.message;
  }
}

async function start() {
  const config = await (await fetch("/dashboard.json")).json();
  if (config.key_required && !sessionStorage.getItem("moedb-key")) {
    document.getElementById("key-box").hidden = false;
    document.getElementById("file-info").textContent = "waiting for the API key";
  } else {
    refresh();
  }
}

start();
setInterval(() => {
  if (!document.hidden && document.getElementById("key-box").hidden) refresh();
}, REFRESH_MS);
