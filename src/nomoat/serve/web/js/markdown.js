// Model text as HTML: markdown (marked) with raw HTML escaped, sanitised (DOMPurify), code highlighted (highlight.js),
// and a copy button on every code block. Nothing a model writes can run: HTML in the reply is shown as text, and the
// sanitiser removes anything that could still execute (event handlers, javascript: URLs).
"use strict";

const escapeHtml = (s) =>
  s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

let parser = null;

function markdown() {
  if (parser) return parser;
  parser = new window.marked.Marked({ gfm: true, breaks: true });
  parser.use({ renderer: { html: (token) => escapeHtml(token.text ?? token.raw ?? "") } });
  window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
  return parser;
}

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed", "img"],
  FORBID_ATTR: ["style", "srcset"],
};

/** Render markdown `text` into `node`; with `done`, highlight code and add copy buttons. */
export function renderMarkdown(node, text, done = false) {
  const html = markdown().parse(text);
  node.innerHTML = window.DOMPurify.sanitize(html, PURIFY).trim();
  if (!done) return;
  for (const code of node.querySelectorAll("pre > code")) {
    if (window.hljs) window.hljs.highlightElement(code);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code secondary";
    button.textContent = "Copy";
    button.dataset.testid = "copy-code";
    button.setAttribute("aria-label", "Copy this code");
    button.addEventListener("click", () => copyText(code.textContent, button));
    code.parentElement.before(button);
  }
}

/** Copy to the clipboard (falls back to a hidden textarea where the async clipboard is unavailable). */
export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  if (button) {
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = label), 1200);
  }
}
