// One service: latency percentiles and rate over time by version, status
// codes, top routes and top callers — all from the rollups — and its
// slowest recent requests with their traces.

import { sql } from "./api.js";
import { disposeCharts, lineChart, pivot } from "./chart.js";
import { h, every, errorBox, fmtCount, fmtPct, fmtRate, fmtTime, fmtUs, lit, num, panel, table, toDate } from "./util.js";

/** Bucket width for about 120 points over the range, a multiple of 10 s. */
export function step(range) {
  return Math.max(10, Math.ceil(range / 120 / 10) * 10);
}

function where(service, namespace, range) {
  const ns = namespace ? ` AND destination_namespace = ${lit(namespace)}` : "";
  return `window_seconds = 10 AND reporter = 'destination' AND destination_service = ${lit(service)}${ns}
  AND time >= now() - INTERVAL '${range} seconds'`;
}

export function queries(service, namespace, range) {
  const w = where(service, namespace, range);
  const p = (q) => `sketch_quantile(sketch_merge(duration_sketch), ${q})`;
  return {
    overTime: `SELECT date_bin(INTERVAL '${step(range)} seconds', time, TIMESTAMP '1970-01-01T00:00:00Z') AS t,
  destination_version AS version, sum(requests) AS requests, sum(errors) AS errors,
  ${p(0.5)} AS p50_us, ${p(0.9)} AS p90_us, ${p(0.99)} AS p99_us,
  to_unixtime(min(time)) AS first_s, to_unixtime(max(time)) + 10 AS last_s
FROM rollups WHERE ${w} GROUP BY 1, 2 ORDER BY 1`,
    statuses: `SELECT status, sum(requests) AS requests FROM rollups WHERE ${w} GROUP BY 1 ORDER BY 2 DESC`,
    routes: `SELECT route, sum(requests) AS requests, sum(errors) AS errors, ${p(0.99)} AS p99_us
FROM rollups WHERE ${w} GROUP BY 1 ORDER BY 2 DESC LIMIT 10`,
    callers: `SELECT source_workload AS workload, source_namespace AS namespace, sum(requests) AS requests,
  sum(errors) AS errors, ${p(0.99)} AS p99_us
FROM rollups WHERE ${w} GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10`,
    slowest: `SELECT time, method, path, status, duration_us, source_workload, trace_id FROM requests
WHERE reporter = 'destination' AND destination_service = ${lit(service)}${namespace ? ` AND destination_namespace = ${lit(namespace)}` : ""}
  AND time >= now() - INTERVAL '${Math.min(range, 900)} seconds'
ORDER BY duration_us DESC LIMIT 10`,
  };
}

const seconds = (t) => Math.floor(toDate(t).getTime() / 1000);

/** `#/service/NAMESPACE/NAME` (or `#/service/NAME`, any namespace). */
export function servicePage(root, arg, ctx) {
  const [namespace, service] = arg.includes("/") ? arg.split("/", 2) : ["", arg];
  if (!service) {
    location.hash = "#/services";
    return null;
  }
  const status = h("p", { class: "muted" }, "Loading…");
  const charts = h("div", { class: "grid2" });
  const tables = h("div", { class: "grid2 wide" });
  const slow = h("div");
  root.append(
    h("h1", {}, h("a", { href: "#/services", class: "muted" }, "Services"), " / ", namespace ? `${namespace} / ` : "", service),
    status,
    charts,
    tables,
    panel("Slowest requests (last 15 minutes at most): click for the trace", slow),
  );
  const s = step(ctx.range);
  const stop = every(10_000, async () => {
    try {
      const q = queries(service, namespace, ctx.range);
      const [overTime, statuses, routes, callers, slowest] = await Promise.all([
        sql(q.overTime),
        sql(q.statuses),
        sql(q.routes),
        sql(q.callers),
        sql(q.slowest),
      ]);
      const ms = (v) => v / 1000;
      // A bucket's rate is over the seconds of it the range has closed
      // windows for: the first is cut by the range's start, the newest
      // is still filling.
      const first = Math.min(...overTime.map((r) => num(r.first_s)));
      const last = Math.max(...overTime.map((r) => num(r.last_s)));
      const perSecond = (v, r) => {
        const t = seconds(r.t);
        const covered = Math.min(t + s, last) - Math.max(t, first);
        return covered > 0 ? v / covered : null;
      };
      const latency = pivot(overTime, {
        time: "t",
        group: "version",
        toSeconds: seconds,
        values: [
          { key: "p50_us", label: "p50", map: ms, dash: true },
          { key: "p99_us", label: "p99", map: ms },
        ],
      });
      const rate = pivot(overTime, {
        time: "t",
        group: "version",
        toSeconds: seconds,
        values: [{ key: "requests", label: "rps", map: perSecond }],
      });
      const errors = pivot(overTime, {
        time: "t",
        group: "version",
        toSeconds: seconds,
        values: [{ key: "errors", label: "errors/s", map: perSecond, dash: true }],
      });
      rate.series.push(...errors.series);
      disposeCharts(charts);
      charts.replaceChildren(
        panel("Latency by version", lineChart({ title: "p50 / p99 (ms)", ...latency, fmt: (v) => `${+v.toFixed(2)} ms` })),
        panel("Rate by version", lineChart({ title: "requests and errors per second", ...rate, fmt: (v) => fmtRate(v) })),
      );
      const total = statuses.reduce((a, r) => a + num(r.requests), 0);
      tables.replaceChildren(
        panel(
          "Status codes",
          table(
            [
              { key: "status", label: "Status", fmt: (v) => h("span", { class: `code c${String(v)[0]}` }, v === 0 ? "0 (no response)" : v) },
              { key: "requests", label: "Requests", num: true, fmt: fmtCount },
              {
                key: "share",
                label: "Share",
                num: true,
                fmt: (_v, r) => h("span", { class: "bar", style: { "--w": `${(100 * num(r.requests)) / (total || 1)}%` } }, fmtPct(num(r.requests) / (total || 1))),
              },
            ],
            statuses.map((r) => ({ ...r, share: num(r.requests) })),
            { sort: "requests", id: "status-codes" },
          ),
        ),
        panel(
          "Top routes",
          table(
            [
              { key: "route", label: "Route", fmt: (v) => v || "(default)" },
              { key: "requests", label: "Requests", num: true, fmt: fmtCount },
              { key: "errors", label: "Errors", num: true, fmt: (v, r) => fmtPct(num(v) / (num(r.requests) || 1)) },
              { key: "p99_us", label: "p99", num: true, fmt: fmtUs },
            ],
            routes,
            { sort: "requests", id: "top-routes" },
          ),
        ),
        panel(
          "Top callers",
          table(
            [
              { key: "workload", label: "Caller" },
              { key: "namespace", label: "Namespace" },
              { key: "requests", label: "Requests", num: true, fmt: fmtCount },
              { key: "errors", label: "Errors", num: true, fmt: (v, r) => fmtPct(num(v) / (num(r.requests) || 1)) },
              { key: "p99_us", label: "p99", num: true, fmt: fmtUs },
            ],
            callers,
            { sort: "requests", id: "top-callers" },
          ),
        ),
      );
      slow.replaceChildren(
        table(
          [
            { key: "time", label: "Time", fmt: fmtTime },
            { key: "method", label: "Method" },
            { key: "path", label: "Path" },
            { key: "status", label: "Status", num: true },
            { key: "duration_us", label: "Duration", num: true, fmt: fmtUs },
            { key: "source_workload", label: "Caller" },
          ],
          slowest,
          { sort: "duration_us", id: "slowest", onRow: (r) => (location.hash = `#/trace/${r.trace_id}`) },
        ),
      );
      status.textContent = `Last ${ctx.range / 60} minutes in ${s} s steps, as ${service}'s own sidecars saw it.`;
    } catch (e) {
      status.replaceChildren(errorBox(e));
    }
  });
  return () => {
    stop();
    disposeCharts(charts);
  };
}
