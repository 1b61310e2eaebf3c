// Calls to the daemon from the page: JSON requests, NDJSON streams and blob uploads, all
// carrying the API key when the daemon asks for one (kept in sessionStorage: this tab only).

import { sha256Hex } from "./sha256.js";

const KEY = "ocs-api-key";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function getKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

function headers(extra) {
  const h = { ...extra };
  const key = getKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

let asking = null; // one key dialog at a time, shared by every call that got a 401

function askKey(wrong) {
  if (!asking) {
    asking = new Promise((resolve) => {
      const dialog = document.getElementById("key-dialog");
      const input = document.getElementById("key-input");
      const error = document.getElementById("key-error");
      error.hidden = !wrong;
      error.textContent = wrong ? "That key was refused." : "";
      input.value = "";
      dialog.addEventListener(
        "close",
        () => {
          const key = input.value.trim();
          if (key) setKey(key);
          document.getElementById("key-button").hidden = false;
          asking = null;
          resolve(Boolean(key));
        },
        { once: true },
      );
      dialog.showModal();
      input.focus();
    });
  }
  return asking;
}

export function changeKey() {
  return askKey(false);
}

async function messageOf(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error;
    if (typeof error === "string") return error;
    if (error && typeof error.message === "string") return error.message;
    if (typeof body.detail === "string") return body.detail;
  } catch {
    // not JSON
  }
  return text.slice(0, 300) || `${response.status} ${response.statusText}`;
}

// fetch with the key; a 401 asks for the key (once per dialog) and tries again
export async function send(path, init = {}) {
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(path, { ...init, headers: headers(init.headers) });
    if (response.status !== 401 || attempt > 2) return response;
    if (!(await askKey(attempt > 0 || Boolean(getKey())))) return response;
  }
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers = { "Content-Type": "application/json" };
  }
  const response = await send(path, init);
  if (!response.ok) throw new ApiError(response.status, await messageOf(response));
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

// POSTs body and calls onEvent with each NDJSON object as it arrives; an in-band error
// line ({"error": ...}) throws. Resolves with the last object. Abort with signal.
export async function stream(path, body, { signal, onEvent } = {}) {
  const response = await send(path, {
    method: "POST",
    body: JSON.stringify({ ...body, stream: true }),
    headers: { "Content-Type": "application/json" },
    signal,
  });
  if (!response.ok) throw new ApiError(response.status, await messageOf(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let last = null;
  const handle = (line) => {
    if (!line.trim()) return;
    const event = JSON.parse(line);
    if (event.error) throw new ApiError(500, typeof event.error === "string" ? event.error : JSON.stringify(event.error));
    last = event;
    if (onEvent) onEvent(event);
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      handle(buffer.slice(0, newline));
      buffer = buffer.slice(newline + 1);
    }
  }
  handle(buffer + decoder.decode());
  return last;
}

// Uploads a File (or Blob) to /api/blobs under its sha256; returns "sha256:<hex>".
export async function uploadBlob(file, onProgress) {
  const digest = `sha256:${await sha256Hex(file, onProgress)}`;
  const head = await send(`/api/blobs/${digest}`, { method: "HEAD" });
  if (head.ok) return digest;
  const response = await send(`/api/blobs/${digest}`, { method: "POST", body: file });
  if (!response.ok) throw new ApiError(response.status, await messageOf(response));
  return digest;
}
