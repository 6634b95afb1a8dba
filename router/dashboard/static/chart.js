// The overview's per-minute chart: one SVG polyline per series, plus the same numbers as a table
// for screen readers (and tests).
import { h } from "./dom.js";

const NS = "http://www.w3.org/2000/svg";
export const SERIES = [
  ["in", "events in", "#0b5cad"], ["routed", "routed", "#8250df"], ["executed", "executed", "#1a7f37"],
  ["failed", "failed", "#c62828"], ["dead_lettered", "dead-lettered", "#9a6700"],
];

function svg(tag, attrs) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function swatch(colour) {
  const box = svg("svg", { width: 12, height: 12, "aria-hidden": "true", class: "swatch" });
  box.append(svg("rect", { width: 12, height: 12, fill: colour }));
  return box;
}

const WINDOW = 30;  // minutes shown; those the server has no count for are drawn as zero

function windowed(minutes) {
  const last = minutes.length ? minutes[minutes.length - 1].minute : Math.floor(Date.now() / 60000) * 60;
  const byMinute = new Map(minutes.map((m) => [m.minute, m]));
  const zero = Object.fromEntries(SERIES.map(([key]) => [key, 0]));
  return Array.from({ length: WINDOW }, (_, i) => {
    const minute = last - (WINDOW - 1 - i) * 60;
    return byMinute.get(minute) || { minute, ...zero };
  });
}

function label(x, y, text, anchor = "start") {
  const el = svg("text", { x, y, "font-size": 11, fill: "#57606a", "text-anchor": anchor });
  el.textContent = text;
  return el;
}

export function chart(recorded) {
  const minutes = windowed(recorded);
  const width = 600, height = 180, pad = 24;
  const top = Math.max(1, ...minutes.flatMap((m) => SERIES.map(([key]) => m[key])));
  const x = (i) => pad + (minutes.length <= 1 ? width - 2 * pad : (i * (width - 2 * pad)) / (minutes.length - 1));
  const y = (v) => height - pad - (v * (height - 2 * pad)) / top;
  const plot = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": "chart-title" });
  const title = svg("title", { id: "chart-title" });
  title.textContent = `Events per minute over the last ${WINDOW} minutes; peak ${top}`;
  plot.append(title);
  plot.append(svg("line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, stroke: "#888" }));
  plot.append(svg("line", { x1: pad, y1: pad, x2: width - pad, y2: pad, stroke: "#ddd" }));
  plot.append(label(pad, pad - 6, `${top} / min`));
  plot.append(label(pad, height - 6, `${WINDOW} min ago`));
  plot.append(label(width - pad, height - 6, "now (UTC " + new Date(minutes[minutes.length - 1].minute * 1000).toISOString().slice(11, 16) + ")", "end"));
  for (const [key, , colour] of SERIES) {
    const points = minutes.map((m, i) => `${x(i)},${y(m[key])}`).join(" ");
    plot.append(svg("polyline", { points, fill: "none", stroke: colour, "stroke-width": 2, "data-series": key }));
    minutes.forEach((m, i) => m[key] && plot.append(svg("circle", { cx: x(i), cy: y(m[key]), r: 3, fill: colour })));
  }
  const latest = recorded[recorded.length - 1] || {};
  const rows = recorded.slice(-5).reverse().map((m) => h("tr", {},
    h("th", { scope: "row" }, new Date(m.minute * 1000).toISOString().slice(11, 16)),
    SERIES.map(([key]) => h("td", { dataset: { series: key } }, m[key]))));
  // Totals over the window, as attributes: what a test (or a user's script) reads without the SVG.
  const totals = Object.fromEntries(SERIES.map(([key]) => [`total${key[0].toUpperCase()}${key.slice(1).replace(/_(.)/g, (_, c) => c.toUpperCase())}`,
    minutes.reduce((sum, m) => sum + m[key], 0)]));
  return h("div", { class: "chart", dataset: totals }, plot,
    h("ul", { class: "legend" }, SERIES.map(([key, label, colour]) => h("li", {},
      swatch(colour), `${label}: `,
      h("strong", { dataset: { current: key } }, latest[key] ?? 0), " this minute"))),
    h("details", {}, h("summary", {}, "Per-minute numbers"),
      h("table", {}, h("caption", {}, "Last five minutes (UTC)"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "minute"), SERIES.map(([, label]) => h("th", { scope: "col" }, label)))),
        h("tbody", {}, rows))));
}
