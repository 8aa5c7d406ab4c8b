// Live tail: requests as the sidecars record them, newest first, with
// filters; a row opens its trace.

import { sql } from "./api.js";
import { h, every, errorBox, fmtTime, fmtUs, lit, num, panel, table, toDate } from "./util.js";

/**
 * Records can arrive a few seconds after they happened (each sidecar sends
 * in batches), so every poll reads a window this long and keeps the rows it
 * has not shown.
 */
const OVERLAP_S = 20;
const KEEP = 500;

const STATUS = {
  any: "",
  "2xx": "status BETWEEN 200 AND 299",
  "3xx": "status BETWEEN 300 AND 399",
  "4xx": "status BETWEEN 400 AND 499",
  "5xx": "status BETWEEN 500 AND 599",
  failed: "(status >= 500 OR status = 0 OR response_flags <> '-')",
};

/** The poll's SQL for the filters. */
export function tailQuery(f, windowS) {
  const conds = [`time >= now() - INTERVAL '${windowS} seconds'`];
  if (f.service) conds.push(`destination_service = ${lit(f.service)}`);
  if (STATUS[f.status]) conds.push(STATUS[f.status]);
  if (num(f.minMs) > 0) conds.push(`duration_us >= ${Math.round(num(f.minMs) * 1000)}`);
  if (f.path) conds.push(`strpos(path, ${lit(f.path)}) > 0`);
  if (f.reporter) conds.push(`reporter = ${lit(f.reporter)}`);
  return `SELECT time, reporter, source_workload, destination_service, destination_version, method, path,
  status, duration_us, response_flags, trace_id, span_id
FROM requests WHERE ${conds.join(" AND ")} ORDER BY time DESC LIMIT ${KEEP}`;
}

export function tailPage(root, _arg) {
  const saved = JSON.parse(sessionStorage.getItem("lumen.tail") || "{}");
  const f = { service: "", status: "any", minMs: "", path: "", reporter: "destination", ...saved };
  let rows = [];
  let seen = new Set();
  let paused = false;
  // Bumped when the filters change: an answer to older filters is dropped.
  let generation = 0;
  const services = h("select", { id: "tail-service", "aria-label": "Service" }, h("option", { value: "" }, "all services"));
  const status = h(
    "select",
    { id: "tail-status", "aria-label": "Status" },
    Object.keys(STATUS).map((s) => h("option", { value: s, selected: s === f.status }, s === "any" ? "any status" : s)),
  );
  const minMs = h("input", { id: "tail-min", type: "number", min: 0, step: "any", placeholder: "min ms", value: f.minMs, "aria-label": "Minimum duration (ms)" });
  const path = h("input", { id: "tail-path", type: "search", placeholder: "path contains", value: f.path, "aria-label": "Path contains" });
  const reporter = h(
    "select",
    { id: "tail-reporter", "aria-label": "Reporter" },
    [
      ["destination", "callee's record"],
      ["source", "caller's record"],
      ["", "both records"],
    ].map(([v, l]) => h("option", { value: v, selected: v === f.reporter }, l)),
  );
  const pause = h("button", { id: "tail-pause", type: "button" }, "Pause");
  const note = h("p", { class: "muted" });
  const body = h("div");
  const apply = () => {
    Object.assign(f, { service: services.value, status: status.value, minMs: minMs.value, path: path.value, reporter: reporter.value });
    sessionStorage.setItem("lumen.tail", JSON.stringify(f));
    rows = [];
    seen = new Set();
    generation++;
    render();
    poll();
  };
  for (const el of [services, status, reporter]) el.addEventListener("change", apply);
  for (const el of [minMs, path]) el.addEventListener("change", apply);
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    note.textContent = paused ? "Paused." : note.textContent;
  });
  root.append(panel("Live tail", h("div", { class: "filters" }, services, status, minMs, path, reporter, pause), note, body));

  sql("SELECT DISTINCT destination_service AS s FROM rollups WHERE window_seconds = 10 AND time >= now() - INTERVAL '1 hour' ORDER BY 1")
    .then((list) => {
      for (const r of list) services.append(h("option", { value: r.s, selected: r.s === f.service }, r.s));
    })
    .catch(() => {});

  const render = () => {
    body.replaceChildren(
      table(
        [
          { key: "time", label: "Time", fmt: fmtTime },
          { key: "source_workload", label: "Caller" },
          { key: "destination_service", label: "Service", fmt: (v, r) => (r.destination_version ? `${v} ${r.destination_version}` : v) },
          { key: "method", label: "Method" },
          { key: "path", label: "Path" },
          { key: "status", label: "Status", num: true, fmt: (v) => h("span", { class: `code c${String(v)[0]}` }, v) },
          { key: "duration_us", label: "Duration", num: true, fmt: fmtUs },
          { key: "response_flags", label: "Flags" },
          { key: "reporter", label: "Record" },
        ],
        rows,
        { id: "tail", empty: "No requests match yet.", onRow: (r) => (location.hash = `#/trace/${r.trace_id}`) },
      ),
    );
  };
  let busy = false;
  let again = false;
  const poll = async () => {
    if (paused) return;
    if (busy) {
      // Filters changed mid-poll: poll again once this one ends.
      again = true;
      return;
    }
    busy = true;
    const asked = generation;
    try {
      const answer = await sql(tailQuery(f, OVERLAP_S));
      if (asked !== generation) return;
      const fresh = answer.filter((r) => {
        const key = `${r.trace_id}/${r.span_id}/${r.reporter}`;
        if (seen.has(key)) return false;
        seen.add(key);
        return true;
      });
      if (fresh.length) {
        rows = [...fresh, ...rows].sort((a, b) => toDate(b.time) - toDate(a.time)).slice(0, KEEP);
        // Forget keys older than the window: they cannot come back. (The
        // server's clock, by its newest row, not the browser's.)
        const horizon = toDate(rows[0].time).getTime() - 2 * OVERLAP_S * 1000;
        seen = new Set(
          rows.filter((r) => toDate(r.time).getTime() >= horizon).map((r) => `${r.trace_id}/${r.span_id}/${r.reporter}`),
        );
        render();
      } else if (!rows.length) {
        render();
      }
      note.textContent = `Newest first, polling every second; ${rows.length} shown (last ${KEEP} kept). Click a row for its trace.`;
    } catch (e) {
      note.replaceChildren(errorBox(e));
    } finally {
      busy = false;
      if (again) {
        again = false;
        poll();
      }
    }
  };
  return every(1000, poll);
}
