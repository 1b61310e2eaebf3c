// Small SVG charts drawn with DOM calls (no library, no markup strings).

const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

// A line chart of numbers (or null gaps) into a new <svg class="chart">. Options: min / max
// of the y axis (default: 0 and the data's top), format(value) for the axis labels, label
// (the chart's accessible name), xLabel (text under the right end, e.g. "step 120").
export function lineChart(values, { min, max, format = (v) => String(v), label = "", xLabel = "" } = {}) {
  const width = 300;
  const height = 120;
  const left = 36;
  const bottom = 14;
  const top = 6;
  const svg = svgEl("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label, preserveAspectRatio: "none" });
  const numbers = values.filter((v) => typeof v === "number" && Number.isFinite(v));
  const low = min ?? Math.min(0, ...numbers);
  let high = max ?? Math.max(...numbers, low + 1e-9);
  if (high <= low) high = low + 1;
  const x = (i) => left + (values.length > 1 ? (i / (values.length - 1)) * (width - left - 4) : 0);
  const y = (v) => top + (1 - (v - low) / (high - low)) * (height - top - bottom);
  svg.append(svgEl("line", { class: "axis", x1: left, y1: height - bottom, x2: width, y2: height - bottom }));
  for (const [v, dy] of [[high, 8], [low, 0]]) {
    const text = svgEl("text", { x: left - 4, y: y(v) + (dy ? 4 : -1), "text-anchor": "end" });
    text.textContent = format(v);
    svg.append(text);
  }
  if (xLabel) {
    const text = svgEl("text", { x: width - 2, y: height - 2, "text-anchor": "end" });
    text.textContent = xLabel;
    svg.append(text);
  }
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
  const all = series.flatMap((s) => s.values);
  const top = max ?? Math.max(0, ...all.filter((v) => typeof v === "number" && Number.isFinite(v)));
  const svg = lineChart(series[0]?.values || [], { min, max: top, format, label, xLabel });
  const base = svg.querySelector("path.line");
  if (base && series[0]?.className) base.classList.add(series[0].className);
  const width = 300;
  const height = 120;
  const left = 36;
  const bottom = 14;
  const upper = 6;
  const low = min ?? Math.min(0, ...all.filter((v) => typeof v === "number" && Number.isFinite(v)));
  let high = top;
  if (high <= low) high = low + 1;
  for (const { values, className } of series.slice(1)) {
    const x = (i) => left + (values.length > 1 ? (i / (values.length - 1)) * (width - left - 4) : 0);
    const y = (v) => upper + (1 - (v - low) / (high - low)) * (height - upper - bottom);
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
    if (path) svg.append(svgEl("path", { class: `line ${className || ""}`.trim(), d: path, "vector-effect": "non-scaling-stroke" }));
  }
  return svg;
}
