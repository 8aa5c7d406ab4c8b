// Time-series charts with uPlot.

import uPlot from "uplot";
import { h } from "./util.js";

const PALETTE = ["#1f6feb", "#d97706", "#16a34a", "#dc2626", "#7c3aed", "#0891b2", "#be185d", "#65a30d"];

/**
 * A line chart. `xs`: seconds since the epoch; `series`: [{label, values}]
 * aligned with xs (null for a gap); `fmt` formats values. The element's
 * `dispose()` frees the chart (uPlot keeps every chart until destroyed):
 * call it before drawing a new one in its place.
 */
export function lineChart({ title, xs, series, fmt = (v) => String(v), height = 220 }) {
  const box = h("div", { class: "chart", "data-title": title });
  box.dispose = () => {};
  if (!xs.length) {
    box.append(h("p", { class: "muted" }, "No data in this range."));
    return box;
  }
  const opts = {
    title,
    width: 600,
    height,
    series: [
      {},
      ...series.map((s, i) => ({
        label: s.label,
        stroke: PALETTE[(s.color ?? i) % PALETTE.length],
        dash: s.dash ? [5, 4] : undefined,
        width: 1.5,
        spanGaps: false,
        value: (_u, v) => (v === null || v === undefined ? "—" : fmt(v)),
      })),
    ],
    axes: [{}, { values: (_u, ticks) => ticks.map(fmt), size: 70 }],
    scales: { x: { time: true } },
    legend: { live: true },
  };
  const plot = new uPlot(opts, [xs, ...series.map((s) => s.values)], box);
  // Fill the panel's width, and follow it.
  const fit = () => {
    const w = box.clientWidth;
    if (w > 0) plot.setSize({ width: w, height });
  };
  const observer = new ResizeObserver(fit);
  observer.observe(box);
  requestAnimationFrame(fit);
  box.dispose = () => {
    observer.disconnect();
    plot.destroy();
  };
  return box;
}

/** Frees the charts under `el` (see [`lineChart`]). */
export function disposeCharts(el) {
  for (const c of el.querySelectorAll(".chart")) if (c.dispose) c.dispose();
}

/**
 * Pivots rows (time, group, value…) into aligned series: one per group and
 * value column, named "group value".
 */
export function pivot(rows, { time, group, values, toSeconds }) {
  const groups = [...new Set(rows.map((r) => (group ? r[group] : "")))].sort();
  const times = [...new Set(rows.map((r) => toSeconds(r[time])))].sort((a, b) => a - b);
  const at = new Map(times.map((t, i) => [t, i]));
  const series = new Map();
  for (const r of rows) {
    for (const v of values) {
      const g = group ? r[group] : "";
      const label = [g, v.label].filter(Boolean).join(" ");
      // One colour per group; a value marked `dash` drawn dashed in it.
      if (!series.has(label)) {
        const color = group ? groups.indexOf(g) : series.size;
        series.set(label, { label, color, dash: !!v.dash, values: new Array(times.length).fill(null) });
      }
      const x = r[v.key];
      series.get(label).values[at.get(toSeconds(r[time]))] = x === null || x === undefined ? null : v.map ? v.map(Number(x), r) : Number(x);
    }
  }
  return { xs: times, series: [...series.values()] };
}
