// SQL console: any SQL over requests, spans, logs, metrics, rollups and
// policy_events; results as a table (Arrow IPC, typed), a chart when the
// result is a time series, a history, and a Cancel button that stops the
// query on the server through the running-queries API.

import { DataType } from "apache-arrow";
import { cancelQuery, runningQueries, sqlArrow } from "./api.js";
import { disposeCharts, lineChart, pivot } from "./chart.js";
import { h, errorBox, fmtCount, panel } from "./util.js";

const HISTORY_KEY = "lumen.sql.history";
/** Rows drawn at once; the rest are drawn as they scroll into view. */
const WINDOW = 120;
const ROW_PX = 29;

const EXAMPLES = [
  [
    "Requests per service (last 15 min)",
    "SELECT destination_service, count(*) AS requests, avg(duration_us) AS avg_us\nFROM requests\nWHERE reporter = 'destination' AND time >= now() - INTERVAL '15 minutes'\nGROUP BY 1 ORDER BY 2 DESC",
  ],
  [
    "p99 per service, 10 s windows (chart)",
    "SELECT time, destination_service,\n  sketch_quantile(sketch_merge(duration_sketch), 0.99) / 1000 AS p99_ms\nFROM rollups\nWHERE window_seconds = 10 AND reporter = 'destination' AND time >= now() - INTERVAL '15 minutes'\nGROUP BY 1, 2 ORDER BY 1",
  ],
  [
    "Failed requests with their traces",
    "SELECT time, source_workload, destination_service, path, status, response_flags, trace_id\nFROM requests\nWHERE status >= 500 AND time >= now() - INTERVAL '15 minutes'\nORDER BY time DESC LIMIT 50",
  ],
  ["Policy events", "SELECT * FROM policy_events ORDER BY time DESC LIMIT 50"],
];

function history() {
  try {
    return JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
  } catch {
    return [];
  }
}

function remember(query) {
  const h = history().filter((x) => x.sql !== query);
  h.unshift({ sql: query, at: new Date().toISOString() });
  localStorage.setItem(HISTORY_KEY, JSON.stringify(h.slice(0, 50)));
}

/** A cell of an Arrow column as text. */
export function cell(value, type) {
  if (value === null || value === undefined) return "NULL";
  if (DataType.isTimestamp(type) || DataType.isDate(type)) return toDate(value, type).toISOString().replace("T", " ").replace("Z", "");
  if (value instanceof Uint8Array) return [...value].map((b) => b.toString(16).padStart(2, "0")).join("");
  if (typeof value === "bigint") return value.toString();
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : String(+value.toPrecision(10));
  if (typeof value === "object") return JSON.stringify(value.toJSON ? value.toJSON() : value, (_k, v) => (typeof v === "bigint" ? v.toString() : v));
  return String(value);
}

/**
 * A table of `n` rows that draws only the rows in view (and a margin):
 * an answer of a million rows scrolls like one of ten. `row(i)` gives row
 * i's cells as text; rows are drawn at a fixed height, spacer rows stand in
 * for the rest.
 */
export function virtualTable(n, fields, row) {
  const cls = (i) => (isNumeric(fields[i].type) ? "num" : "");
  const body = h("tbody");
  const box = h(
    "div",
    { class: "vtable", id: "sql-scroll" },
    h(
      "table",
      { class: "data", id: "sql-table", "data-rows": n },
      h("thead", {}, h("tr", {}, fields.map((f, i) => h("th", { title: String(f.type), class: cls(i) }, f.name)))),
      body,
    ),
  );
  const spacer = (rows) => h("tr", {}, h("td", { class: "spacer", colspan: fields.length, style: { height: `${rows * ROW_PX}px` } }));
  let drawn = -1;
  const paint = () => {
    const first = Math.max(0, Math.floor(box.scrollTop / ROW_PX) - WINDOW / 4);
    if (first === drawn) return;
    drawn = first;
    const last = Math.min(n, first + WINDOW);
    const rows = [];
    for (let r = first; r < last; r++) {
      rows.push(h("tr", { style: { height: `${ROW_PX}px` } }, row(r).map((v, i) => h("td", { class: cls(i) }, v))));
    }
    body.replaceChildren(...[first > 0 ? spacer(first) : null, ...rows, last < n ? spacer(n - last) : null].filter(Boolean));
  };
  box.addEventListener("scroll", () => requestAnimationFrame(paint), { passive: true });
  paint();
  return box;
}

/** An Arrow timestamp or date value as a Date (Arrow JS gives ms). */
function toDate(value, type) {
  if (typeof value === "bigint") {
    const per = { 0: 1000n, 1: 1n, 2: 1000n, 3: 1000000n }[type.unit] || 1n;
    return new Date(Number(type.unit === 0 ? value * per : value / per));
  }
  return new Date(Number(value));
}

function isNumeric(type) {
  return DataType.isInt(type) || DataType.isFloat(type) || DataType.isDecimal(type);
}

/**
 * How to chart a result: its first time column as x, its numeric columns
 * as series, split by its one text column if it has one. None if the
 * result is not a time series.
 */
export function chartPlan(fields) {
  const time = fields.find((f) => DataType.isTimestamp(f.type) || DataType.isDate(f.type));
  const values = fields.filter((f) => isNumeric(f.type));
  const texts = fields.filter((f) => f !== time && !isNumeric(f.type) && (DataType.isUtf8(f.type) || DataType.isDictionary(f.type)));
  if (!time || !values.length || texts.length > 1) return null;
  return { time: time.name, group: texts[0] ? texts[0].name : null, values: values.map((f) => f.name) };
}

export function consolePage(root) {
  const editor = h("textarea", {
    id: "sql-editor",
    spellcheck: "false",
    rows: 8,
    "aria-label": "SQL",
    placeholder: "SELECT … FROM requests  (Ctrl+Enter runs)",
  });
  editor.value = sessionStorage.getItem("lumen.sql.draft") || (history()[0] || {}).sql || EXAMPLES[0][1];
  editor.addEventListener("input", () => sessionStorage.setItem("lumen.sql.draft", editor.value));
  const run = h("button", { id: "sql-run", type: "button", class: "primary" }, "Run");
  const cancel = h("button", { id: "sql-cancel", type: "button", disabled: true }, "Cancel");
  const examples = h(
    "select",
    { id: "sql-examples", "aria-label": "Examples" },
    h("option", { value: "" }, "Examples…"),
    EXAMPLES.map(([label], i) => h("option", { value: i }, label)),
  );
  const status = h("span", { id: "sql-status", class: "muted", role: "status" });
  const chartBox = h("div", { id: "sql-chart" });
  const result = h("div", { id: "sql-result" });
  const historyBox = h("ol", { id: "sql-history", class: "history" });
  let running = null;

  const drawHistory = () => {
    historyBox.replaceChildren(
      ...history().map((x) =>
        h(
          "li",
          {
            class: "link",
            title: x.at,
            onclick: () => {
              editor.value = x.sql;
              sessionStorage.setItem("lumen.sql.draft", x.sql);
              editor.focus();
            },
          },
          h("code", {}, x.sql.length > 160 ? `${x.sql.slice(0, 160)}…` : x.sql),
        ),
      ),
    );
  };

  const execute = async () => {
    const query = editor.value.trim();
    if (!query || running) return;
    const label = `console-${Math.random().toString(36).slice(2, 12)}`;
    const controller = new AbortController();
    running = { label, controller };
    run.disabled = true;
    cancel.disabled = false;
    status.textContent = "Running…";
    const started = performance.now();
    try {
      const table = await sqlArrow(query, { signal: controller.signal, label });
      const ms = performance.now() - started;
      remember(query);
      drawHistory();
      draw(table);
      status.textContent = `${fmtCount(table.numRows)} rows in ${ms.toFixed(0)} ms.`;
    } catch (e) {
      chartBox.replaceChildren();
      if (e.name === "AbortError" || e.status === 499) {
        result.replaceChildren(errorBox("Cancelled: the query was stopped on the server."));
        status.textContent = "Cancelled.";
      } else {
        result.replaceChildren(errorBox(e));
        status.textContent = "Failed.";
      }
    } finally {
      running = null;
      run.disabled = false;
      cancel.disabled = true;
    }
  };

  // Stops the query where it runs (found by its label in the running
  // queries), then drops the answer's connection.
  const stop = async () => {
    if (!running) return;
    const { label, controller } = running;
    status.textContent = "Cancelling…";
    try {
      const q = (await runningQueries()).find((x) => String(x.origin || "").includes(label));
      if (q) await cancelQuery(q.id);
    } catch (e) {
      status.textContent = `Cancel: ${e.message}`;
    } finally {
      controller.abort();
    }
  };

  const draw = (table) => {
    const fields = table.schema.fields;
    const columns = fields.map((f, i) => ({ f, col: table.getChildAt(i) }));
    result.replaceChildren(virtualTable(table.numRows, fields, (r) => columns.map(({ f, col }) => cell(col.get(r), f.type))));
    const plan = chartPlan(fields);
    const timeColumn = plan && table.getChild(plan.time);
    const distinct = new Set();
    for (let r = 0; timeColumn && r < table.numRows && distinct.size < 2; r++) distinct.add(Number(timeColumn.get(r)));
    // A chart needs at least two points in time.
    disposeCharts(chartBox);
    if (!plan || distinct.size < 2) {
      chartBox.replaceChildren();
      return;
    }
    const objs = [];
    for (let r = 0; r < table.numRows; r++) {
      const o = {};
      for (const { f, col } of columns) {
        const v = col.get(r);
        o[f.name] = f.name === plan.time ? toDate(v, f.type).getTime() / 1000 : typeof v === "bigint" ? Number(v) : v;
      }
      objs.push(o);
    }
    const data = pivot(objs, {
      time: plan.time,
      group: plan.group,
      toSeconds: (t) => t,
      values: plan.values.map((v) => ({ key: v, label: plan.values.length > 1 || !plan.group ? v : "" })),
    });
    chartBox.replaceChildren(panel("Chart", lineChart({ title: `${plan.values.join(", ")} by ${plan.time}`, ...data, fmt: (v) => String(+Number(v).toPrecision(4)) })));
  };

  run.addEventListener("click", execute);
  cancel.addEventListener("click", stop);
  editor.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      execute();
    }
  });
  examples.addEventListener("change", () => {
    if (examples.value === "") return;
    editor.value = EXAMPLES[Number(examples.value)][1];
    sessionStorage.setItem("lumen.sql.draft", editor.value);
    examples.value = "";
  });
  drawHistory();
  root.append(
    h(
      "div",
      { class: "console" },
      h(
        "div",
        { class: "console-main" },
        panel("SQL", editor, h("div", { class: "toolbar" }, run, cancel, examples, status)),
        chartBox,
        panel("Result", result),
      ),
      panel("History", historyBox),
    ),
  );
  return () => {
    if (running) running.controller.abort();
    disposeCharts(chartBox);
  };
}
