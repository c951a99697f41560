// nomoat studio: the pages (chat, train, adapters) over the server's API. Plain ES modules, no build step, no
// external URLs; vendored libraries (marked, DOMPurify, highlight.js, uPlot) are loaded by index.html.
"use strict";

import { $, KEY_STORAGE, setStatus } from "./api.js";
import { initAdapters, refreshAdapters } from "./adapters.js";
import { chatWith, initChat, loadModels } from "./chat.js";
import { initTrain, refreshTrain } from "./train.js";

const VIEWS = { chat: "nomoat playground", train: "nomoat studio · train", adapters: "nomoat studio · adapters" };
let ready = false;

function show(view) {
  if (!VIEWS[view]) view = "chat";
  for (const name of Object.keys(VIEWS)) {
    $(`view-${name}`).hidden = name !== view;
    document.querySelector(`[data-view=${name}]`).setAttribute("aria-current", name === view ? "page" : "false");
  }
  document.title = VIEWS[view];
  if (!ready) return;
  if (view === "train") refreshTrain();
  if (view === "adapters") refreshAdapters();
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

async function connect() {
  setStatus("unknown", "connecting…");
  await waitForHealth();
  if (await loadModels()) {
    ready = true;
    show(location.hash.slice(1));
  }
}

/** Load an adapter into the server and open a chat with it (from the train and adapters pages). */
export async function openChatWith(model) {
  await loadModels();
  location.hash = "#chat";
  chatWith(model);
}

function init() {
  try {
    $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    // storage disabled
  }
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    try {
      localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    } catch {
      // storage disabled: apiFetch falls back to the field's value
    }
    connect();
  });
  initChat();
  initTrain(openChatWith);
  initAdapters(openChatWith);
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  show(location.hash.slice(1));
  connect();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
