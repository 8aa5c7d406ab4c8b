// DOM building, number formats and the few widgets every page shares.

/** An element: `h("a", {href: "#/"}, "text", child)`. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** An SVG element. */
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  append(el, children);
  return el;
}

/** A SQL string literal. */
export function lit(s) {
  return `'${String(s).replaceAll("'", "''")}'`;
}

export function num(v) {
  if (v === null || v === undefined || v === "") return NaN;
  return typeof v === "number" ? v : Number(v);
}

/** Requests per second: 3 significant digits. */
export function fmtRate(v) {
  v = num(v);
  if (!Number.isFinite(v)) return "—";
  if (v === 0) return "0";
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  if (v >= 0.01) return v.toFixed(2);
  return v.toExponential(1);
}

export function fmtPct(ratio) {
  ratio = num(ratio);
  if (!Number.isFinite(ratio)) return "—";
  if (ratio === 0) return "0%";
  const p = ratio * 100;
  return (p >= 10 ? p.toFixed(0) : p >= 0.1 ? p.toFixed(1) : p.toFixed(2)) + "%";
}

/** A duration given in microseconds. */
export function fmtUs(us) {
  us = num(us);
  if (!Number.isFinite(us)) return "—";
  if (us < 1000) return `${Math.round(us)} µs`;
  if (us < 10_000) return `${(us / 1000).toFixed(2)} ms`;
  if (us < 1_000_000) return `${(us / 1000).toFixed(1)} ms`;
  return `${(us / 1_000_000).toFixed(2)} s`;
}

export function fmtCount(v) {
  v = num(v);
  if (!Number.isFinite(v)) return "—";
  return v.toLocaleString("en-US");
}

/** A time from the API (RFC 3339 or µs/ms since the epoch) as local time. */
export function fmtTime(t) {
  const d = toDate(t);
  if (!d) return "—";
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

export function toDate(t) {
  if (t === null || t === undefined) return null;
  if (t instanceof Date) return t;
  if (typeof t === "number") return new Date(t > 1e14 ? t / 1000 : t);
  // Arrow JSON writes UTC timestamps without a zone.
  const s = /[zZ]|[+-]\d\d:?\d\d$/.test(t) ? t : `${t}Z`;
  const d = new Date(s);
  return Number.isNaN(d.getTime()) ? null : d;
}

/**
 * The seconds of the range that rows (with `first_s` / `last_s`: their
 * first window's start, last window's end) cover: rates over a mesh up for
 * a minute are its rate, not a fifteenth of it.
 */
export function coveredSpan(rows, range) {
  const first = Math.min(...rows.map((r) => num(r.first_s)));
  const last = Math.max(...rows.map((r) => num(r.last_s)));
  return Number.isFinite(last - first) ? Math.min(range, Math.max(10, last - first)) : range;
}

/** Error ratio → health class. */
export function health(ratio, requests = 1) {
  if (!num(requests)) return "idle";
  ratio = num(ratio) || 0;
  if (ratio >= 0.05) return "bad";
  if (ratio >= 0.01) return "warn";
  return "ok";
}

/** A message box in place of a page's content. */
export function errorBox(e) {
  return h("div", { class: "error", role: "alert" }, String(e && e.message ? e.message : e));
}

/**
 * A sortable table. `columns`: {key, label, fmt?, num?, title?}; clicking a
 * header sorts by it (again: the other way); `onRow(row)` makes rows links.
 */
export function table(columns, rows, { sort, desc = true, onRow, empty = "No rows.", id } = {}) {
  let key = sort;
  let down = desc;
  const wrap = h("div", { class: "table-wrap" });
  const draw = () => {
    const sorted = [...rows];
    if (key) {
      const col = columns.find((c) => c.key === key);
      sorted.sort((a, b) => {
        const x = col && col.num ? num(a[key]) : String(a[key] ?? "");
        const y = col && col.num ? num(b[key]) : String(b[key] ?? "");
        const c = col && col.num ? (x || 0) - (y || 0) : x.localeCompare(y);
        return down ? -c : c;
      });
    }
    const head = h(
      "tr",
      {},
      columns.map((c) =>
        h(
          "th",
          {
            class: [c.num ? "num" : "", c.key === key ? (down ? "sorted desc" : "sorted asc") : ""].join(" "),
            title: c.title,
            onclick: () => {
              down = key === c.key ? !down : true;
              key = c.key;
              draw();
            },
          },
          c.label,
        ),
      ),
    );
    const body = sorted.map((r) =>
      h(
        "tr",
        {
          class: onRow ? "link" : "",
          // Rows that open something are reachable with Tab and Enter.
          tabindex: onRow ? 0 : undefined,
          onclick: onRow ? () => onRow(r) : undefined,
          onkeydown: onRow ? (e) => e.key === "Enter" && onRow(r) : undefined,
        },
        columns.map((c) => {
          const v = c.fmt ? c.fmt(r[c.key], r) : r[c.key];
          return h("td", { class: c.num ? "num" : c.cls ? c.cls(r) : "" }, v instanceof Node ? v : String(v ?? ""));
        }),
      ),
    );
    wrap.replaceChildren(
      ...[h("table", { class: "data", id }, h("thead", {}, head), h("tbody", {}, body)), rows.length ? null : h("p", { class: "muted" }, empty)].filter(Boolean),
    );
  };
  draw();
  return wrap;
}

/** A panel with a title. */
export function panel(title, ...children) {
  return h("section", { class: "panel" }, h("h2", {}, title), ...children);
}

/** Runs `fn` now and every `ms` until the returned stop is called. */
export function every(ms, fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    try {
      await fn();
    } finally {
      if (!stopped) timer = setTimeout(tick, ms);
    }
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
