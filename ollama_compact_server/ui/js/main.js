// The page's shell: one section per page, chosen by the URL's hash (#/chat, #/models,
// #/engine); each page module builds its section once and is told when it shows or hides.

import { api, changeKey, getKey } from "./api.js";
import * as chat from "./chat.js";
import * as engine from "./engine.js";
import * as models from "./models.js";

const PAGES = { chat, models, engine };
const built = new Set();
let current = null;

function route() {
  const name = (location.hash.match(/^#\/(\w+)/) || [])[1];
  const page = PAGES[name] ? name : "chat";
  if (page === current) return;
  if (current && PAGES[current].hide) PAGES[current].hide();
  current = page;
  for (const key of Object.keys(PAGES)) {
    document.getElementById(`page-${key}`).hidden = key !== page;
    const link = document.querySelector(`nav a[data-page="${key}"]`);
    if (key === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const section = document.getElementById(`page-${page}`);
  if (!built.has(page)) {
    built.add(page);
    PAGES[page].init(section);
  }
  if (PAGES[page].show) PAGES[page].show();
}

async function start() {
  const button = document.getElementById("key-button");
  button.hidden = !getKey();
  button.addEventListener("click", () => changeKey());
  window.addEventListener("hashchange", route);
  route();
  try {
    const { version, server } = await api("/api/version");
    document.getElementById("version").textContent = server || version;
  } catch {
    // shown by the page that needs the daemon
  }
}

start();
