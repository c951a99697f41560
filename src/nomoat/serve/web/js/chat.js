// The chat page: one or two panes (side by side compare) streaming from /v1/chat/completions, markdown answers,
// copy, edit-and-regenerate, regenerate, stop, structured output and tools, and conversations kept in this browser.
"use strict";

import { $, apiFetch, download, el, errorText, setStatus, sseEvents } from "./api.js";
import * as store from "./conversations.js";
import { copyText, renderMarkdown } from "./markdown.js";
import { STRUCTURED_IDS, applyFormat, mergeToolCalls, structuredFields, toolCallsNode } from "./structured.js";

const SETTINGS_STORAGE = "nomoat.settings";
const SETTING_IDS = ["temperature", "top-p", "max-tokens", "seed", ...STRUCTURED_IDS];

const state = { ready: false, controllers: new Set(), conv: null };

// ---- models -----------------------------------------------------------------------------------------------------

function isAdapter(m) {
  return Boolean(m.parent) || (m.root && m.root !== m.id) || m.owned_by === "adapter" || m.type === "adapter";
}

function fillSelect(select, groups) {
  const previous = select.value;
  select.replaceChildren();
  for (const [label, ids] of groups) {
    if (!ids.length) continue;
    const g = el("optgroup", { label });
    for (const id of ids) g.append(el("option", { value: id, text: id }));
    select.append(g);
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}

/** Fill the model menus from /v1/models; false when the server wants a key or failed. */
export async function loadModels() {
  const resp = await apiFetch("v1/models");
  if (resp.status === 401 || resp.status === 403) {
    $("key-form").hidden = false;
    setStatus("locked", localStorage.getItem("nomoat.apiKey") ? "the API key was refused" : "this server needs an API key");
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
  const extra = [...$("model-a").querySelectorAll("optgroup[label=Custom] option")].map((o) => o.value);
  const groups = [["Base model", bases], ["Adapters", adapters], ["Custom", extra]];
  fillSelect($("model-a"), groups);
  fillSelect($("model-b"), groups);
  if (!$("model-b").dataset.touched && bases.length + adapters.length > 1) $("model-b").value = adapters[0] || bases[1];
  if (localStorage.getItem("nomoat.apiKey")) $("key-form").hidden = false;
  updatePaneTitles();
  setStatus("ready", `ready · ${bases.length} base, ${adapters.length} adapter${adapters.length === 1 ? "" : "s"}`);
  state.ready = true;
  updateButtons();
  return true;
}

/** Start a new conversation with `model` (e.g. a freshly trained adapter) in pane A. */
export function chatWith(model) {
  newChat();
  if (![...$("model-a").options].some((o) => o.value === model)) addCustomModel(model);
  $("model-a").value = model;
  updatePaneTitles();
}

// ---- panes ------------------------------------------------------------------------------------------------------

const comparing = () => $("compare").checked;
const activePanes = () => (comparing() ? ["a", "b"] : ["a"]);
const messageList = (pane) => $(`pane-${pane}`).querySelector(".messages");

function updatePaneTitles() {
  $("pane-a").querySelector(".pane-model").textContent = $("model-a").value;
  $("pane-b").querySelector(".pane-model").textContent = $("model-b").value;
}

function updateButtons() {
  const busy = state.controllers.size > 0;
  $("send").disabled = busy || !state.ready;
  $("stop").disabled = !busy;
  for (const b of document.querySelectorAll(".msg-actions button[data-needs-idle]")) b.disabled = busy;
}

function messageNode(pane, index, msg) {
  const item = el("li", { class: `msg ${msg.role}`, testid: `${msg.role}-message` });
  const body = el("div", { class: "text", testid: `${msg.role}-text` });
  item.append(el("div", { class: "meta", text: msg.role === "user" ? "you" : msg.model || "" }), body);
  const actions = el("div", { class: "msg-actions" });
  actions.append(el("button", { type: "button", class: "link", text: "Copy", testid: "copy-message",
    "aria-label": "Copy this message", onclick: (e) => copyText(msg.content, e.currentTarget) }));
  if (msg.role === "user") {
    body.textContent = msg.content; // what the user typed is shown as typed, never parsed
    actions.append(el("button", { type: "button", class: "link", text: "Edit", testid: "edit-message",
      "data-needs-idle": true, "aria-label": "Edit this message and regenerate", onclick: () => editTurn(pane, index, item) }));
  } else {
    item.dataset.state = msg.state || "done";
    renderMarkdown(body, msg.content, true);
    if (msg.tool_calls?.length) item.append(toolCallsNode(msg.tool_calls));
    item.append(el("div", { class: "stats", testid: "answer-stats", text: msg.stats || "" }));
    if (msg.error) item.insertBefore(el("div", { class: "error", role: "alert", text: msg.error }), item.lastChild);
    actions.append(el("button", { type: "button", class: "link", text: "Regenerate", testid: "regenerate",
      "data-needs-idle": true, "aria-label": "Regenerate this answer", onclick: () => regenerate(pane, index) }));
  }
  item.append(actions);
  return item;
}

function renderPanes() {
  for (const pane of ["a", "b"]) {
    const list = messageList(pane);
    const msgs = state.conv.panes[pane];
    if (!msgs.length) {
      list.replaceChildren(el("li", { class: "empty", text: pane === "a" ? "Pick a model, write a message, press Enter."
        : "The same prompt goes to both models at once." }));
      continue;
    }
    list.replaceChildren(...msgs.map((m, i) => messageNode(pane, i, m)));
    list.scrollTop = list.scrollHeight;
  }
  updateButtons();
}

function requestBody(model, messages) {
  const body = { model, messages, stream: true, stream_options: { include_usage: true }, ...structuredFields() };
  const num = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  const [temperature, topP, maxTokens, seed] = ["temperature", "top-p", "max-tokens", "seed"].map(num);
  if (temperature !== null) body.temperature = temperature;
  if (topP !== null) body.top_p = topP;
  if (maxTokens !== null) body.max_tokens = Math.round(maxTokens);
  if (seed !== null) body.seed = Math.round(seed);
  return body;
}

function formatStats({ tokens, firstAt, startAt, endAt, finish }) {
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  const decodeS = firstAt === null ? 0 : (endAt - firstAt) / 1000;
  if (tokens > 1 && decodeS > 0) parts.push(`${((tokens - 1) / decodeS).toFixed(1)} tok/s`);
  else if (tokens > 0 && endAt > startAt) parts.push(`${(tokens / ((endAt - startAt) / 1000)).toFixed(1)} tok/s`);
  if (firstAt !== null) parts.push(`first token ${Math.round(firstAt - startAt)} ms`);
  if (finish) parts.push(finish);
  return parts.join(" · ");
}

/** Stream the answer to the pane's history (which ends with a user message) into a new assistant message. */
async function streamAnswer(pane, model) {
  const conv = state.conv;
  const history = conv.panes[pane];
  const system = $("system").value.trim();
  const context = history.filter((m) => !(m.role === "assistant" && m.state === "error"))
    .map((m) => ({ role: m.role, content: m.content }));
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...context];
  const msg = { role: "assistant", content: "", model, state: "streaming" };
  history.push(msg);
  const list = messageList(pane);
  list.querySelector(".empty")?.remove();
  const item = messageNode(pane, history.length - 1, msg);
  item.setAttribute("aria-busy", "true");
  list.append(item);
  list.scrollTop = list.scrollHeight;
  const body = item.querySelector(".text");
  const controller = new AbortController();
  state.controllers.add(controller);
  updateButtons();
  const run = { tokens: 0, startAt: performance.now(), firstAt: null, endAt: null, finish: null };
  let usageTokens = null;
  let outcome = "done";
  let frame = 0;
  try {
    const resp = await apiFetch("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(requestBody(model, messages)), signal: controller.signal,
    });
    if (!resp.ok) {
      if (resp.status === 401 || resp.status === 403) $("key-form").hidden = false;
      throw new Error(await errorText(resp));
    }
    for await (const { data } of sseEvents(resp.body)) {
      if (data === "[DONE]") {
        run.finish ??= "stop";
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage?.completion_tokens != null) usageTokens = chunk.usage.completion_tokens;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      if (choice.delta?.tool_calls) msg.tool_calls = mergeToolCalls(msg.tool_calls || [], choice.delta.tool_calls);
      const piece = choice.delta?.content;
      if (piece) {
        if (run.firstAt === null) run.firstAt = performance.now();
        run.tokens += 1;
        msg.content += piece;
        frame ||= requestAnimationFrame(() => {
          frame = 0;
          const pinned = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
          renderMarkdown(body, msg.content);
          if (pinned) list.scrollTop = list.scrollHeight;
        });
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
      msg.error = err instanceof Error ? err.message : String(err);
    }
  } finally {
    cancelAnimationFrame(frame);
    state.controllers.delete(controller);
    run.endAt = performance.now();
    if (usageTokens !== null) run.tokens = usageTokens;
    msg.state = outcome;
    msg.stats = outcome === "error" && !run.tokens ? "" : formatStats(run);
    const fresh = messageNode(pane, history.indexOf(msg), msg);
    item.replaceWith(fresh);
    store.save(conv);
    renderList();
    updateButtons();
  }
}

async function askAll(text) {
  const conv = state.conv;
  conv.system = $("system").value;
  conv.models = { a: $("model-a").value, b: $("model-b").value, compare: comparing() };
  const panes = activePanes();
  for (const p of panes) {
    conv.panes[p].push({ role: "user", content: text });
    messageList(p).querySelector(".empty")?.remove();
    messageList(p).append(messageNode(p, conv.panes[p].length - 1, conv.panes[p][conv.panes[p].length - 1]));
  }
  store.save(conv);
  // Both answers stream at once: the server batches them on the one base model.
  await Promise.all(panes.map((p) => streamAnswer(p, $(`model-${p}`).value)));
}

async function send(event) {
  event?.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || !state.ready || state.controllers.size) return;
  $("prompt").value = "";
  await askAll(text);
  $("prompt").focus();
}

/** Turn a user message into an editor; saving cuts the conversation there and asks again. */
function editTurn(pane, index, item) {
  if (state.controllers.size) return;
  const original = state.conv.panes[pane][index].content;
  const turn = state.conv.panes[pane].slice(0, index + 1).filter((m) => m.role === "user").length;
  const area = el("textarea", { class: "edit-area", rows: 3, "aria-label": "Edit message", testid: "edit-area" });
  area.value = original;
  const save = el("button", { type: "button", text: "Save and regenerate", testid: "edit-save" });
  const cancel = el("button", { type: "button", class: "secondary", text: "Cancel", testid: "edit-cancel" });
  const form = el("div", { class: "edit-form" }, area, el("div", { class: "row" }, save, cancel));
  item.querySelector(".text").replaceWith(form);
  item.querySelector(".msg-actions").hidden = true;
  area.focus();
  cancel.addEventListener("click", renderPanes);
  area.addEventListener("keydown", (e) => {
    if (e.key === "Escape") renderPanes();
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) save.click();
  });
  save.addEventListener("click", async () => {
    const text = area.value;
    if (!text.trim()) return;
    for (const p of ["a", "b"]) {
      const msgs = state.conv.panes[p];
      let seen = 0;
      const cut = msgs.findIndex((m) => m.role === "user" && ++seen === turn);
      if (cut >= 0) msgs.length = cut;
    }
    renderPanes();
    await askAll(text);
  });
}

async function regenerate(pane, index) {
  if (state.controllers.size) return;
  state.conv.panes[pane].length = index; // drop this answer and everything after it
  renderPanes();
  await streamAnswer(pane, $(`model-${pane}`).value);
}

function stopAll() {
  for (const controller of state.controllers) controller.abort();
}

// ---- conversations ----------------------------------------------------------------------------------------------

function open(conv) {
  stopAll();
  state.conv = conv;
  store.setCurrent(conv.id);
  $("system").value = conv.system || "";
  if (conv.models?.compare !== undefined && conv.models.compare !== comparing()) {
    $("compare").checked = conv.models.compare;
    applyCompare();
  }
  renderPanes();
  renderList();
}

function newChat() {
  const conv = store.newConversation();
  conv.system = $("system").value; // the system prompt carries over to the new conversation
  open(conv);
  store.save(state.conv);
  renderList();
  $("prompt").focus();
}

function renderList() {
  const items = store.conversations().map((conv) => {
    const selected = conv === state.conv;
    return el("li", { class: selected ? "selected" : "", testid: "conv-item" },
      el("button", { type: "button", class: "link conv-title", text: conv.title, testid: "conv-open",
        "aria-current": selected ? "true" : null, onclick: () => open(conv) }),
      el("button", { type: "button", class: "link", text: "Rename", testid: "conv-rename",
        "aria-label": `Rename ${conv.title}`, onclick: () => {
          const title = window.prompt("New name of the conversation", conv.title);
          if (title !== null) store.rename(conv, title);
          renderList();
        } }),
      el("button", { type: "button", class: "link danger-text", text: "Delete", testid: "conv-delete",
        "aria-label": `Delete ${conv.title}`, onclick: () => {
          if (!window.confirm(`Delete the conversation "${conv.title}"?`)) return;
          store.remove(conv);
          if (conv === state.conv) open(store.current());
          renderList();
        } }));
  });
  $("conv-list").replaceChildren(...items);
}

function exportConversations(all) {
  const convs = all ? store.conversations() : [state.conv];
  const stamp = new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-");
  download(all ? `conversations-${stamp}.jsonl` : `conversation-${stamp}.jsonl`, store.toJSONL(convs));
}

// ---- settings -----------------------------------------------------------------------------------------------------

function restoreSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}");
    for (const id of SETTING_IDS) if (typeof saved[id] === "string") $(id).value = saved[id];
  } catch {
    // nothing saved, or storage disabled
  }
}

function saveSettings() {
  try {
    localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(Object.fromEntries(SETTING_IDS.map((id) => [id, $(id).value]))));
  } catch {
    // storage disabled: settings last as long as the page
  }
}

function addCustomModel(value) {
  const id = (value ?? $("custom-model").value).trim();
  if (!id) return;
  for (const select of [$("model-a"), $("model-b")]) {
    if ([...select.options].some((o) => o.value === id)) continue;
    let group = select.querySelector("optgroup[label=Custom]");
    if (!group) select.append((group = el("optgroup", { label: "Custom" })));
    group.append(el("option", { value: id, text: id }));
  }
  if (value === undefined) {
    $(comparing() ? "model-b" : "model-a").value = id;
    $("custom-model").value = "";
  }
  updatePaneTitles();
}

function applyCompare() {
  $("pane-b").hidden = !comparing();
  $("model-b-field").hidden = !comparing();
  $("panes").dataset.compare = String(comparing());
}

export function initChat() {
  restoreSettings();
  open(store.current());
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  $("stop").addEventListener("click", stopAll);
  applyFormat();
  $("response-format").addEventListener("change", applyFormat);
  $("clear").addEventListener("click", newChat);
  $("export-one").addEventListener("click", () => exportConversations(false));
  $("export-all").addEventListener("click", () => exportConversations(true));
  $("compare").addEventListener("change", applyCompare);
  $("model-a").addEventListener("change", updatePaneTitles);
  $("model-b").addEventListener("change", () => {
    $("model-b").dataset.touched = "1";
    updatePaneTitles();
  });
  $("custom-add").addEventListener("click", () => addCustomModel());
  $("custom-model").addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      addCustomModel();
    }
  });
  $("system").addEventListener("change", () => {
    state.conv.system = $("system").value;
    store.save(state.conv);
  });
  for (const id of SETTING_IDS) $(id).addEventListener("change", saveSettings);
}
