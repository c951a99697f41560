// Structured output and tools on the chat page: the response_format, tools and tool_choice of a request, checked
// before it is sent, and an answer's tool calls rendered readably.
"use strict";

import { $, el } from "./api.js";

export const STRUCTURED_IDS = ["response-format", "json-schema", "regex", "tools", "tool-choice"];

/** Show the schema or regex field that the chosen response format needs. */
export function applyFormat() {
  const kind = $("response-format").value;
  $("schema-field").hidden = kind !== "json_schema";
  $("regex-field").hidden = kind !== "regex";
}

function fail(message) {
  const box = $("structured-error");
  box.textContent = message;
  box.hidden = false;
  throw new Error(message);
}

function parseJSON(text, what) {
  try {
    return JSON.parse(text);
  } catch (err) {
    return fail(`${what} is not valid JSON: ${err.message}`);
  }
}

/** The tools of a request, the names of the functions among them, refused with a readable message if malformed. */
function readTools() {
  const text = $("tools").value.trim();
  if (!text) return null;
  const tools = parseJSON(text, "Tools");
  if (!Array.isArray(tools) || !tools.length) fail("Tools must be a non-empty JSON array of function definitions.");
  return tools.map((t, i) => {
    const fn = t?.type === "function" ? t.function : t?.name ? t : null; // a bare {name, parameters} is accepted
    if (!fn || typeof fn.name !== "string" || !fn.name) fail(`Tool ${i + 1} has no function name.`);
    return { type: "function", function: fn };
  });
}

/**
 * The request fields of the chosen switches: `{response_format, tools, tool_choice}` (absent when off).
 * Throws an Error (also shown under the switches) when a schema, regex or tool list is malformed.
 */
export function structuredFields() {
  $("structured-error").hidden = true;
  const out = {};
  const kind = $("response-format").value;
  if (kind === "json_object") out.response_format = { type: "json_object" };
  if (kind === "json_schema") {
    const schema = parseJSON($("json-schema").value.trim() || "null", "The JSON schema");
    if (!schema || typeof schema !== "object" || Array.isArray(schema)) fail("The JSON schema must be a JSON object.");
    out.response_format = { type: "json_schema", json_schema: { name: "answer", schema, strict: true } };
  }
  if (kind === "regex") {
    const regex = $("regex").value;
    if (!regex) fail("Write the regex the answer must match.");
    out.response_format = { type: "regex", regex };
  }
  const tools = readTools();
  if (tools) {
    out.tools = tools;
    out.tool_choice = $("tool-choice").value;
    if (!$("parallel-tools").checked) out.parallel_tool_calls = false;
  }
  return out;
}

/** Add a streamed `tool_calls` delta list to `calls` (OpenAI's deltas: index, id, name once, arguments in pieces). */
export function mergeToolCalls(calls, deltas) {
  for (const d of deltas || []) {
    const call = (calls[d.index ?? calls.length] ??= { id: "", type: "function", function: { name: "", arguments: "" } });
    if (d.id) call.id = d.id;
    if (d.function?.name) call.function.name += d.function.name;
    if (d.function?.arguments) call.function.arguments += d.function.arguments;
  }
  return calls;
}

/** A readable block of an answer's tool calls: the function's name and its arguments, pretty-printed when JSON. */
export function toolCallsNode(calls) {
  const list = el("ul", { class: "tool-calls", testid: "tool-calls" });
  for (const call of calls) {
    let args = call.function.arguments;
    try {
      args = JSON.stringify(JSON.parse(args), null, 2);
    } catch {
      // not JSON (an unfinished stream): shown as it came
    }
    list.append(el("li", { class: "tool-call", testid: "tool-call" },
      el("div", { class: "tool-name", testid: "tool-call-name", text: `call ${call.function.name}` }),
      el("pre", { testid: "tool-call-arguments", text: args })));
  }
  return list;
}
