// nomoat playground: a chat page over the server's OpenAI-compatible API. Plain JS, no build step, no external URLs.
// Model text is only ever written with textContent / text nodes, never as HTML.
"use strict";

const KEY_STORAGE = "nomoat.apiKey";
const SETTINGS_STORAGE = "nomoat.settings";
const SETTING_IDS = ["temperature", "top-p", "max-tokens", "seed", "system"];

const $ = (id) => document.getElementById(id);

const state = {
  models: [], // the ids from /v1/models, base first
  ready: false, // models loaded: sending is allowed
  controllers: new Set(), // the AbortControllers of the answers streaming now
  panes: {
    a: { el: null, history: [] },
    b: { el: null, history: [] },
  },
};

// ---- HTTP -----------------------------------------------------------------------------------------------------------

function apiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled (private mode): the key field still works for this page
  }
}

function apiFetch(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  const key = apiKey() || $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return fetch(path, { ...init, headers });
}

/** The server's error message from a failed response: OpenAI's {"error": {"message"}} or FastAPI's {"detail"}. */
async function errorText(resp) {
  let body = "";
  try {
    body = await resp.text();
    const parsed = JSON.parse(body);
    const detail = parsed?.error?.message ?? parsed?.detail ?? parsed?.message;
    if (detail) return `${resp.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`;
  } catch {
    // not JSON: fall through to the raw text
  }
  return `${resp.status} ${resp.statusText}${body ? `: ${body.slice(0, 300)}` : ""}`;
}

/** Yield the `data:` payload of each server-sent event of a response body. */
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const drain = function* (final) {
    buffer = buffer.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0 || (final && buffer.trim())) {
      const block = end >= 0 ? buffer.slice(0, end) : buffer;
      buffer = end >= 0 ? buffer.slice(end + 2) : "";
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      yield* drain(false);
    }
    buffer += decoder.decode();
    yield* drain(true);
  } finally {
    reader.releaseLock();
  }
}

// ---- server status and models ---------------------------------------------------------------------------------------

function setStatus(kind, text) {
  $("status-dot").dataset.state = kind;
  $("status-text").textContent = text;
}

async function waitForHealth() {
  for (;;) {
    try {
      const resp = await fetch("health");
      if (resp.ok) return;
      setStatus("loading", resp.status === 503 ? "loading the model…" : `health: ${resp.status}`);
    } catch {
      setStatus("offline", "server unreachable, retrying…");
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function isAdapter(m) {
  // vLLM marks a LoRA module with `parent` (its base); a stack or adapter name carries no base of its own.
  return Boolean(m.parent) || (m.root && m.root !== m.id) || m.owned_by === "adapter" || m.type === "adapter";
}

function fillSelect(select, bases, adapters, extra) {
  const previous = select.value;
  select.replaceChildren();
  const group = (label, ids) => {
    if (!ids.length) return;
    const g = document.createElement("optgroup");
    g.label = label;
    for (const id of ids) {
      const opt = document.createElement("option");
      opt.value = id;
      opt.textContent = id;
      g.append(opt);
    }
    select.append(g);
  };
  group("Base model", bases);
  group("Adapters", adapters);
  group("Custom", extra);
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}

async function loadModels() {
  const resp = await apiFetch("v1/models");
  if (resp.status === 401 || resp.status === 403) {
    $("key-form").hidden = false;
    setStatus("locked", apiKey() ? "the API key was refused" : "this server needs an API key");
    $("api-key").focus();
    return false;
  }
  if (!resp.ok) {
    setStatus("error", `models: ${await errorText(resp)}`);
    return false;
  }
  const data = (await resp.json()).data || [];
  const bases = data.filter((m) => !isAdapter(m)).map((m) => m.id);
  const adapters = data.filter(isAdapter).map((m) => m.id);
  state.models = [...bases, ...adapters];
  const extra = [...$("model-a").querySelectorAll("optgroup[label=Custom] option")].map((o) => o.value);
  fillSelect($("model-a"), bases, adapters, extra);
  fillSelect($("model-b"), bases, adapters, extra);
  if (!$("model-b").dataset.touched && state.models.length > 1) $("model-b").value = adapters[0] || state.models[1];
  if (apiKey()) $("key-form").hidden = false; // keep the key editable once one is in use
  updatePaneTitles();
  setStatus("ready", `ready · ${bases.length} base, ${adapters.length} adapter${adapters.length === 1 ? "" : "s"}`);
  state.ready = true;
  updateButtons();
  return true;
}

// ---- conversation -------------------------------------------------------------------------------------------------

function comparing() {
  return $("compare").checked;
}

function activePanes() {
  return comparing() ? ["a", "b"] : ["a"];
}

function updatePaneTitles() {
  $("pane-a").querySelector(".pane-model").textContent = $("model-a").value;
  $("pane-b").querySelector(".pane-model").textContent = $("model-b").value;
}

function updateButtons() {
  const busy = state.controllers.size > 0;
  $("send").disabled = busy || !state.ready;
  $("stop").disabled = !busy;
}

function messageList(pane) {
  return state.panes[pane].el.querySelector(".messages");
}

function pinnedToBottom(list) {
  return list.scrollHeight - list.scrollTop - list.clientHeight < 40;
}

function addMessage(pane, role, text, model) {
  const list = messageList(pane);
  list.querySelector(".empty")?.remove();
  const item = document.createElement("li");
  item.className = `msg ${role}`;
  item.dataset.testid = `${role}-message`;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = role === "user" ? "you" : model;
  const body = document.createElement("div");
  body.className = "text";
  body.dataset.testid = `${role}-text`;
  body.append(document.createTextNode(text));
  item.append(meta, body);
  if (role === "assistant") {
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.dataset.testid = "answer-stats";
    item.append(stats);
    item.dataset.state = "streaming";
    item.setAttribute("aria-busy", "true");
  }
  list.append(item);
  list.scrollTop = list.scrollHeight;
  return item;
}

function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

function requestBody(model, messages) {
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = numberField("temperature");
  const topP = numberField("top-p");
  const maxTokens = numberField("max-tokens");
  const seed = numberField("seed");
  if (temperature !== null) body.temperature = temperature;
  if (topP !== null) body.top_p = topP;
  if (maxTokens !== null) body.max_tokens = Math.round(maxTokens);
  if (seed !== null) body.seed = Math.round(seed);
  return body;
}

function formatStats({ tokens, firstAt, startAt, endAt, finish }) {
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  // The decode rate (as `nomoat chat` reports it): tokens after the first over the time after the first.
  const decodeS = firstAt === null ? 0 : (endAt - firstAt) / 1000;
  if (tokens > 1 && decodeS > 0) parts.push(`${((tokens - 1) / decodeS).toFixed(1)} tok/s`);
  else if (tokens > 0 && endAt > startAt) parts.push(`${(tokens / ((endAt - startAt) / 1000)).toFixed(1)} tok/s`);
  if (firstAt !== null) parts.push(`first token ${Math.round(firstAt - startAt)} ms`);
  if (finish) parts.push(finish);
  return parts.join(" · ");
}

/** Stream one answer from `model` into `pane`; the pane's history gets the user message and the answer. */
async function streamAnswer(pane, model, userText) {
  const history = state.panes[pane].history;
  const system = $("system").value.trim();
  history.push({ role: "user", content: userText });
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...history];
  addMessage(pane, "user", userText);
  const item = addMessage(pane, "assistant", "", model);
  const textNode = item.querySelector(".text").firstChild;
  const list = messageList(pane);
  const controller = new AbortController();
  state.controllers.add(controller);
  updateButtons();

  const run = { tokens: 0, startAt: performance.now(), firstAt: null, endAt: null, finish: null };
  let usageTokens = null;
  let outcome = "done";
  try {
    const resp = await apiFetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(requestBody(model, messages)),
      signal: controller.signal,
    });
    if (!resp.ok) {
      if (resp.status === 401 || resp.status === 403) $("key-form").hidden = false;
      throw new Error(await errorText(resp));
    }
    for await (const data of sseData(resp.body)) {
      if (data === "[DONE]") {
        run.finish ??= "stop";
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage?.completion_tokens != null) usageTokens = chunk.usage.completion_tokens;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const piece = choice.delta?.content;
      if (piece) {
        if (run.firstAt === null) run.firstAt = performance.now();
        run.tokens += 1;
        const pinned = pinnedToBottom(list);
        textNode.appendData(piece);
        if (pinned) list.scrollTop = list.scrollHeight;
      }
      if (choice.finish_reason) run.finish = choice.finish_reason;
    }
    if (!run.finish) throw new Error("the server ended the answer early (no finish reason)");
  } catch (err) {
    if (controller.signal.aborted) {
      outcome = "stopped";
      run.finish = "stopped";
    } else {
      outcome = "error";
      const error = document.createElement("div");
      error.className = "error";
      error.setAttribute("role", "alert");
      error.textContent = err instanceof Error ? err.message : String(err);
      item.insertBefore(error, item.querySelector(".stats"));
    }
  } finally {
    state.controllers.delete(controller);
    run.endAt = performance.now();
    if (usageTokens !== null) run.tokens = usageTokens;
    if (outcome === "error" && !textNode.data) history.pop();
    else history.push({ role: "assistant", content: textNode.data });
    item.querySelector(".stats").textContent = outcome === "error" && !run.tokens ? "" : formatStats(run);
    item.dataset.state = outcome;
    item.removeAttribute("aria-busy");
    updateButtons();
  }
}

async function send(event) {
  event?.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || !state.ready || state.controllers.size) return;
  $("prompt").value = "";
  const panes = activePanes();
  // Both answers stream at once: the server batches them on the one base model.
  await Promise.all(panes.map((p) => streamAnswer(p, $(`model-${p}`).value, text)));
  $("prompt").focus();
}

function stopAll() {
  for (const controller of state.controllers) controller.abort();
}

function clearConversation() {
  stopAll();
  for (const pane of ["a", "b"]) {
    state.panes[pane].history = [];
    const list = messageList(pane);
    const empty = document.createElement("li");
    empty.className = "empty";
    empty.textContent = "New conversation.";
    list.replaceChildren(empty);
  }
  $("prompt").focus();
}

// ---- settings -----------------------------------------------------------------------------------------------------

function restoreSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}");
    for (const id of SETTING_IDS) if (typeof saved[id] === "string") $(id).value = saved[id];
    $("api-key").value = apiKey();
  } catch {
    // nothing saved, or storage disabled
  }
}

function saveSettings() {
  try {
    const values = Object.fromEntries(SETTING_IDS.map((id) => [id, $(id).value]));
    localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(values));
  } catch {
    // storage disabled: settings last as long as the page
  }
}

function addCustomModel() {
  const id = $("custom-model").value.trim();
  if (!id) return;
  for (const select of [$("model-a"), $("model-b")]) {
    if (![...select.options].some((o) => o.value === id)) {
      let group = select.querySelector("optgroup[label=Custom]");
      if (!group) {
        group = document.createElement("optgroup");
        group.label = "Custom";
        select.append(group);
      }
      const opt = document.createElement("option");
      opt.value = id;
      opt.textContent = id;
      group.append(opt);
    }
  }
  $(comparing() ? "model-b" : "model-a").value = id;
  $("custom-model").value = "";
  updatePaneTitles();
}

async function connect() {
  setStatus("unknown", "connecting…");
  await waitForHealth();
  await loadModels();
}

function init() {
  state.panes.a.el = $("pane-a");
  state.panes.b.el = $("pane-b");
  restoreSettings();
  updateButtons();

  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  $("stop").addEventListener("click", stopAll);
  $("clear").addEventListener("click", clearConversation);
  $("compare").addEventListener("change", () => {
    $("pane-b").hidden = !comparing();
    $("model-b-field").hidden = !comparing();
    $("panes").dataset.compare = String(comparing());
  });
  $("model-a").addEventListener("change", updatePaneTitles);
  $("model-b").addEventListener("change", () => {
    $("model-b").dataset.touched = "1";
    updatePaneTitles();
  });
  $("custom-add").addEventListener("click", addCustomModel);
  $("custom-model").addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      addCustomModel();
    }
  });
  for (const id of SETTING_IDS) $(id).addEventListener("change", saveSettings);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    try {
      localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    } catch {
      // storage disabled: apiFetch falls back to the field's value
    }
    connect();
  });
  connect();
}

document.addEventListener("DOMContentLoaded", init);
