// qlocal studio's one script: sortable Runs table, live charts on the Run page, comparison charts.
"use strict";

function fmtTime(ts) {
  if (!ts || ts === "0" || ts === "0.0") return "";
  return new Date(parseFloat(ts) * 1000).toLocaleString();
}

function initRunsTable() {
  const table = document.getElementById("runs-table");
  if (!table) return;
  table.querySelectorAll("td.started").forEach(td => { td.textContent = fmtTime(td.dataset.ts); });
  table.querySelectorAll("th.sortable").forEach(th => {
    th.addEventListener("click", () => {
      const key = th.dataset.key, num = th.dataset.type === "num";
      const dir = th.dataset.dir === "asc" ? "desc" : "asc";
      table.querySelectorAll("th.sortable").forEach(o => { delete o.dataset.dir; });
      th.dataset.dir = dir;
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      const val = r => { const v = r.dataset[key] || ""; return num ? (v === "" ? -Infinity : parseFloat(v)) : v.toLowerCase(); };
      rows.sort((a, b) => { const x = val(a), y = val(b); const c = x < y ? -1 : x > y ? 1 : 0; return dir === "asc" ? c : -c; });
      rows.forEach(r => body.appendChild(r));
    });
  });
  // While a run trains, keep its row's status, steps and losses current (no reload).
  const refresh = () => {
    if (!table.querySelector('tr[data-status="running"]')) return;
    fetch("/api/runs").then(r => r.json()).then(all => {
      all.forEach(run => {
        const tr = table.querySelector(`tr[data-run="${CSS.escape(run.name)}"]`);
        if (!tr) return;
        const cells = tr.cells, num = (v, d) => (v === null || v === undefined) ? "" : Number(v).toFixed(d);
        ["status", "steps", "last_loss", "last_val_loss", "tokens_per_s"].forEach(k => { tr.dataset[k] = run[k] === null ? "" : run[k]; });
        cells[5].innerHTML = ""; const badge = document.createElement("span");
        badge.className = "status " + run.status; badge.textContent = run.status; cells[5].appendChild(badge);
        cells[6].textContent = run.steps + (run.total_steps ? " / " + run.total_steps : "");
        cells[7].textContent = num(run.last_loss, 4); cells[8].textContent = num(run.last_val_loss, 4);
        cells[9].textContent = num(run.tokens_per_s, 0);
      });
    });
  };
  setInterval(refresh, 2000);
}

function plotReady() { return typeof Plotly !== "undefined"; }

function newChart(div) {
  if (!plotReady()) { div.textContent = "charts need plotly: pip install 'qlocal[studio]'"; return; }
  Plotly.newPlot(div, [], {title: {text: div.dataset.title}, margin: {t: 40, r: 10, b: 40, l: 60},
                            xaxis: {title: {text: "step"}}, showlegend: true}, {responsive: true, displaylogo: false});
}

// Plotly pads a flat series by +-1, which flattens a constant learning rate (1e-4) onto 0.
function fitFlat(div) {
  const ys = [].concat(...(div.data || []).map(t => Array.from(t.y || [])));
  if (!ys.length) return;
  const lo = Math.min(...ys), hi = Math.max(...ys);
  if (lo === hi) {
    const pad = lo === 0 ? 1 : Math.abs(lo) * 0.1;
    Plotly.relayout(div, {"yaxis.range": [lo - pad, hi + pad]});
  } else if (div.layout.yaxis && div.layout.yaxis.range && !div.layout.yaxis.autorange) {
    Plotly.relayout(div, {"yaxis.autorange": true});
  }
}

function seriesOf(rows, key) {
  const xs = [], ys = [];
  rows.forEach(r => { if (r[key] !== undefined && r[key] !== null) { xs.push(r.step); ys.push(r[key]); } });
  return [xs, ys];
}

function initRunPage() {
  const box = document.getElementById("run");
  if (!box) return;
  const name = box.dataset.run, base = "/api/runs/" + encodeURIComponent(name);
  const charts = Array.from(document.querySelectorAll(".charts .chart"));
  charts.forEach(div => { newChart(div); div.dataset.points = "0"; });
  const draw = (rows, reset) => {
    if (!plotReady()) return;
    charts.forEach(div => {
      const [xs, ys] = seriesOf(rows, div.dataset.key);
      if (reset || !div.data || div.data.length === 0) {
        Plotly.react(div, [{x: xs, y: ys, mode: "lines+markers", name: div.dataset.key, marker: {size: 4}}], div.layout);
        div.dataset.points = String(xs.length);
      } else if (xs.length) {
        Plotly.extendTraces(div, {x: [xs], y: [ys]}, [0]);
        div.dataset.points = String(parseInt(div.dataset.points) + xs.length);
      }
      fitFlat(div);
    });
  };
  const showStatus = s => {
    const badge = document.getElementById("run-status");
    badge.textContent = s.status; badge.className = "status " + s.status; box.dataset.status = s.status;
    document.getElementById("stop-button").hidden = s.status !== "running" || !s.job;  // terminal runs: Ctrl-C there
    document.getElementById("resume-button").hidden = !s.resumable;
    const p = s.progress || {};
    document.getElementById("progress-bar").style.width = (100 * (p.fraction || 0)).toFixed(1) + "%";
    let text = p.total ? `step ${p.step} / ${p.total}` : (p.step ? `step ${p.step}` : "starting…");
    if (p.eta_s !== null && p.eta_s !== undefined && s.status === "running") text += ` · ETA ${Math.round(p.eta_s)} s`;
    document.getElementById("progress-text").textContent = text;
    if (s.log !== undefined) document.getElementById("log").textContent = s.log;
  };
  const es = new EventSource(base + "/events");
  es.addEventListener("metrics", e => draw(JSON.parse(e.data), false));
  es.addEventListener("reset", e => draw(JSON.parse(e.data), true));
  es.addEventListener("status", e => {
    const s = JSON.parse(e.data);
    showStatus(s);
    if (s.status !== "running") es.close();  // nothing more will come; Resume reloads the page
  });
  fetch(base + "/example").then(r => r.json()).then(ex => {
    const pre = document.getElementById("example");
    pre.textContent = "";
    if (ex.error) { pre.textContent = ex.error; return; }
    ex.segments.forEach(([text, trained]) => {
      const span = document.createElement("span");
      span.className = trained ? "trained" : "prompt"; span.textContent = text; pre.appendChild(span);
    });
  });
}

function initCompare() {
  const box = document.getElementById("compare");
  if (!box) return;
  const names = JSON.parse(box.dataset.runs || "[]");
  const q = names.map(n => "run=" + encodeURIComponent(n)).join("&");
  fetch("/api/compare?" + q).then(r => r.json()).then(all => {
    box.querySelectorAll(".chart").forEach(div => {
      newChart(div);
      if (!plotReady()) return;
      const traces = names.map(n => { const [xs, ys] = seriesOf(all[n] || [], div.dataset.key); return {x: xs, y: ys, mode: "lines+markers", marker: {size: 4}, name: n}; });
      Plotly.react(div, traces, div.layout);
      fitFlat(div);
    });
  });
}

document.addEventListener("DOMContentLoaded", () => { initRunsTable(); initRunPage(); initCompare(); });
