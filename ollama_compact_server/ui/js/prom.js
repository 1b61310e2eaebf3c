// The Prometheus text exposition format (what GET /metrics answers), read into samples.
// Pure functions, no DOM: the Engine page uses them and the tests call them in the browser.

function number(text) {
  switch (text) {
    case "+Inf":
    case "Inf":
      return Infinity;
    case "-Inf":
      return -Infinity;
    case "NaN":
      return NaN;
    default:
      return text === "" ? NaN : Number(text);
  }
}

// The labels of one sample, from just after "{"; returns [labels, index after "}"].
function readLabels(line, start) {
  const labels = {};
  let i = start;
  for (;;) {
    while (line[i] === " " || line[i] === ",") i++;
    if (i >= line.length) throw new Error("unterminated labels");
    if (line[i] === "}") return [labels, i + 1];
    const eq = line.indexOf("=", i);
    if (eq < 0) throw new Error("label without a value");
    const name = line.slice(i, eq).trim();
    i = eq + 1;
    while (line[i] === " ") i++;
    if (line[i] !== '"') throw new Error("label value not quoted");
    i++;
    let value = "";
    for (;;) {
      if (i >= line.length) throw new Error("unterminated label value");
      const c = line[i];
      if (c === "\\") {
        const next = line[i + 1];
        value += next === "n" ? "\n" : next === undefined ? "\\" : next; // \\ \" \n
        i += 2;
      } else if (c === '"') {
        i++;
        break;
      } else {
        value += c;
        i++;
      }
    }
    labels[name] = value;
  }
}

// parse(text) -> [{name, labels, value}] in the order given; "# HELP", "# TYPE" and other
// comments and blank lines are skipped; +Inf, -Inf and NaN are numbers; a trailing
// timestamp is ignored. A line that cannot be read is skipped (the rest still counts).
export function parse(text) {
  const samples = [];
  for (const raw of String(text).split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    try {
      const brace = line.indexOf("{");
      const space = line.search(/\s/);
      let name;
      let labels = {};
      let rest;
      if (brace >= 0 && (space < 0 || brace < space)) {
        name = line.slice(0, brace).trim();
        let end;
        [labels, end] = readLabels(line, brace + 1);
        rest = line.slice(end);
      } else {
        if (space < 0) continue;
        name = line.slice(0, space);
        rest = line.slice(space);
      }
      const [value] = rest.trim().split(/\s+/);
      if (!name || value === undefined) continue;
      samples.push({ name, labels, value: number(value) });
    } catch {
      // a malformed line: skip it
    }
  }
  return samples;
}

function matches(labels, want) {
  return Object.entries(want).every(([k, v]) => labels[k] === v);
}

// The value of the first sample called name whose labels include want (or fallback).
export function value(samples, name, want = {}, fallback = 0) {
  const found = samples.find((s) => s.name === name && matches(s.labels, want));
  return found ? found.value : fallback;
}

// The sum of every sample called name (all label sets).
export function total(samples, name) {
  return samples.filter((s) => s.name === name).reduce((sum, s) => sum + s.value, 0);
}

// {labelValue: value} of the samples called name, keyed by one label.
export function byLabel(samples, name, label) {
  const out = {};
  for (const s of samples) if (s.name === name && label in s.labels) out[s.labels[label]] = s.value;
  return out;
}

// A histogram's cumulative buckets [{le, count}] sorted by le (+Inf last).
export function buckets(samples, name, want = {}) {
  return samples
    .filter((s) => s.name === `${name}_bucket` && "le" in s.labels && matches(s.labels, want))
    .map((s) => ({ le: number(s.labels.le), count: s.value }))
    .sort((a, b) => a.le - b.le);
}

// Bucket counts observed between two scrapes (now - before, matched by le); a counter that
// went down (a restart) counts from zero.
export function bucketDelta(now, before) {
  const old = new Map((before || []).map((b) => [b.le, b.count]));
  const restarted = now.some((b) => b.count < (old.get(b.le) ?? 0));
  return now.map((b) => ({ le: b.le, count: restarted ? b.count : b.count - (old.get(b.le) ?? 0) }));
}

// The q-quantile estimated from cumulative buckets as Prometheus' histogram_quantile does
// (linear within a bucket, from 0 for the first); null without observations; a rank in
// the +Inf bucket answers the highest finite bound.
export function quantile(q, cumulative) {
  if (!cumulative.length) return null;
  const count = cumulative[cumulative.length - 1].count;
  if (!(count > 0)) return null;
  const rank = q * count;
  let lower = 0;
  let below = 0;
  for (const b of cumulative) {
    if (b.count >= rank) {
      if (b.le === Infinity) return lower;
      if (b.count === below) return b.le;
      return lower + ((b.le - lower) * (rank - below)) / (b.count - below);
    }
    lower = b.le;
    below = b.count;
  }
  return lower;
}
