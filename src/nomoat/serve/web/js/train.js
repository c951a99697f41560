// The train page: pick a model and a dataset (upload or a file under --data-dir), preview it as training sees it,
// set the method and its knobs (the CLI's defaults), start; then follow the job queue, with live loss and
// learning-rate charts fed by server-sent events, the ETA, stop, resume, the log, and "chat with the adapter".
"use strict";

import { $, apiFetch, apiJSON, el, errorText, humanBytes, sseEvents } from "./api.js";

const S = "v1/studio";
const ACTIVE = ["queued", "running", "stopping"];
const state = { info: null, watching: null, watchCtl: null, records: [], charts: {}, openChat: null, timer: 0 };

function dataValue(item) {
  return JSON.stringify({ root: item.root, path: item.path });
}

async function refreshData(select) {
  const { data } = await apiJSON(`${S}/data`);
  const box = $("train-data");
  const previous = select ?? box.value;
  box.replaceChildren(...data.map((d) => el("option", { value: dataValue(d), text: `${d.label} (${humanBytes(d.size)})` })));
  if (!data.length) box.append(el("option", { value: "", text: "no dataset yet: upload one" }));
  if ([...box.options].some((o) => o.value === previous)) box.value = previous;
}

function setDefaults(info) {
  const d = info.defaults;
  const fields = { "t-rank": d.rank, "t-alpha": d.alpha, "t-lr": d.lr, "t-epochs": d.epochs, "t-seq": d.seq_len,
    "t-batch": d.batch_size, "t-accum": d.grad_accum, "t-beta": d.beta };
  for (const [id, v] of Object.entries(fields)) if ($(id).value === "") $(id).value = v;
  $("t-on").value = d.train_on;
  $("t-packing").checked = d.packing;
  $("t-method").replaceChildren(...info.methods.map((m) => el("option", { value: m, text: m })));
  $("t-method").value = d.method;
  const models = Object.entries(info.models);
  $("train-models").replaceChildren(...models.map(([name, path]) => el("option", { value: name, label: path })));
  if (!$("train-model").value && models.length) $("train-model").value = models[0][0];
  const dirs = info.data_dirs.length ? `Readable folders: ${info.data_dirs.join(", ")}.` : "No --data-dir folder is allowed.";
  $("data-hint").textContent = `${dirs} Uploads up to ${humanBytes(info.max_upload_bytes)}.`;
}

export async function refreshTrain() {
  try {
    if (!state.info) {
      state.info = await apiJSON(`${S}/info`);
      setDefaults(state.info);
    }
    await Promise.all([refreshData(), refreshJobs()]);
  } catch (err) {
    $("train-error").textContent = err.message;
  }
}

// ---- data -------------------------------------------------------------------------------------------------------

async function upload() {
  const file = $("upload-file").files[0];
  $("train-error").textContent = "";
  if (!file) {
    $("train-error").textContent = "Choose a file to upload first.";
    return;
  }
  const name = file.name.replace(/[^A-Za-z0-9._-]/g, "_").replace(/^[.-]+/, "");
  const resp = await apiFetch(`${S}/data/uploads/${encodeURIComponent(name)}`, {
    method: "PUT", headers: { "Content-Type": "application/octet-stream" }, body: file,
  });
  if (!resp.ok) {
    $("train-error").textContent = `Upload failed: ${await errorText(resp)}`;
    return;
  }
  const item = await resp.json();
  await refreshData(dataValue(item));
  if (!$("t-name").value) $("t-name").value = name.replace(/\.[^.]+$/, "").slice(0, 40) || "adapter";
}

function summaryTable(s) {
  const rows = [["format", s.format], ["examples", s.examples], ["sequences", s.sequences], ["tokens", s.tokens],
    ["trained tokens", `${s.trainable_tokens} (${Math.round((100 * s.trainable_tokens) / Math.max(s.tokens, 1))}%)`],
    ["length min / mean / max", `${s.min_length} / ${s.mean_length.toFixed(1)} / ${s.max_length}`],
    [`truncated at ${s.max_allowed}`, s.truncated], ["dropped (nothing to train)", s.dropped]];
  const top = Math.max(1, ...s.histogram.map((b) => b[2]));
  const hist = el("ol", { class: "histogram", "aria-label": "Lengths histogram" },
    ...s.histogram.map(([lo, hi, n]) => el("li", {}, el("span", { text: `${lo}–${hi - 1}` }),
      el("span", { class: "bar", style: `width:${(100 * n) / top}%` }), el("span", { text: String(n) }))));
  return el("div", { class: "summary", testid: "data-summary" },
    el("table", { class: "table" }, el("tbody", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", { scope: "row", text: k }),
      el("td", { text: String(v) }))))), hist,
    ...s.warnings.slice(0, 5).map((w) => el("p", { class: "warning", text: `warning: ${w}` })));
}

function exampleNode(ex) {
  const pre = el("pre", { class: "example", testid: "preview-example" },
    ...ex.segments.map((seg) => (seg.trained ? el("mark", { text: seg.text, title: "trained" }) : document.createTextNode(seg.text))));
  const head = `${ex.source} · ${ex.tokens} tokens, ${ex.trained_tokens} trained${ex.truncated ? " · truncated" : ""}`;
  return el("figure", {}, el("figcaption", { text: head }), pre);
}

async function preview() {
  const panel = document.querySelector("[data-testid=preview-panel]");
  panel.hidden = false;
  const body = $("preview-body");
  body.replaceChildren(el("p", { text: "Reading and tokenizing…" }));
  try {
    const ref = JSON.parse($("train-data").value || "null");
    if (!ref) throw new Error("Choose or upload a dataset first.");
    const out = await apiJSON(`${S}/data/preview`, { method: "POST", json: { ...ref, model: $("train-model").value,
      seq_len: Number($("t-seq").value) || 1024, train_on: $("t-on").value, examples: 3 } });
    if (out.error) {
      body.replaceChildren(el("pre", { class: "error", role: "alert", testid: "preview-error", text: out.error }),
        out.hint ? el("p", { class: "hint", text: out.hint }) : null);
      return;
    }
    body.replaceChildren(summaryTable(out.summary), el("p", { class: "hint", text: "Highlighted text carries the loss." }),
      ...out.examples.map(exampleNode));
  } catch (err) {
    body.replaceChildren(el("p", { class: "error", role: "alert", text: err.message }));
  }
}

// ---- jobs ---------------------------------------------------------------------------------------------------------

async function start(event) {
  event.preventDefault();
  $("train-error").textContent = "";
  const num = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  try {
    const ref = JSON.parse($("train-data").value || "null");
    if (!ref) throw new Error("Choose or upload a dataset first.");
    const method = $("t-method").value;
    const body = { ...ref, model: $("train-model").value, name: $("t-name").value.trim(), method, rank: num("t-rank"),
      alpha: num("t-alpha"), lr: num("t-lr"), epochs: num("t-epochs"), max_steps: num("t-steps"), seq_len: num("t-seq"),
      batch_size: num("t-batch"), grad_accum: num("t-accum"), train_on: $("t-on").value, packing: $("t-packing").checked,
      beta: method === "sft" ? undefined : num("t-beta") };
    const job = await apiJSON(`${S}/jobs/train`, { method: "POST", json: body });
    await refreshJobs();
    watch(job);
  } catch (err) {
    $("train-error").textContent = err.message;
  }
}

function progress(job, last) {
  if (!last) return job.status === "queued" ? "waiting" : "";
  const total = job.max_steps || (last.epoch ? Math.round((last.step / last.epoch) * (job.epochs || 1)) : null);
  let text = `step ${last.step}${total ? ` / ${total}` : ""} · loss ${last.loss.toFixed(4)}`;
  if (total && last.elapsed_s && ACTIVE.includes(job.status) && last.step < total) {
    const eta = ((total - last.step) * last.elapsed_s) / last.step;
    text += ` · ETA ${eta < 90 ? `${Math.round(eta)} s` : `${Math.round(eta / 60)} min`}`;
  }
  return text;
}

async function action(job, verb) {
  try {
    const updated = await apiJSON(`${S}/jobs/${job.id}/${verb}`, { method: "POST" });
    await refreshJobs();
    if (verb === "resume") watch(updated);
  } catch (err) {
    $("train-error").textContent = err.message;
  }
}

async function refreshJobs() {
  const { data } = await apiJSON(`${S}/jobs`);
  $("jobs-body").replaceChildren(...data.map((job) => {
    const buttons = [el("button", { type: "button", class: "link", text: "View", testid: "job-view", onclick: () => watch(job) })];
    if (ACTIVE.includes(job.status)) buttons.push(el("button", { type: "button", class: "link danger-text", text: "Stop",
      testid: "job-stop", onclick: () => action(job, "stop") }));
    if (job.kind === "train" && ["stopped", "failed", "cancelled"].includes(job.status)) buttons.push(el("button",
      { type: "button", class: "link", text: "Resume", testid: "job-resume", onclick: () => action(job, "resume") }));
    const live = state.watching === job.id ? progress(job, state.records[state.records.length - 1]) : "";
    return el("tr", { "data-job": job.id, "data-status": job.status, testid: "job-row" },
      el("td", { text: job.title }), el("td", { class: `status-${job.status}`, text: job.status, testid: "job-status" }),
      el("td", { text: live || (job.error ? job.error.slice(0, 120) : "") }), el("td", {}, ...buttons));
  }));
  clearTimeout(state.timer);
  if (data.some((j) => ACTIVE.includes(j.status)) && !$("view-train").hidden) state.timer = setTimeout(refreshJobs, 3000);
}

function chart(id, label, color) {
  const box = $(id);
  const width = Math.max(240, Math.min(560, box.clientWidth || 480));
  const opts = { width, height: 200, scales: { x: { time: false } }, legend: { show: false },
    series: [{ label: "step" }, { label, stroke: color, width: 2, points: { show: true, size: 4 } }],
    axes: [{ label: "step", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000] },
      { size: 70, values: (u, vals) => vals.map((v) => (v !== 0 && Math.abs(v) < 0.01 ? v.toExponential(1) : String(+v.toPrecision(3)))) }] };
  box.replaceChildren();
  return new window.uPlot(opts, [[], []], box);
}

function drawCharts() {
  const xs = state.records.map((r) => r.step);
  for (const [key, id] of [["loss", "chart-loss"], ["lr", "chart-lr"]]) {
    state.charts[key]?.setData([xs, state.records.map((r) => r[key])]);
    $(id).dataset.points = String(xs.length);
  }
}

function showJob(job) {
  const last = state.records[state.records.length - 1];
  const bits = [`${job.title}: ${job.status}`, progress(job, last)];
  if (job.error) bits.push(job.error);
  if (job.status === "done" && job.output) bits.push(`output: ${job.output}`);
  $("job-summary").textContent = bits.filter(Boolean).join(" · ");
  $("job-summary").dataset.status = job.status;
  const canChat = job.kind !== "export" && job.status === "done" && job.output;
  $("job-chat").hidden = !canChat;
  $("job-chat").dataset.adapter = canChat ? job.output : "";
}

/** Follow a job's events: metrics into the charts, the log, the state; ends when the job does. */
async function watch(job) {
  state.watchCtl?.abort();
  const ctl = new AbortController();
  state.watchCtl = ctl;
  state.watching = job.id;
  state.records = [];
  const detail = document.querySelector("[data-testid=job-detail]");
  detail.hidden = false;
  $("job-heading").textContent = `Job ${job.id}`;
  $("job-log").textContent = "";
  state.charts = { loss: chart("chart-loss", "loss", "#2f6fde"), lr: chart("chart-lr", "learning rate", "#1e9e5a") };
  drawCharts();
  showJob(job);
  try {
    const resp = await apiFetch(`${S}/jobs/${job.id}/events`, { signal: ctl.signal, headers: { Accept: "text/event-stream" } });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const { event, data } of sseEvents(resp.body)) {
      const msg = JSON.parse(data);
      if (event === "metrics") {
        if (msg.reset) state.records = [];
        state.records.push(...msg.records.filter((r) => typeof r.loss === "number"));
        drawCharts();
        showJob(job);
      } else if (event === "log") {
        const log = $("job-log");
        log.textContent = (log.textContent + msg.text).slice(-60000);
        log.scrollTop = log.scrollHeight;
      } else if (event === "job") {
        job = msg;
        showJob(job);
        refreshJobs();
      }
    }
  } catch (err) {
    if (!ctl.signal.aborted) $("job-summary").textContent = `lost the job's events: ${err.message}`;
  }
}

async function chatWithAdapter() {
  const name = $("job-chat").dataset.adapter;
  try {
    await apiJSON(`${S}/adapters/${encodeURIComponent(name)}/load`, { method: "POST" });
    await state.openChat(name);
  } catch (err) {
    $("train-error").textContent = err.message;
  }
}

export function initTrain(openChat) {
  state.openChat = openChat;
  $("upload-btn").addEventListener("click", upload);
  $("preview-btn").addEventListener("click", preview);
  $("train-form").addEventListener("submit", start);
  $("job-chat").addEventListener("click", chatWithAdapter);
}
