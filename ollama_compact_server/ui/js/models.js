// The Models page: the registry as a table (resident models marked from /api/ps), the
// selected model's details and quality report, its actions (load, unload, copy, delete),
// and the jobs that make models (create from a Modelfile text, upload a PEFT adapter
// folder, compress, pull, fine-tune), each with a live progress bar from its status lines.

import { api, stream, uploadBlob } from "./api.js";
import { bars, lineChart } from "./chart.js";
import { clear, confirmDialog, el, formatAgo, formatBytes, progressBar, toast } from "./ui.js";

const state = {
  models: [], // /api/tags entries
  resident: new Map(), // name -> /api/ps entry
  selected: null, // a model name
  schemes: null, // /ui/api/schemes
  generation: 0, // drops the answer of a refresh overtaken by a newer one
};
const dom = {};
const pickers = []; // <select>s of model names, refilled on refresh

// the files of a PEFT adapter folder that an adapter model holds (registry/importers.py)
const ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"];
const FOREVER_MS = 50 * 365 * 86400 * 1000; // /api/ps says "in 100 years" for keep_alive -1

export function init(section) {
  dom.refresh = el("button", { type: "button", id: "models-refresh", onclick: () => refresh() }, "Refresh");
  dom.status = el("span", { class: "muted", id: "models-status", role: "status" });
  dom.body = el("tbody");
  const head = el(
    "tr",
    {},
    ["Name", "Family", "Parameters", "Size", "Quantization", "Parent", "Modified", "Loaded"].map((h) =>
      el("th", { scope: "col", class: h === "Size" ? "num" : undefined }, h),
    ),
  );
  dom.table = el("table", { id: "models-table" }, el("caption", { class: "visually-hidden" }, "Models in the registry"), el("thead", {}, head), dom.body);
  dom.details = el("section", { id: "model-details", class: "panel model-details", "aria-label": "Model details", hidden: true });
  section.append(
    el(
      "div",
      { class: "models" },
      el("div", { class: "models-head row" }, el("h2", {}, "Models"), dom.refresh, dom.status),
      el("div", { class: "table-wrap" }, dom.table),
      dom.details,
      el("h2", { class: "models-tools-title" }, "Make a model"),
      el("div", { class: "models-tools" }, createForm(), adapterForm(), compressForm(), pullForm(), finetuneForm()),
    ),
  );
  loadSchemes();
}

export function show() {
  refresh();
  if (!state.schemes) loadSchemes();
}

// ------------------------------------------------------------------------------ table

async function refresh() {
  const generation = ++state.generation;
  dom.refresh.disabled = true;
  dom.status.classList.remove("error");
  dom.status.textContent = "Loading…";
  try {
    const [tags, ps] = await Promise.all([api("/api/tags"), api("/api/ps")]);
    if (generation !== state.generation) return;
    state.models = tags.models || [];
    state.resident = new Map((ps.models || []).map((m) => [m.name, m]));
    renderTable();
    fillPickers();
    const loaded = state.resident.size;
    dom.status.textContent = `${state.models.length} model${state.models.length === 1 ? "" : "s"}, ${loaded} loaded`;
    if (state.selected && !state.models.some((m) => m.name === state.selected)) selectModel(null);
    else if (state.selected) renderResidency();
  } catch (error) {
    if (generation !== state.generation) return;
    dom.status.classList.add("error");
    dom.status.textContent = `Could not list the models: ${error.message}`;
  } finally {
    if (generation === state.generation) dom.refresh.disabled = false;
  }
}

function residentBadge(entry) {
  const until = Date.parse(entry.expires_at);
  const expiry = until - Date.now() > FOREVER_MS ? "kept loaded" : `expires ${formatAgo(entry.expires_at)}`;
  const where = entry.size_vram ? "GPU" : "memory";
  return el("span", { class: "badge resident", title: `resident in ${where}` }, `${formatBytes(entry.size)} · ${expiry}`);
}

function renderTable() {
  clear(dom.body);
  if (!state.models.length) {
    dom.body.append(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No models yet: pull, create or upload one below.")));
    return;
  }
  for (const model of state.models) {
    const d = model.details || {};
    const selected = model.name === state.selected;
    const resident = state.resident.get(model.name);
    const row = el(
      "tr",
      { class: selected ? "selected" : undefined, dataset: { model: model.name } },
      el(
        "th",
        { scope: "row" },
        el("button", { type: "button", class: "link", "aria-pressed": selected ? "true" : "false", onclick: () => selectModel(model.name) }, model.name),
      ),
      el("td", { "data-label": "Family" }, d.family || ""),
      el("td", { "data-label": "Parameters" }, d.parameter_size || ""),
      el("td", { class: "num", "data-label": "Size" }, formatBytes(model.size)),
      el("td", { "data-label": "Quantization" }, d.quantization_level || ""),
      el("td", { class: "parent", "data-label": "Parent" }, d.parent_model || ""),
      el("td", { "data-label": "Modified", title: model.modified_at || "" }, formatAgo(model.modified_at)),
      el("td", { class: "loaded", "data-label": "Loaded" }, resident ? residentBadge(resident) : ""),
    );
    dom.body.append(row);
  }
}

function fillPickers() {
  const names = state.models.map((m) => m.name);
  for (const select of pickers) {
    const previous = select.value;
    clear(select);
    select.append(el("option", { value: "" }, names.length ? "— pick a model —" : "— no models —"));
    for (const name of names) select.append(el("option", { value: name }, name));
    if (names.includes(previous)) select.value = previous;
    else if (select.dataset.prefer && names.includes(select.dataset.prefer)) select.value = select.dataset.prefer;
    select.dispatchEvent(new Event("change"));
  }
}

function modelPicker(id, label) {
  const select = el("select", { id, required: true }, el("option", { value: "" }, "— loading —"));
  pickers.push(select);
  return [select, el("label", {}, label, select)];
}

// ------------------------------------------------------------------------------ details

let showing = 0; // drops a /api/show answer for a model no longer selected

async function selectModel(name) {
  state.selected = name;
  for (const row of dom.body.querySelectorAll("tr[data-model]")) {
    const on = row.dataset.model === name;
    row.classList.toggle("selected", on);
    row.querySelector("button").setAttribute("aria-pressed", on ? "true" : "false");
  }
  const ticket = ++showing;
  clear(dom.details);
  dom.details.hidden = !name;
  if (!name) return;
  dom.details.append(el("h3", {}, name), el("p", { class: "muted" }, "Loading details…"));
  try {
    const info = await api("/api/show", { method: "POST", body: { model: name } });
    if (ticket !== showing) return;
    await renderDetails(name, info, ticket);
  } catch (error) {
    if (ticket !== showing) return;
    clear(dom.details);
    dom.details.append(el("h3", {}, name), el("p", { class: "error", role: "alert" }, `Could not show ${name}: ${error.message}`));
  }
}

function actions(name) {
  const copyName = el("input", { id: "copy-name", type: "text", placeholder: `${name.split(":")[0]}-copy`, autocomplete: "off" });
  const busy = (button, work) => async () => {
    button.disabled = true;
    try {
      await work();
    } catch (error) {
      toast(error.message, "error");
    } finally {
      button.disabled = false;
    }
  };
  const load = el("button", { type: "button", id: "model-load" }, "Load");
  load.addEventListener(
    "click",
    busy(load, async () => {
      await api("/api/generate", { method: "POST", body: { model: name, prompt: "", keep_alive: "5m", stream: false } });
      toast(`${name} loaded`);
      await refresh();
    }),
  );
  const unload = el("button", { type: "button", id: "model-unload" }, "Unload");
  unload.addEventListener(
    "click",
    busy(unload, async () => {
      await api("/api/generate", { method: "POST", body: { model: name, prompt: "", keep_alive: 0, stream: false } });
      toast(`${name} unloaded`);
      await refresh();
    }),
  );
  const copy = el("button", { type: "submit", id: "model-copy" }, "Copy");
  const copyForm = el("form", { class: "row copy-form" }, el("label", {}, "Copy as", copyName), copy);
  copyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    busy(copy, async () => {
      const destination = copyName.value.trim();
      if (!destination) throw new Error("Name the copy first.");
      await api("/api/copy", { method: "POST", body: { source: name, destination } });
      toast(`${name} copied to ${destination}`);
      copyName.value = "";
      await refresh();
    })();
  });
  const remove = el("button", { type: "button", class: "danger", id: "model-delete" }, "Delete");
  remove.addEventListener(
    "click",
    busy(remove, async () => {
      if (!(await confirmDialog(`Delete ${name}? Its files go unless another model shares them.`))) return;
      await api("/api/delete", { method: "DELETE", body: { model: name } });
      toast(`${name} deleted`);
      if (state.selected === name) selectModel(null);
      await refresh();
    }),
  );
  return el("div", { class: "row model-actions" }, load, unload, remove, copyForm);
}

function renderResidency() {
  const box = document.getElementById("model-residency");
  if (!box || !state.selected) return;
  clear(box);
  const entry = state.resident.get(state.selected);
  box.append(entry ? residentBadge(entry) : el("span", { class: "muted" }, "not loaded"));
  const load = document.getElementById("model-load");
  const unload = document.getElementById("model-unload");
  if (load) load.hidden = Boolean(entry);
  if (unload) unload.hidden = !entry;
}

function dl(pairs) {
  const list = el("dl", { class: "facts" });
  for (const [key, value] of pairs) {
    if (value === undefined || value === null || value === "" || (Array.isArray(value) && !value.length)) continue;
    list.append(el("dt", {}, key), el("dd", {}, Array.isArray(value) ? value.join(", ") : String(value)));
  }
  return list;
}

function folded(title, text) {
  if (!text) return null;
  return el("details", { class: "folded" }, el("summary", {}, title), el("pre", {}, text));
}

// the loss chart's y axis starts a little under the lowest loss (a curve, not a flat line)
function lossFloor(losses) {
  const finite = losses.filter((v) => Number.isFinite(v));
  if (!finite.length) return 0;
  const low = Math.min(...finite);
  const high = Math.max(...finite);
  return Math.max(0, low - Math.max(high - low, Math.abs(low) * 0.02) * 0.2);
}

const fixed = (digits) => (v) => (typeof v === "number" ? v.toFixed(digits) : "");
const percent = (v) => `${v > 0 ? "+" : ""}${(100 * v).toFixed(1)}%`;

function evalOf(info) {
  const out = {};
  for (const [key, value] of Object.entries(info || {})) {
    if (key.startsWith("ocs.eval.")) out[key.slice(9)] = value;
  }
  return Object.keys(out).length ? out : null;
}

async function qualityReport(name, info, ticket) {
  const report = evalOf(info);
  if (!report) return null;
  const parentName = report.parent_model;
  let parent = null;
  if (parentName) {
    try {
      parent = evalOf((await api("/api/show", { method: "POST", body: { model: parentName } })).model_info);
    } catch {
      parent = null; // the parent was deleted: its perplexity is still in this report
    }
  }
  if (ticket !== showing) return null;
  const metric = (title, key, format, ours = report[key], theirs = parent ? parent[key] : undefined) => {
    if (typeof ours !== "number") return null;
    const rows = [{ name, value: ours }];
    if (typeof theirs === "number") rows.push({ name: parentName, value: theirs, parent: true });
    return el("div", { class: "metric" }, el("h5", {}, title), bars(rows, { format }));
  };
  const change = typeof report.perplexity_change === "number" ? ` (${percent(report.perplexity_change)} vs ${parentName})` : "";
  return el(
    "section",
    { class: "quality", "aria-label": "Quality report" },
    el("h4", {}, "Quality report"),
    el("p", { class: "muted" }, `Perplexity ${fixed(3)(report.perplexity)}${change} on ${report.text || "held-out text"}, measured ${formatAgo(report.measured_at)}${report.device ? ` on ${report.device}` : ""}.`),
    el(
      "div",
      { class: "metrics" },
      metric("Perplexity (lower is better)", "perplexity", fixed(3), report.perplexity, report.parent_perplexity),
      metric("Size", "size_bytes", formatBytes),
      metric("Tokens/s, 1 stream", "tokens_per_second_1", fixed(1)),
      metric("Tokens/s, 16 streams", "tokens_per_second_16", fixed(1)),
    ),
  );
}

function trainingReport(report) {
  if (!report || typeof report !== "object") return null;
  const curve = Array.isArray(report.loss_curve) ? report.loss_curve.filter((p) => Array.isArray(p)) : [];
  const lastStep = curve.length ? curve[curve.length - 1][0] : report.steps;
  const summary = `${report.method || "?"} on ${report.base_model || "?"}${report.base_quantization ? ` (${report.base_quantization})` : ""}: ${report.steps} steps, ${report.epochs} epochs, ${report.train_tokens} tokens at ${report.tokens_per_second} tokens/s`;
  const parts = [el("h4", {}, "Fine-tuning report"), el("p", { class: "muted" }, summary)];
  if (report.data && report.data.name) parts.push(el("p", { class: "muted" }, `Data: ${report.data.name} (${report.data.format || "?"}, ${report.examples} examples)`));
  if (curve.length) {
    const losses = curve.map((p) => p[1]);
    parts.push(el("h5", {}, "Training loss"), lineChart(losses, { label: "training loss", format: fixed(2), xLabel: `step ${lastStep}`, min: lossFloor(losses) }));
  }
  if (typeof report.perplexity_base === "number" && typeof report.perplexity_adapter === "number") {
    parts.push(
      el("h5", {}, `Held-out perplexity (${percent(report.perplexity_change)})`),
      bars(
        [
          { name: "adapter", value: report.perplexity_adapter },
          { name: report.base_model || "base", value: report.perplexity_base, parent: true },
        ],
        { format: fixed(3) },
      ),
    );
  }
  return el("section", { class: "training", "aria-label": "Fine-tuning report" }, ...parts);
}

async function renderDetails(name, info, ticket) {
  const d = info.details || {};
  const mi = info.model_info || {};
  const arch = mi["general.architecture"];
  const quality = await qualityReport(name, mi, ticket);
  if (ticket !== showing) return;
  clear(dom.details);
  const caps = el("ul", { class: "caps", "aria-label": "Capabilities" }, (info.capabilities || []).map((c) => el("li", { class: "badge" }, c)));
  const parts = [
    el("div", { class: "row details-head" }, el("h3", {}, name), el("span", { id: "model-residency" })),
    caps,
    actions(name),
    el(
      "div",
      { class: "details-grid" },
      dl([
        ["Family", d.families && d.families.length > 1 ? d.families : d.family],
        ["Format", d.format],
        ["Parameters", d.parameter_size],
        ["Quantization", d.quantization_level],
        ["Parent", d.parent_model],
        ["Context length", arch ? mi[`${arch}.context_length`] : undefined],
        ["Layers", arch ? mi[`${arch}.block_count`] : undefined],
        ["Modified", info.modified_at ? `${formatAgo(info.modified_at)} (${info.modified_at})` : ""],
      ]),
      info.parameters ? el("div", {}, el("h4", {}, "Parameters"), el("pre", { class: "params" }, info.parameters)) : null,
    ),
    quality,
    trainingReport(info.training),
    folded("System prompt", info.system),
    folded("Template", info.template),
    folded("License", Array.isArray(info.license) ? info.license.join("\n\n") : info.license),
    folded("Modelfile", info.modelfile),
  ];
  dom.details.append(...parts.filter(Boolean)); // (append writes null as "null")
  renderResidency();
}

// ------------------------------------------------------------------------------ jobs

// A job's progress bar in `box` (newest first); `work(bar, signal)` runs it. Errors show on
// the bar and in a toast; success refreshes the table. Resolves true on success.
async function job(box, title, work, { stoppable = false } = {}) {
  const bar = progressBar(title);
  const controller = new AbortController();
  let stop = null;
  if (stoppable) {
    stop = el("button", { type: "button", class: "small danger job-stop", onclick: () => controller.abort() }, "Stop");
    bar.node.append(stop);
  }
  box.prepend(bar.node);
  try {
    await work(bar, controller.signal);
    bar.done(true, "success");
    toast(`${title}: done`);
    await refresh();
    return true;
  } catch (error) {
    const message = error.name === "AbortError" ? "stopped" : error.message;
    bar.done(false, `failed: ${message}`);
    toast(`${title} failed: ${message}`, "error");
    return false;
  } finally {
    if (stop) stop.remove();
  }
}

async function streamInto(bar, path, body, signal, onEvent) {
  const last = await stream(path, body, {
    signal,
    onEvent: (event) => {
      bar.update(onEvent ? onEvent(event) || event : event);
    },
  });
  if (!last || last.status !== "success") throw new Error("the job ended before it reported success");
  return last;
}

async function upload(bar, file, what) {
  const digest = await uploadBlob(file, (done, total) => bar.update({ status: `hashing ${what}`, completed: done, total }));
  bar.update({ status: `uploaded ${what}`, completed: 1, total: 1 });
  return digest;
}

// A form with an error line and a job area; `submit(form)` returns after validating and
// running its job; its thrown Errors become the form's error line.
function toolForm(id, title, fields, submitText, submit) {
  const error = el("p", { class: "error form-error", role: "alert", hidden: true });
  const button = el("button", { type: "submit", class: "primary" }, submitText);
  const jobs = el("div", { class: "jobs", "aria-live": "polite" });
  const form = el("form", { id, class: "panel tool", novalidate: true }, el("h3", {}, title), ...fields, el("div", { class: "row" }, button), error, jobs);
  const fail = (message) => {
    error.textContent = message;
    error.hidden = !message;
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    fail("");
    button.disabled = true;
    try {
      await submit({ jobs, fail });
    } catch (e) {
      fail(e.message);
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

function needName(input, what = "the new model") {
  const name = input.value.trim();
  if (!name) {
    input.focus();
    throw new Error(`Give ${what} a name.`);
  }
  if (/\s/.test(name)) {
    input.focus();
    throw new Error(`A model name has no spaces: "${name}".`);
  }
  return name;
}

function needModel(select, what) {
  if (!select.value) {
    select.focus();
    throw new Error(`Pick ${what}.`);
  }
  return select.value;
}

// ------------------------------------------------------------------------------ create

function createForm() {
  const name = el("input", { id: "create-name", type: "text", autocomplete: "off", placeholder: "my-model" });
  const text = el("textarea", { id: "create-modelfile", rows: 6, spellcheck: "false", placeholder: 'FROM tiny\nPARAMETER temperature 0.2\nSYSTEM """You are brief."""' });
  return toolForm(
    "create-form",
    "Create from a Modelfile",
    [el("label", {}, "New model name", name), el("label", {}, "Modelfile", text), el("p", { class: "muted hint" }, "FROM names a model here; adapters are uploaded below.")],
    "Create",
    async ({ jobs }) => {
      const model = needName(name);
      if (!text.value.trim()) {
        text.focus();
        throw new Error("Write a Modelfile (at least a FROM line).");
      }
      let body;
      try {
        body = await api("/ui/api/modelfile", { method: "POST", body: { modelfile: text.value } });
      } catch (error) {
        text.focus();
        throw error;
      }
      await job(jobs, `Create ${model}`, (bar, signal) => streamInto(bar, "/api/create", { model, ...body }, signal));
    },
  );
}

// ------------------------------------------------------------------------------ adapter upload

function adapterForm() {
  const name = el("input", { id: "adapter-name", type: "text", autocomplete: "off", placeholder: "my-adapter" });
  const [base, baseLabel] = modelPicker("adapter-base", "Base model");
  const folder = el("input", { id: "adapter-folder", type: "file", webkitdirectory: true, multiple: true });
  const files = el("input", { id: "adapter-files", type: "file", multiple: true, accept: ".json,.safetensors" });
  const picked = el("p", { class: "muted picked", id: "adapter-picked" }, "No folder picked.");
  let chosen = []; // File objects of the last pick
  const pick = (input) => () => {
    chosen = Array.from(input.files || []);
    const found = adapterFiles(chosen);
    clear(picked);
    if (!chosen.length) {
      picked.textContent = "No folder picked.";
      return;
    }
    picked.textContent = found.error || `Will upload ${found.files.map((f) => `${f.name} (${formatBytes(f.size)})`).join(", ")}`;
    picked.classList.toggle("error", Boolean(found.error));
    const folderName = found.folder;
    if (folderName && !name.value.trim()) name.value = folderName.toLowerCase().replace(/[^a-z0-9._-]+/g, "-");
  };
  folder.addEventListener("change", pick(folder));
  files.addEventListener("change", pick(files));
  return toolForm(
    "adapter-form",
    "Upload a PEFT adapter",
    [
      el("label", {}, "Adapter folder", folder),
      el("label", {}, "…or its files (adapter_config.json and adapter_model.safetensors)", files),
      picked,
      baseLabel,
      el("label", {}, "New model name", name),
    ],
    "Upload and create",
    async ({ jobs }) => {
      const found = adapterFiles(chosen);
      if (!chosen.length) throw new Error("Pick the adapter folder (or its two files) first.");
      if (found.error) throw new Error(found.error);
      const from = needModel(base, "the base model the adapter was trained on");
      const model = needName(name);
      await job(jobs, `Adapter ${model}`, async (bar, signal) => {
        const adapters = {};
        for (const file of found.files) adapters[file.name] = await upload(bar, file, file.name);
        await streamInto(bar, "/api/create", { model, from, adapters }, signal);
      });
    },
  );
}

// The two files an adapter model needs, from a folder pick (the shallowest of each name,
// in case the folder holds checkpoints) or a plain pick; {files, folder} or {error}.
function adapterFiles(list) {
  const depth = (f) => (f.webkitRelativePath || f.name).split("/").length;
  const best = {};
  for (const file of list) {
    if (ADAPTER_FILES.includes(file.name) && (!best[file.name] || depth(file) < depth(best[file.name]))) best[file.name] = file;
  }
  const config = best["adapter_config.json"];
  const weights = best["adapter_model.safetensors"];
  if (!weights) {
    if (list.some((f) => /\.(bin|pt|pth|ckpt|pkl)$/i.test(f.name))) {
      return { error: "This adapter is a pickle file (adapter_model.bin): save it as safetensors (peft's save_pretrained(..., safe_serialization=True)) and pick it again." };
    }
    return { error: "adapter_model.safetensors is missing from what you picked." };
  }
  if (!config) return { error: "adapter_config.json is missing from what you picked." };
  const path = config.webkitRelativePath || "";
  const parts = path.split("/");
  return { files: [config, weights], folder: parts.length > 1 ? parts[parts.length - 2] : "" };
}

// ------------------------------------------------------------------------------ compress

async function loadSchemes() {
  try {
    state.schemes = (await api("/ui/api/schemes")).schemes || [];
  } catch (error) {
    state.schemes = null;
    if (dom.schemeInfo) {
      clear(dom.schemeInfo).append(el("p", { class: "error" }, `Could not read the schemes: ${error.message}`));
    }
    return;
  }
  const select = dom.scheme;
  clear(select);
  for (const scheme of state.schemes) select.append(el("option", { value: scheme.name }, scheme.name));
  select.dispatchEvent(new Event("change"));
}

function optionInput(key, option) {
  const id = `scheme-opt-${key}`;
  let input;
  if (option.type === "bool") {
    input = el("input", { id, type: "checkbox", checked: Boolean(option.default) });
    return { input, node: el("label", { class: "inline", title: option.help || undefined }, input, key) };
  }
  if (option.choices && option.choices.length) {
    input = el("select", { id }, option.choices.map((c) => el("option", { value: String(c), selected: c === option.default }, String(c))));
  } else if (option.type === "int" || option.type === "float") {
    input = el("input", {
      id,
      type: "number",
      value: option.default,
      min: option.min ?? undefined,
      max: option.max ?? undefined,
      step: option.type === "int" ? 1 : "any",
      inputmode: option.type === "int" ? "numeric" : "decimal",
    });
  } else {
    input = el("input", { id, type: "text", value: option.default ?? "" });
  }
  const help = option.help ? el("small", { class: "muted" }, option.help) : null;
  return { input, node: el("label", {}, key, input, help) };
}

function optionValue(key, option, input) {
  if (option.type === "bool") return input.checked;
  const raw = input.value.trim();
  if (option.choices && option.choices.length) return option.choices.find((c) => String(c) === raw) ?? raw;
  if (option.type === "int" || option.type === "float") {
    const value = Number(raw);
    if (raw === "" || !Number.isFinite(value)) throw new Error(`${key} must be a number.`);
    if (option.type === "int" && !Number.isInteger(value)) throw new Error(`${key} must be a whole number.`);
    if (option.min !== null && option.min !== undefined && value < option.min) throw new Error(`${key} must be at least ${option.min}.`);
    if (option.max !== null && option.max !== undefined && value > option.max) throw new Error(`${key} must be at most ${option.max}.`);
    return value;
  }
  return raw;
}

function compressForm() {
  const [source, sourceLabel] = modelPicker("compress-source", "Model to compress");
  dom.scheme = el("select", { id: "compress-scheme" }, el("option", { value: "" }, "— loading —"));
  dom.schemeInfo = el("div", { class: "scheme-info", id: "scheme-info" });
  const name = el("input", { id: "compress-name", type: "text", autocomplete: "off" });
  let inputs = {};
  let typed = false; // the user wrote a name: stop suggesting one
  name.addEventListener("input", () => {
    typed = Boolean(name.value.trim());
  });
  const suggest = () => {
    if (typed || !source.value || !dom.scheme.value) return;
    const stem = `${source.value.split(":")[0].split("/").pop()}-${dom.scheme.value}`;
    const taken = (n) => state.models.some((m) => m.name === `${n}:latest`);
    let suggestion = stem;
    for (let i = 2; taken(suggestion); i++) suggestion = `${stem}-${i}`;
    name.value = suggestion;
  };
  const scheme = () => (state.schemes || []).find((s) => s.name === dom.scheme.value);
  dom.scheme.addEventListener("change", () => {
    clear(dom.schemeInfo);
    inputs = {};
    const chosen = scheme();
    if (!chosen) return;
    dom.schemeInfo.append(el("p", { class: "muted" }, chosen.description));
    if (chosen.warning) dom.schemeInfo.append(el("p", { class: "warn", role: "note" }, `⚠ ${chosen.warning}`));
    const entries = Object.entries(chosen.options || {});
    if (entries.length) {
      const grid = el("div", { class: "options-grid" });
      for (const [key, option] of entries) {
        const made = optionInput(key, option);
        inputs[key] = made.input;
        grid.append(made.node);
      }
      dom.schemeInfo.append(el("fieldset", {}, el("legend", {}, "Options"), grid));
    }
    suggest();
  });
  source.addEventListener("change", suggest);
  return toolForm(
    "compress-form",
    "Compress a model",
    [sourceLabel, el("label", {}, "Scheme", dom.scheme), dom.schemeInfo, el("label", {}, "New model name", name)],
    "Compress",
    async ({ jobs }) => {
      const from = needModel(source, "the model to compress");
      const chosen = scheme();
      if (!chosen) throw new Error("Pick a scheme (the list did not load: refresh the page).");
      const options = {};
      for (const [key, option] of Object.entries(chosen.options || {})) {
        const value = optionValue(key, option, inputs[key]);
        if (value !== option.default) options[key] = value;
      }
      const model = needName(name);
      const body = { model, from, quantize: chosen.name };
      if (Object.keys(options).length) body.quantize_options = options;
      const ok = await job(jobs, `Compress ${from} → ${model} (${chosen.name})`, (bar, signal) => streamInto(bar, "/api/create", body, signal));
      if (ok) {
        typed = false;
        name.value = "";
      }
    },
  );
}

// ------------------------------------------------------------------------------ pull

function pullForm() {
  const name = el("input", { id: "pull-name", type: "text", autocomplete: "off", placeholder: "hf.co/org/repo" });
  return toolForm(
    "pull-form",
    "Pull a model",
    [el("label", {}, "Model to pull", name), el("p", { class: "muted hint" }, "A Hugging Face repository as hf.co/org/repo (a GGUF repository may add :Q4_K_M).")],
    "Pull",
    async ({ jobs }) => {
      const model = needName(name, "the model to pull");
      await job(jobs, `Pull ${model}`, (bar, signal) =>
        streamInto(bar, "/api/pull", { model }, signal, (event) =>
          event.digest && event.total ? { ...event, status: `${event.status || "pulling"} (${formatBytes(event.completed || 0)} of ${formatBytes(event.total)})` } : event,
        ),
      );
    },
  );
}

// ------------------------------------------------------------------------------ fine-tune

function finetuneForm() {
  const [base, baseLabel] = modelPicker("finetune-base", "Base model");
  const data = el("input", { id: "finetune-data", type: "file", accept: ".jsonl,.json,.ndjson,.csv,.txt" });
  const name = el("input", { id: "finetune-name", type: "text", autocomplete: "off", placeholder: "my-finetune" });
  const method = el("select", { id: "finetune-method" }, ["lora", "dora", "ia3"].map((m) => el("option", { value: m }, m)));
  const number = (id, placeholder, step) => el("input", { id, type: "number", min: 0, step, placeholder, inputmode: "decimal" });
  const epochs = number("finetune-epochs", "1", "any");
  const maxSteps = number("finetune-max-steps", "0 (epochs decide)", 1);
  const lr = number("finetune-lr", "default", "any");
  const rank = number("finetune-rank", "16", 1);
  return toolForm(
    "finetune-form",
    "Fine-tune an adapter",
    [
      baseLabel,
      el("label", {}, "Training data (JSONL chat / prompt-completion / text, or CSV)", data),
      el("label", {}, "New adapter model name", name),
      el(
        "div",
        { class: "options-grid" },
        el("label", {}, "Method", method),
        el("label", {}, "Epochs", epochs),
        el("label", {}, "Max steps", maxSteps),
        el("label", {}, "Learning rate", lr),
        el("label", {}, "Rank", rank),
      ),
    ],
    "Train",
    async ({ jobs }) => {
      const from = needModel(base, "the model to train on");
      const file = data.files && data.files[0];
      if (!file) {
        data.focus();
        throw new Error("Pick a training data file.");
      }
      const model = needName(name);
      const parameters = {};
      for (const [key, input, integer] of [
        ["epochs", epochs, false],
        ["max_steps", maxSteps, true],
        ["learning_rate", lr, false],
        ["rank", rank, true],
      ]) {
        const raw = input.value.trim();
        if (!raw) continue;
        const value = Number(raw);
        if (!Number.isFinite(value) || value < 0 || (integer && !Number.isInteger(value))) {
          input.focus();
          throw new Error(`${key} must be a ${integer ? "whole " : ""}number of 0 or more.`);
        }
        parameters[key] = value;
      }
      const ok = await job(
        jobs,
        `Fine-tune ${model} on ${from}`,
        async (bar, signal) => {
          const digest = await upload(bar, file, file.name);
          const losses = [];
          let chart = null;
          let steps = 0;
          const chartBox = el("div", { class: "loss-chart", "aria-label": "Training loss" });
          bar.node.append(chartBox);
          await streamInto(bar, "/api/finetune", { model, from, data: { [file.name]: digest }, method: method.value, parameters }, signal, (event) => {
            if (typeof event.loss !== "number") return event;
            losses.push(event.loss);
            steps = event.completed || losses.length;
            const next = lineChart(losses, { label: "training loss", format: fixed(2), xLabel: `step ${steps}`, min: lossFloor(losses) });
            if (chart) chart.replaceWith(next);
            else chartBox.append(next);
            chart = next;
            const eta = typeof event.eta_seconds === "number" ? `, ${Math.round(event.eta_seconds)} s left` : "";
            return { ...event, status: `training: step ${steps} of ${event.total}, loss ${event.loss.toFixed(4)}${event.tokens_per_second ? `, ${event.tokens_per_second} tokens/s` : ""}${eta}` };
          });
        },
        { stoppable: true },
      );
      if (ok) selectModel(model.includes(":") ? model : `${model}:latest`);
    },
  );
}
