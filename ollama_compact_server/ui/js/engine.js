// The Engine page: the daemon's /metrics read every few seconds while the page is shown
// (tokens/s, running and waiting requests, KV cache use, resident models and adapters,
// prefix cache, preemptions, finished requests, time to first token), the last five
// minutes drawn as line charts, and the resident models from /api/ps as a table.

import { api, ApiError } from "./api.js";
import { lineChart, multiLineChart } from "./chart.js";
import { buckets, bucketDelta, byLabel, parse, quantile, value } from "./prom.js";
import { clear, el, formatAgo, formatBytes } from "./ui.js";

const INTERVALS = [1, 2, 3, 5, 10]; // seconds
const WINDOW_MS = 5 * 60 * 1000; // what the charts keep

const state = {
  interval: 3,
  paused: false,
  shown: false,
  timer: null,
  generation: 0, // a poll started before the last stop() does not schedule another
  last: null, // the previous scrape: {time, tokens, ttft, itl}
  history: [], // [{time, rate, running, waiting, kv, adapters}]
};

const view = {};

function fmt(v, digits = 1) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Math.abs(v) >= 100 || Number.isInteger(v)) return String(Math.round(v));
  return v.toFixed(digits);
}

function fmtSeconds(v) {
  if (v === null || v === undefined) return "–";
  return v < 1 ? `${Math.round(v * 1000)} ms` : `${v.toFixed(2)} s`;
}

// a y axis from 0 to at least 1 (counts and rates that are all zero still read "1" on top)
function top(values) {
  return Math.max(1, ...values.filter((v) => typeof v === "number" && Number.isFinite(v)));
}

function card(id, title, { chart = true } = {}) {
  const number = el("div", { class: "value", id: `engine-${id}` }, "–");
  const note = el("div", { class: "muted note", id: `engine-${id}-note` });
  const slot = el("div", { class: "chart-slot", id: `engine-${id}-chart` });
  const node = el("section", { class: "card", "aria-labelledby": `engine-${id}-title` }, el("h3", { id: `engine-${id}-title` }, title), number, note, chart ? slot : null);
  view[id] = { number, note, slot };
  return node;
}

export function init(section) {
  const pause = el("button", { type: "button", id: "engine-pause", "aria-pressed": "false", onclick: () => setPaused(!state.paused) }, "Pause");
  const select = el(
    "select",
    { id: "engine-interval", onchange: (e) => setRefresh(Number(e.target.value)) },
    INTERVALS.map((s) => el("option", { value: s, selected: s === state.interval }, `${s} s`)),
  );
  const status = el("span", { class: "muted", id: "engine-status" }, "Not read yet");
  const error = el("p", { class: "error engine-error", id: "engine-error", role: "alert", hidden: true });
  view.pause = pause;
  view.status = status;
  view.error = error;

  const psBody = el("tbody", { id: "engine-ps-body" });
  view.psBody = psBody;
  view.psEmpty = el("p", { class: "muted", id: "engine-ps-empty" }, "No model is loaded.");

  section.append(
    el(
      "div",
      { class: "engine-head" },
      el("h2", {}, "Engine"),
      el("div", { class: "row engine-controls" }, pause, el("label", { class: "inline" }, "Refresh every", select), status),
    ),
    error,
    el(
      "div",
      { class: "cards", id: "engine-charts" },
      card("rate", "Tokens / s"),
      card("running", "Running and waiting"),
      card("kv", "KV cache use"),
      card("adapters", "Resident adapters"),
    ),
    el(
      "div",
      { class: "cards engine-small", id: "engine-figures" },
      card("models", "Resident models", { chart: false }),
      card("tokens", "Tokens generated", { chart: false }),
      card("ttft", "Time to first token (p50)", { chart: false }),
      card("itl", "Between tokens (p50)", { chart: false }),
      card("prefix", "Prefix cache", { chart: false }),
      card("preempt", "Preemptions", { chart: false }),
      card("finished", "Finished requests", { chart: false }),
    ),
    el("h3", { class: "engine-ps-title" }, "Loaded models"),
    el(
      "div",
      { class: "table-wrap" },
      el(
        "table",
        { id: "engine-ps" },
        el("caption", { class: "muted" }, "From /api/ps"),
        el(
          "thead",
          {},
          el("tr", {}, el("th", { scope: "col" }, "Name"), el("th", { scope: "col", class: "num" }, "Memory"), el("th", { scope: "col", class: "num" }, "Context"), el("th", { scope: "col" }, "Expires")),
        ),
        psBody,
      ),
    ),
    view.psEmpty,
  );
  draw();
}

export function show() {
  state.shown = true;
  if (!state.paused) start();
}

export function hide() {
  state.shown = false;
  stop();
}

function start() {
  stop();
  const generation = state.generation;
  const loop = async () => {
    await poll();
    if (generation !== state.generation) return;
    state.timer = setTimeout(loop, state.interval * 1000);
  };
  loop();
}

function stop() {
  state.generation++;
  clearTimeout(state.timer);
  state.timer = null;
}

function setPaused(paused) {
  state.paused = paused;
  view.pause.textContent = paused ? "Resume" : "Pause";
  view.pause.setAttribute("aria-pressed", String(paused));
  if (paused) {
    stop();
    view.status.textContent = "Paused";
  } else if (state.shown) {
    start();
  }
}

function setRefresh(seconds) {
  state.interval = seconds;
  if (state.shown && !state.paused) start();
}

async function poll() {
  const generation = state.generation;
  const [metrics, ps] = await Promise.allSettled([api("/metrics"), api("/api/ps")]);
  if (generation !== state.generation) return; // stopped meanwhile
  const problems = [];
  if (metrics.status === "fulfilled") {
    try {
      record(parse(metrics.value));
    } catch (exc) {
      problems.push(`/metrics: ${exc.message}`);
    }
  } else {
    problems.push(`/metrics: ${metrics.reason.message}`);
  }
  if (ps.status === "fulfilled") showModels(ps.value.models || []);
  else problems.push(`/api/ps: ${ps.reason.message}`);
  const refused = [metrics, ps].some((r) => r.status === "rejected" && r.reason instanceof ApiError && r.reason.status === 401);
  if (problems.length) {
    view.error.hidden = false;
    view.error.textContent = refused ? `The daemon needs a valid key (${problems.join("; ")}). Paused: resume to try again.` : `Could not read the engine's figures (${problems.join("; ")}); trying again every ${state.interval} s.`;
    if (refused) setPaused(true); // do not ask for the key every few seconds
  } else {
    view.error.hidden = true;
    view.error.textContent = "";
  }
  if (!state.paused) {
    const time = new Date().toLocaleTimeString();
    view.status.textContent = problems.length ? `Last try ${time}` : `Updated ${time}`;
  }
}

function record(samples) {
  const now = performance.now();
  const tokens = value(samples, "ocs_generated_tokens_total", {}, null);
  if (tokens === null) throw new Error("no ocs_generated_tokens_total in the answer");
  const ttft = buckets(samples, "ocs_time_to_first_token_seconds");
  const itl = buckets(samples, "ocs_inter_token_latency_seconds");
  const last = state.last;
  let rate = null;
  let ttftNow = null;
  let itlNow = null;
  if (last) {
    const seconds = (now - last.time) / 1000;
    const made = tokens >= last.tokens ? tokens - last.tokens : tokens; // went down: restarted
    rate = seconds > 0 ? made / seconds : null;
    ttftNow = quantile(0.5, bucketDelta(ttft, last.ttft));
    itlNow = quantile(0.5, bucketDelta(itl, last.itl));
  }
  state.last = { time: now, tokens, ttft, itl };

  const used = value(samples, "ocs_kv_cache_used_tokens");
  const free = value(samples, "ocs_kv_cache_free_tokens");
  const kv = used + free > 0 ? (100 * used) / (used + free) : 0;
  if (last && now - last.time > 3 * state.interval * 1000) {
    // not read for a while (paused, another page): a gap in the lines, not a slope
    state.history.push({ time: now, rate: null, running: null, waiting: null, kv: null, adapters: null });
  }
  const point = {
    time: now,
    rate,
    running: value(samples, "ocs_running_sequences"),
    waiting: value(samples, "ocs_queue_length"),
    kv,
    adapters: value(samples, "ocs_resident_adapters"),
  };
  state.history.push(point);
  while (state.history.length && state.history[0].time < now - WINDOW_MS) state.history.shift();

  const finished = byLabel(samples, "ocs_finished_requests_total", "reason");
  const finishedTotal = Object.values(finished).reduce((a, b) => a + b, 0);
  const figures = {
    tokens,
    used,
    free,
    models: value(samples, "ocs_resident_models"),
    prefixHits: value(samples, "ocs_prefix_cache_hits_total"),
    prefixTokens: value(samples, "ocs_prefix_cache_tokens_total"),
    preemptions: value(samples, "ocs_preemptions_total"),
    finished,
    finishedTotal,
    ttftNow,
    ttftAll: quantile(0.5, ttft),
    itlNow,
    itlAll: quantile(0.5, itl),
  };
  draw(figures);
}

function setChart(id, svg) {
  const slot = view[id].slot;
  clear(slot).append(svg);
}

function draw(f) {
  const h = state.history;
  const rates = h.map((p) => p.rate);
  const seen = rates.filter((r) => r !== null);
  const current = h.length ? h[h.length - 1] : null;
  const span = h.length > 1 ? `${Math.round((h[h.length - 1].time - h[0].time) / 1000)} s` : "";
  const xLabel = span ? `last ${span}` : "";

  view.rate.number.textContent = current && current.rate !== null ? fmt(current.rate) : "–";
  view.rate.note.textContent = seen.length ? `peak ${fmt(Math.max(...seen))} tokens/s in the window` : "needs two reads";
  setChart("rate", lineChart(rates, { min: 0, max: top(rates), label: "Tokens per second", format: (v) => fmt(v), xLabel }));

  view.running.number.textContent = current ? `${current.running} / ${current.waiting}` : "–";
  clear(view.running.note).append(el("span", { class: "key running" }, "running"), " / ", el("span", { class: "key waiting" }, "waiting"));
  setChart(
    "running",
    multiLineChart(
      [
        { values: h.map((p) => p.running), className: "running" },
        { values: h.map((p) => p.waiting), className: "waiting" },
      ],
      { min: 0, max: top(h.flatMap((p) => [p.running, p.waiting])), label: "Running and waiting requests", format: (v) => fmt(v, 0), xLabel },
    ),
  );

  view.kv.number.textContent = current ? `${fmt(current.kv)} %` : "–";
  if (f) view.kv.note.textContent = f.used + f.free > 0 ? `${fmt(f.used)} of ${fmt(f.used + f.free)} tokens` : "no KV cache allocated";
  setChart("kv", lineChart(h.map((p) => p.kv), { min: 0, max: 100, label: "KV cache use, percent", format: (v) => `${fmt(v, 0)}%`, xLabel }));

  view.adapters.number.textContent = current ? fmt(current.adapters) : "–";
  view.adapters.note.textContent = "LoRA adapters in device slots";
  const adapters = h.map((p) => p.adapters);
  setChart("adapters", lineChart(adapters, { min: 0, max: top(adapters), label: "Resident adapters", format: (v) => fmt(v, 0), xLabel }));

  if (!f) return;
  view.models.number.textContent = fmt(f.models);
  view.models.note.textContent = "loaded on the device";
  view.tokens.number.textContent = fmt(f.tokens);
  view.tokens.note.textContent = "since the daemon started";
  view.ttft.number.textContent = fmtSeconds(f.ttftNow);
  view.ttft.note.textContent = `last interval; since start ${fmtSeconds(f.ttftAll)}`;
  view.itl.number.textContent = fmtSeconds(f.itlNow);
  view.itl.note.textContent = `last interval; since start ${fmtSeconds(f.itlAll)}`;
  view.prefix.number.textContent = `${fmt(f.prefixTokens)} tokens`;
  view.prefix.note.textContent = `reused by ${fmt(f.prefixHits)} requests`;
  view.preempt.number.textContent = fmt(f.preemptions);
  view.preempt.note.textContent = "sequences put back in the queue";
  view.finished.number.textContent = fmt(f.finishedTotal);
  const reasons = Object.entries(f.finished)
    .filter(([, n]) => n > 0)
    .map(([reason, n]) => `${reason} ${fmt(n)}`);
  view.finished.note.textContent = reasons.length ? reasons.join(" · ") : "none yet";
}

function expires(iso) {
  const time = Date.parse(iso);
  if (Number.isNaN(time)) return "";
  if (time - Date.now() > 10 * 365 * 86400 * 1000) return "never";
  return formatAgo(iso);
}

function showModels(models) {
  const rows = models.map((m) =>
    el(
      "tr",
      {},
      el("td", {}, m.name || m.model || ""),
      el("td", { class: "num" }, formatBytes(m.size)),
      el("td", { class: "num" }, m.context_length ? String(m.context_length) : ""),
      el("td", { title: m.expires_at || "" }, expires(m.expires_at)),
    ),
  );
  clear(view.psBody).append(...rows);
  view.psEmpty.hidden = rows.length > 0;
}
