// The adapters page: the registry as a table (name, base, method, data, metrics, size, created), each adapter's
// provenance, load-and-chat, export (HF folder, GGUF), delete with confirmation, and merge of the picked adapters.
"use strict";

import { $, apiJSON, el, humanBytes } from "./api.js";

const S = "v1/studio";
const state = { openChat: null, rows: [] };

const fmt = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : String(v));

function metricsText(m) {
  const parts = [];
  if (m.final_loss != null) parts.push(`loss ${fmt(m.final_loss)}`);
  if (m.val_loss != null) parts.push(`val ${fmt(m.val_loss)}`);
  if (m.steps != null) parts.push(`${m.steps} steps`);
  return parts.join(" · ") || "-";
}

function baseName(path) {
  return path ? path.split(/[\\/]/).filter(Boolean).pop() : "-";
}

async function run(fn) {
  $("adapters-error").textContent = "";
  try {
    await fn();
  } catch (err) {
    $("adapters-error").textContent = err.message;
  }
}

async function showProvenance(name) {
  const info = await apiJSON(`${S}/adapters/${encodeURIComponent(name)}`);
  const box = document.querySelector("[data-testid=provenance]");
  box.hidden = false;
  $("prov-heading").textContent = `Provenance of ${name}`;
  $("prov-body").textContent = JSON.stringify({ provenance: info.provenance, adapter_config: info.adapter_config,
    files: info.files, size_bytes: info.size_bytes }, null, 2);
  $("prov-body").focus();
}

async function remove(name) {
  if (!window.confirm(`Delete the adapter "${name}" from the registry? This cannot be undone.`)) return;
  await apiJSON(`${S}/adapters/${encodeURIComponent(name)}`, { method: "DELETE" });
  await refreshAdapters();
}

async function exportAdapter(row, format) {
  const job = await apiJSON(`${S}/adapters/${encodeURIComponent(row.name)}/export`, { method: "POST",
    json: { format, model: row.base } });
  $("adapters-error").textContent = `Export queued (job ${job.id}); it will write ${job.output}.`;
}

async function loadAndChat(name) {
  await apiJSON(`${S}/adapters/${encodeURIComponent(name)}/load`, { method: "POST" });
  await state.openChat(name);
}

function rowNode(row) {
  const exportSel = el("select", { "aria-label": `Export format for ${row.name}` },
    el("option", { value: "hf", text: "HF folder (merged)" }), el("option", { value: "gguf", text: "GGUF (merged)" }),
    el("option", { value: "gguf-lora", text: "GGUF LoRA" }));
  const actions = el("td", { class: "actions" },
    el("button", { type: "button", class: "link", text: "Provenance", testid: "adapter-provenance",
      onclick: () => run(() => showProvenance(row.name)) }),
    el("button", { type: "button", class: "link", text: "Load and chat", testid: "adapter-chat",
      onclick: () => run(() => loadAndChat(row.name)) }),
    exportSel,
    el("button", { type: "button", class: "link", text: "Export", testid: "adapter-export",
      onclick: () => run(() => exportAdapter(row, exportSel.value)) }),
    el("button", { type: "button", class: "link danger-text", text: "Delete", testid: "adapter-delete",
      "aria-label": `Delete ${row.name}`, onclick: () => run(() => remove(row.name)) }));
  return el("tr", { "data-name": row.name, testid: "adapter-row" },
    el("td", {}, el("input", { type: "checkbox", class: "pick", value: row.name, "aria-label": `Pick ${row.name}` })),
    el("th", { scope: "row", text: row.name + (row.loaded ? " (loaded)" : "") }),
    el("td", { text: row.error ? `unreadable: ${row.error}` : baseName(row.base), title: row.base || "" }),
    el("td", { text: row.method || "-" }), el("td", { text: row.data.join(", ") || "-" }),
    el("td", { text: metricsText(row.metrics) }), el("td", { text: humanBytes(row.size) }),
    el("td", { text: (row.created || "").replace("T", " ").replace("+00:00", " UTC") }), actions);
}

function fillEvalForm(rows, files) {
  const keep = (id, options) => {
    const box = $(id);
    const previous = box.value;
    box.replaceChildren(...options);
    if ([...box.options].some((o) => o.value === previous)) box.value = previous;
  };
  keep("eval-adapter", rows.filter((r) => !r.error).map((r) => el("option", { value: r.name, text: r.name })));
  keep("eval-data", files.map((f) => el("option", { value: JSON.stringify({ root: f.root, path: f.path }), text: f.label })));
}

function evalTable(report) {
  const pct = (row, v) => (v == null ? "-" : row.metric === "perplexity" ? v.toFixed(3) : `${(100 * v).toFixed(1)}%`);
  const [base, tuned] = [report.columns[0], report.columns[1]];
  const head = el("tr", {}, ...["data", "metric", "n", base, tuned, "change"].map((h) => el("th", { scope: "col", text: h })));
  const rows = report.results.map((r) => {
    const a = r.values[base];
    const b = r.values[tuned];
    const d = a == null || b == null ? null : b - a;
    const better = d == null || d === 0 ? "" : (d > 0) === r.higher_is_better ? "better" : "worse";
    const change = d == null ? "-" : `${d > 0 ? "+" : ""}${r.metric === "perplexity" ? d.toFixed(3) : `${(100 * d).toFixed(1)} pts`}`;
    return el("tr", {}, el("td", { text: r.data }), el("td", { text: r.metric }), el("td", { text: String(r.n) }),
      el("td", { text: pct(r, a) }), el("td", { text: pct(r, b) }), el("td", { class: better, text: `${change} ${better}`.trim() }));
  });
  return el("table", { class: "table" }, el("thead", {}, head), el("tbody", {}, ...rows));
}

async function evaluate(event) {
  event.preventDefault();
  await run(async () => {
    const name = $("eval-adapter").value;
    const ref = JSON.parse($("eval-data").value || "null");
    if (!name || !ref) throw new Error("Choose an adapter and a dataset to evaluate on.");
    const row = state.rows.find((r) => r.name === name);
    let job = await apiJSON(`${S}/adapters/${encodeURIComponent(name)}/eval`, { method: "POST",
      json: { ...ref, model: row?.base || "", limit: Number($("eval-limit").value) || 50 } });
    $("eval-result").replaceChildren();
    while (["queued", "running", "stopping"].includes(job.status)) {
      $("eval-status").textContent = `Evaluating ${name} (job ${job.id}: ${job.status})…`;
      await new Promise((resolve) => setTimeout(resolve, 1000));
      job = await apiJSON(`${S}/jobs/${job.id}`);
    }
    if (job.status !== "done") throw new Error(`The evaluation ${job.status}: ${job.error || "see its log on the Train page"}`);
    $("eval-status").textContent = `${name} against its base model on ${ref.path}:`;
    $("eval-result").replaceChildren(evalTable(await apiJSON(`${S}/jobs/${job.id}/result`)));
  });
}

export async function refreshAdapters() {
  await run(async () => {
    const [{ data }, files] = await Promise.all([apiJSON(`${S}/adapters`), apiJSON(`${S}/data`)]);
    state.rows = data;
    fillEvalForm(data, files.data);
    $("registry-body").replaceChildren(...data.map(rowNode));
    if (!data.length) $("registry-body").append(el("tr", {}, el("td", { colspan: 9, text: "No adapters yet: train one." })));
  });
}

async function merge(event) {
  event.preventDefault();
  await run(async () => {
    const names = [...document.querySelectorAll("#registry-body .pick:checked")].map((b) => b.value);
    if (names.length < 2) throw new Error("Pick two or more adapters to merge.");
    const density = $("merge-density").value;
    const job = await apiJSON(`${S}/adapters/merge`, { method: "POST", json: { adapters: names,
      method: $("merge-method").value, name: $("merge-name").value.trim(), density: density ? Number(density) : undefined } });
    $("adapters-error").textContent = `Merge queued (job ${job.id}); the result appears here when it is done.`;
  });
}

export function initAdapters(openChat) {
  state.openChat = openChat;
  $("merge-form").addEventListener("submit", merge);
  $("eval-form").addEventListener("submit", evaluate);
}
