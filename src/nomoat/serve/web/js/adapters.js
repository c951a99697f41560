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

export async function refreshAdapters() {
  await run(async () => {
    const { data } = await apiJSON(`${S}/adapters`);
    state.rows = data;
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
}
