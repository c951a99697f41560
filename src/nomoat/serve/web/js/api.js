// HTTP helpers shared by the pages: the API key, fetch with it, error text, server-sent events, small DOM helpers.
"use strict";

export const KEY_STORAGE = "nomoat.apiKey";
export const $ = (id) => document.getElementById(id);

export function apiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || $("api-key").value.trim();
  } catch {
    return $("api-key").value.trim(); // storage disabled (private mode): the key field still works for this page
  }
}

export function apiFetch(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return fetch(path, { ...init, headers });
}

/** The server's error message from a failed response: OpenAI's {"error": {"message"}} or FastAPI's {"detail"}. */
export async function errorText(resp) {
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

/** JSON from the API, or an Error carrying the server's message. */
export async function apiJSON(path, init = {}) {
  const opts = { ...init };
  if (opts.json !== undefined) {
    opts.body = JSON.stringify(opts.json);
    opts.headers = { ...(opts.headers || {}), "Content-Type": "application/json" };
    delete opts.json;
  }
  const resp = await apiFetch(path, opts);
  if (!resp.ok) {
    if (resp.status === 401) $("key-form").hidden = false;
    throw new Error(await errorText(resp));
  }
  return resp.json();
}

/** Yield `{event, data}` for each server-sent event of a response body. */
export async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const drain = function* (final) {
    buffer = buffer.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0 || (final && buffer.trim())) {
      const block = end >= 0 ? buffer.slice(0, end) : buffer;
      buffer = end >= 0 ? buffer.slice(end + 2) : "";
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: data.join("\n") };
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

export function setStatus(kind, text) {
  $("status-dot").dataset.state = kind;
  $("status-text").textContent = text;
}

/** An element with text content and attributes (text only: never HTML). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "testid") node.dataset.testid = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function humanBytes(n) {
  if (n == null) return "-";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

/** Save `text` as a file download named `name`. */
export function download(name, text, type = "application/jsonl") {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
