// Conversations kept in this browser (localStorage): list, create, rename, delete, and export as JSONL in the
// `messages` format that `nomoat train` reads.
"use strict";

const STORE = "nomoat.conversations";
const CURRENT = "nomoat.currentConversation";

function read() {
  try {
    const list = JSON.parse(localStorage.getItem(STORE) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

let all = read();

function write() {
  try {
    localStorage.setItem(STORE, JSON.stringify(all));
  } catch {
    // storage full or disabled: conversations last as long as the page
  }
}

export function newConversation() {
  const now = Date.now();
  const conv = { id: `c${now.toString(36)}${Math.random().toString(36).slice(2, 6)}`, title: "New conversation",
    created: now, updated: now, system: "", panes: { a: [], b: [] }, models: {} };
  all.unshift(conv);
  setCurrent(conv.id);
  return conv;
}

export function conversations() {
  return all;
}

export function current() {
  let id = null;
  try {
    id = localStorage.getItem(CURRENT);
  } catch {
    // storage disabled
  }
  return all.find((c) => c.id === id) || all[0] || newConversation();
}

export function setCurrent(id) {
  try {
    localStorage.setItem(CURRENT, id);
  } catch {
    // storage disabled
  }
}

/** Store a changed conversation (its title comes from the first user message until renamed). */
export function save(conv) {
  conv.updated = Date.now();
  if (!conv.renamed) {
    const first = conv.panes.a.find((m) => m.role === "user") || conv.panes.b.find((m) => m.role === "user");
    if (first) conv.title = first.content.replace(/\s+/g, " ").trim().slice(0, 48) || "New conversation";
  }
  if (!all.includes(conv)) all.unshift(conv);
  write();
}

export function rename(conv, title) {
  conv.title = title.trim().slice(0, 120) || conv.title;
  conv.renamed = true;
  write();
}

export function remove(conv) {
  all = all.filter((c) => c !== conv);
  write();
}

/** The training records of one conversation: one `{"messages": [...]}` per pane with at least one answer. */
export function trainingRecords(conv) {
  const out = [];
  for (const pane of ["a", "b"]) {
    const msgs = [];
    for (const m of conv.panes[pane] || []) {
      if (m.role === "assistant" && (m.state === "error" || !m.content)) {
        if (msgs.length && msgs[msgs.length - 1].role === "user") msgs.pop(); // a question without an answer
        continue;
      }
      msgs.push({ role: m.role, content: m.content });
    }
    while (msgs.length && msgs[msgs.length - 1].role !== "assistant") msgs.pop();
    if (!msgs.some((m) => m.role === "assistant")) continue;
    const system = (conv.system || "").trim();
    out.push({ messages: [...(system ? [{ role: "system", content: system }] : []), ...msgs] });
  }
  return out;
}

export function toJSONL(convs) {
  return convs.flatMap(trainingRecords).map((r) => JSON.stringify(r)).join("\n") + "\n";
}
