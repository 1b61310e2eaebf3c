// Small SVG charts drawn with DOM calls (no library, no markup strings).

const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

// the drawing area of every chart, in viewBox units
const WIDTH = 300;
const HEIGHT = 120;
const LEFT = 36; // room for the y labels
const BOTTOM = 14; // room for the x label
const TOP = 6;

const finite = (values) => values.filter((v) => typeof v === "number" && Number.isFinite(v));

// The x and y of value v at index i of n, on a y axis from low to high.
function scale(n, low, high) {
  return {
    x: (i) => LEFT + (n > 1 ? (i / (n - 1)) * (WIDTH - LEFT - 4) : 0),
    y: (v) => TOP + (1 - (v - low) / (high - low)) * (HEIGHT - TOP - BOTTOM),
  };
}

// An SVG path's d for values (null and NaN leave gaps), clamped to [low, high]; "" if empty.
function linePath(values, low, high) {
  const { x, y } = scale(values.length, low, high);
  let path = "";
  let pen = false;
  values.forEach((v, i) => {
    if (typeof v !== "number" || !Number.isFinite(v)) {
      pen = false;
      return;
    }
    path += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(Math.min(Math.max(v, low), high)).toFixed(1)}`;
    pen = true;
  });
  return path;
}

// A line chart of numbers (or null gaps) into a new <svg class="chart">. Options: min / max
// of the y axis (default: 0 and the data's top), format(value) for the axis labels, label
// (the chart's accessible name), xLabel (text under the right end, e.g. "step 120").
export function lineChart(values, { min, max, format = (v) => String(v), label = "", xLabel = "" } = {}) {
  const svg = svgEl("svg", { class: "chart", viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": label, preserveAspectRatio: "none" });
  const numbers = finite(values);
  const low = min ?? Math.min(0, ...numbers);
  let high = max ?? Math.max(...numbers, low + 1e-9);
  if (high <= low) high = low + 1;
  const { y } = scale(values.length, low, high);
  svg.append(svgEl("line", { class: "axis", x1: LEFT, y1: HEIGHT - BOTTOM, x2: WIDTH, y2: HEIGHT - BOTTOM }));
  for (const [v, dy] of [[high, 8], [low, 0]]) {
    const text = svgEl("text", { x: LEFT - 4, y: y(v) + (dy ? 4 : -1), "text-anchor": "end" });
    text.textContent = format(v);
    svg.append(text);
  }
  if (xLabel) {
    const text = svgEl("text", { x: WIDTH - 2, y: HEIGHT - 2, "text-anchor": "end" });
    text.textContent = xLabel;
    svg.append(text);
  }
  const path = linePath(values, low, high);
  if (path) {
    svg.append(svgEl("path", { class: "line", d: path, "vector-effect": "non-scaling-stroke" }));
  }
  const title = svgEl("title");
  title.textContent = label;
  svg.prepend(title);
  return svg;
}

// Horizontal bars comparing named values ([{name, value, parent?}]) in a .bars grid.
export function bars(rows, { format = (v) => String(v) } = {}) {
  const box = document.createElement("div");
  box.className = "bars";
  const top = Math.max(...rows.map((r) => r.value || 0), 1e-9);
  for (const row of rows) {
    const name = document.createElement("span");
    name.textContent = row.name;
    const track = document.createElement("div");
    const bar = document.createElement("div");
    bar.className = row.parent ? "bar parent" : "bar";
    bar.style.width = `${Math.max(0, (100 * (row.value || 0)) / top).toFixed(1)}%`;
    track.append(bar);
    const value = document.createElement("span");
    value.className = "num";
    value.textContent = format(row.value);
    box.append(name, track, value);
  }
  return box;
}

// Several lines on one scale: series is [{values, className}] (each path gets the classes
// "line" and className, so CSS colours it); options as lineChart's.
export function multiLineChart(series, { min, max, format = (v) => String(v), label = "", xLabel = "" } = {}) {
  const all = finite(series.flatMap((s) => s.values));
  const low = min ?? Math.min(0, ...all);
  let high = max ?? Math.max(0, ...all);
  if (high <= low) high = low + 1;
  const svg = lineChart(series[0]?.values || [], { min: low, max: high, format, label, xLabel });
  const base = svg.querySelector("path.line");
  if (base && series[0]?.className) base.classList.add(series[0].className);
  for (const { values, className } of series.slice(1)) {
    const path = linePath(values, low, high);
    if (path) svg.append(svgEl("path", { class: `line ${className || ""}`.trim(), d: path, "vector-effect": "non-scaling-stroke" }));
  }
  return svg;
}
