// distml ui: the live parts of the pages, and confirmations. Pages read without this script;
// with it, elements with data-events follow a server-sent event stream and forms with
// data-confirm ask before they act.
"use strict";

const streams = [];
function stream(url) {
  const source = new EventSource(url);
  streams.push(source);
  return source;
}
window.addEventListener("pagehide", () => { for (const source of streams) source.close(); });

function confirmForms() {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
}

function followRun(section) {
  const source = stream(section.dataset.events);
  source.onmessage = (message) => {
    const run = JSON.parse(message.data);
    const status = document.getElementById("run-status");
    if (status) {
      status.textContent = run.status;
      status.className = "state s-" + run.status;
    }
    for (const [node, step] of Object.entries(run.steps)) {
      for (const el of document.querySelectorAll(`[data-node-id="${CSS.escape(node)}"]`)) {
        if (el.tagName.toLowerCase() === "g") {
          if (el.dataset.state !== step.status) el.dataset.state = step.status;
          const detail = el.querySelector("text.detail");
          if (detail) detail.textContent = `${step.status} ${step.detail}`;
        } else {
          const cell = el.querySelector('[data-field="status"]');
          if (cell) { cell.textContent = step.status; cell.className = "state s-" + step.status; }
        }
      }
    }
    if (run.status !== "running") source.close();
  };
  source.addEventListener("problem", () => source.close());
}

function followLog(pre) {
  const source = stream(pre.dataset.events);
  source.onmessage = (message) => {
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = JSON.parse(message.data).text;
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  };
  source.addEventListener("problem", () => source.close());
}

function followService(section) {
  const source = stream(section.dataset.events);
  source.onmessage = (message) => {
    const live = JSON.parse(message.data);
    const state = document.getElementById("service-state");
    if (state) { state.textContent = live.state; state.className = "state s-" + live.state; }
    const rates = document.getElementById("rates");
    const r = live.rates || {};
    const shown = (value) => (value === null || value === undefined ? "–" : value);
    if (rates && r.rps !== undefined) {
      rates.textContent = `${r.rps} req/s · error rate ${r.error_rate} · p50 ${shown(r.p50_ms)} ms · ` +
        `p99 ${shown(r.p99_ms)} ms over ${r.window_s} s`;
    }
    const table = document.getElementById("traffic");
    if (table && live.traffic) {
      const rows = ["<tr><th>model</th><th>version</th><th>share %</th></tr>"];
      for (const [model, split] of Object.entries(live.traffic)) {
        for (const [version, share] of Object.entries(split)) {
          const m = model.replace(/[<>&"]/g, ""), v = String(version).replace(/[<>&"]/g, "");
          rows.push(`<tr data-model="${m}" data-version="${v}"><td>${m}</td><td>${v}</td><td>${share}</td></tr>`);
        }
      }
      if (rows.length > 1) table.innerHTML = rows.join("");
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  confirmForms();
  const dag = document.querySelector("section.dag[data-events]");
  if (dag) followRun(dag);
  const log = document.querySelector("pre.log[data-events]");
  if (log) followLog(log);
  const service = document.querySelector("#service-live[data-events]");
  if (service) followService(service);
});
