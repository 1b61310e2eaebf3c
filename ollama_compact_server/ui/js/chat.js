// The Chat page: talk to any model or adapter model through /api/chat, streamed; or send
// the same prompt to two models side by side (base vs adapter, float vs compressed). The
// conversation and the settings stay in this browser (localStorage), the key does not.

import { api, stream } from "./api.js";
import { render } from "./markdown.js";
import { clear, el, toast } from "./ui.js";

const STORE = "ocs-chat";
const KEEP = 200; // messages kept per pane
const OPTIONS = [
  { name: "temperature", step: "0.05", min: 0, max: 2 },
  { name: "top_p", step: "0.05", min: 0, max: 1 },
  { name: "num_predict", step: "1", min: -2 },
  { name: "seed", step: "1" },
];

let state = load();
let models = [];
let running = []; // {controller} of the streams in flight
const panes = []; // {root, select, transcript}
let controls = {};

function load() {
  const fresh = { system: "", options: {}, think: false, compare: false, panes: [{ model: "", messages: [] }, { model: "", messages: [] }] };
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "null");
    if (saved && Array.isArray(saved.panes) && saved.panes.length === 2) return { ...fresh, ...saved };
  } catch {
    // a damaged entry starts over
  }
  return fresh;
}

function save() {
  for (const pane of state.panes) pane.messages = pane.messages.slice(-KEEP);
  try {
    localStorage.setItem(STORE, JSON.stringify(state));
  } catch {
    toast("This browser's storage is full: the conversation is not saved.", "error");
  }
}

function optionInputs() {
  return OPTIONS.map(({ name, ...limits }) => {
    const input = el("input", { type: "number", id: `chat-${name}`, name, placeholder: "default", ...limits });
    if (state.options[name] !== undefined) input.value = state.options[name];
    input.addEventListener("change", () => {
      if (input.value === "") delete state.options[name];
      else state.options[name] = Number(input.value);
      save();
    });
    return el("label", {}, name, input);
  });
}

export function init(section) {
  const system = el("textarea", { id: "chat-system", rows: 4, placeholder: "(the model's own)" });
  system.value = state.system;
  system.addEventListener("change", () => {
    state.system = system.value;
    save();
  });
  const think = el("input", { type: "checkbox", id: "chat-think", checked: state.think });
  think.addEventListener("change", () => {
    state.think = think.checked;
    save();
  });
  const compare = el("input", { type: "checkbox", id: "chat-compare", checked: state.compare });
  compare.addEventListener("change", () => {
    state.compare = compare.checked;
    save();
    layout();
  });
  const fresh = el("button", { type: "button", id: "chat-new", onclick: newChat }, "New chat");
  const settings = el(
    "aside",
    { class: "chat-settings panel", "aria-label": "Chat settings" },
    el("h2", {}, "Chat"),
    el("label", {}, "System prompt", system),
    el("fieldset", {}, el("legend", {}, "Options"), el("div", { class: "grid2" }, optionInputs())),
    el("label", { class: "inline" }, think, "Show thinking (models that think)"),
    el("label", { class: "inline" }, compare, "Compare two models side by side"),
    el("div", { class: "row" }, fresh),
  );
  const box = el("div", { class: "panes", id: "chat-panes" });
  for (let k = 0; k < 2; k++) {
    const select = el("select", { id: `chat-model-${k}`, "aria-label": k ? "Second model" : "Model" });
    select.addEventListener("change", () => {
      state.panes[k].model = select.value;
      save();
    });
    const transcript = el("div", { class: "transcript", id: `chat-transcript-${k}`, "aria-live": "polite" });
    const root = el("div", { class: "pane", id: `chat-pane-${k}` }, el("div", { class: "pane-head" }, select), transcript);
    panes.push({ root, select, transcript });
    box.append(root);
  }
  const input = el("textarea", {
    id: "chat-input",
    rows: 3,
    placeholder: "Message (Enter sends, Shift+Enter starts a new line, Escape stops)",
    "aria-label": "Message",
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    } else if (event.key === "Escape") {
      stopAll();
    }
  });
  const sendButton = el("button", { type: "submit", class: "primary", id: "chat-send" }, "Send");
  const stopButton = el("button", { type: "button", class: "danger", id: "chat-stop", disabled: true, onclick: stopAll }, "Stop");
  const composer = el("form", { class: "composer", onsubmit: (e) => { e.preventDefault(); sendMessage(); } }, input, sendButton, stopButton);
  controls = { input, sendButton, stopButton };
  section.append(el("div", { class: "chat" }, settings, el("div", { class: "chat-main" }, box, composer)));
  layout();
  for (let k = 0; k < 2; k++) redraw(k);
}

export async function show() {
  try {
    const { models: list } = await api("/api/tags");
    models = list.map((m) => m.name).sort();
  } catch (error) {
    toast(`Listing the models failed: ${error.message}`, "error");
    return;
  }
  panes.forEach(({ select }, k) => {
    clear(select);
    if (!models.length) select.append(el("option", { value: "" }, "no models: add one on the Models page"));
    for (const name of models) select.append(el("option", { value: name }, name));
    const wanted = state.panes[k].model;
    select.value = models.includes(wanted) ? wanted : models[Math.min(k, models.length - 1)] || "";
    state.panes[k].model = select.value;
  });
  controls.input.focus();
}

function layout() {
  const box = document.getElementById("chat-panes");
  box.classList.toggle("two", state.compare);
  panes[1].root.hidden = !state.compare;
}

function newChat() {
  stopAll();
  for (const pane of state.panes) pane.messages = [];
  save();
  for (let k = 0; k < 2; k++) redraw(k);
  controls.input.focus();
}

function messageNode(message) {
  const who = message.role === "user" ? "You" : message.model || "assistant";
  const body = el("div", { class: "body" });
  const root = el("div", { class: `msg ${message.role}${message.error ? " failed" : ""}` }, el("div", { class: "who" }, who));
  if (message.thinking) {
    root.append(el("details", { class: "thinking" }, el("summary", {}, "Thinking"), el("div", {}, message.thinking)));
  }
  if (message.role === "user") body.textContent = message.content;
  else if (message.error) body.textContent = message.error;
  else body.append(render(message.content));
  root.append(body);
  if (message.stats) root.append(el("div", { class: "stats" }, message.stats));
  return root;
}

function redraw(k) {
  const { transcript } = panes[k];
  clear(transcript);
  for (const message of state.panes[k].messages) transcript.append(messageNode(message));
  transcript.scrollTop = transcript.scrollHeight;
}

function statsOf(last, stopped) {
  if (stopped) return "stopped";
  if (!last || !last.done) return "";
  const parts = [];
  if (last.eval_count) parts.push(`${last.eval_count} tokens`);
  if (last.eval_count && last.eval_duration) parts.push(`${(last.eval_count / (last.eval_duration / 1e9)).toFixed(1)} tokens/s`);
  if (last.done_reason && last.done_reason !== "stop") parts.push(`ended: ${last.done_reason}`);
  return parts.join(" · ");
}

async function ask(k, controller) {
  const pane = state.panes[k];
  const model = pane.model;
  const history = pane.messages.filter((m) => !m.error && m.content !== undefined).map((m) => ({ role: m.role, content: m.content }));
  const messages = state.system.trim() ? [{ role: "system", content: state.system }, ...history] : history;
  const reply = { role: "assistant", model, content: "", thinking: "" };
  pane.messages.push(reply);
  const { transcript } = panes[k];
  let node = messageNode(reply);
  node.querySelector(".body").classList.add("cursor");
  transcript.append(node);
  let pending = false;
  const paint = () => {
    pending = false;
    const next = messageNode(reply);
    next.querySelector(".body").classList.add("cursor");
    const open = node.querySelector("details.thinking");
    if (open && open.open && next.querySelector("details.thinking")) next.querySelector("details.thinking").open = true;
    node.replaceWith(next);
    node = next;
    const near = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 80;
    if (near) transcript.scrollTop = transcript.scrollHeight;
  };
  const body = { model, messages, options: { ...state.options } };
  if (state.think) body.think = true;
  let last = null;
  try {
    last = await stream("/api/chat", body, {
      signal: controller.signal,
      onEvent: (event) => {
        const delta = event.message || {};
        if (delta.content) reply.content += delta.content;
        if (delta.thinking) reply.thinking += delta.thinking;
        if (!pending) {
          pending = true;
          requestAnimationFrame(paint);
        }
      },
    });
    reply.stats = statsOf(last, false);
  } catch (error) {
    if (controller.signal.aborted) reply.stats = "stopped";
    else reply.error = `${model}: ${error.message}`;
  }
  if (!reply.thinking) delete reply.thinking;
  const done = messageNode(reply);
  node.replaceWith(done);
  transcript.scrollTop = transcript.scrollHeight;
}

async function sendMessage() {
  const text = controls.input.value.trim();
  if (!text || running.length) return;
  const active = state.compare ? [0, 1] : [0];
  for (const k of active) {
    if (!state.panes[k].model) {
      toast("Pick a model first.", "error");
      return;
    }
  }
  controls.input.value = "";
  controls.sendButton.disabled = true;
  controls.stopButton.disabled = false;
  const jobs = active.map((k) => {
    state.panes[k].messages.push({ role: "user", content: text });
    panes[k].transcript.append(messageNode({ role: "user", content: text }));
    const controller = new AbortController();
    running.push(controller);
    return ask(k, controller);
  });
  save();
  await Promise.allSettled(jobs);
  running = [];
  save();
  controls.sendButton.disabled = false;
  controls.stopButton.disabled = true;
  controls.input.focus();
}

function stopAll() {
  for (const controller of running) controller.abort();
}
