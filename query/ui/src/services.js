// The RED table: each service's rate, errors and duration over the range,
// as its own sidecars saw them, sortable by any column.

import { sql } from "./api.js";
import { coveredSpan, h, every, errorBox, fmtRate, fmtPct, fmtUs, health, num, panel, table } from "./util.js";

export function redQuery(range) {
  return `SELECT destination_service AS service, destination_namespace AS namespace,
  protocol = 'tcp' AS tcp, sum(requests) AS requests, sum(errors) AS errors,
  sketch_quantile(sketch_merge(duration_sketch), 0.5) AS p50_us,
  sketch_quantile(sketch_merge(duration_sketch), 0.9) AS p90_us,
  sketch_quantile(sketch_merge(duration_sketch), 0.99) AS p99_us,
  count(DISTINCT destination_version) AS versions,
  to_unixtime(min(time)) AS first_s, to_unixtime(max(time)) + 10 AS last_s
FROM rollups WHERE window_seconds = 10 AND reporter = 'destination'
  AND time >= now() - INTERVAL '${range} seconds'
GROUP BY 1, 2, 3`;
}

export function servicesPage(root, _arg, ctx) {
  const status = h("p", { class: "muted" }, "Loading…");
  const body = h("div");
  root.append(panel("Services: rate, errors, duration", status, body));
  let sort = "rps";
  let desc = true;
  return every(10_000, async () => {
    try {
      const answer = await sql(redQuery(ctx.range));
      const span = coveredSpan(answer, ctx.range);
      const rows = answer.map((r) => ({
        ...r,
        rps: num(r.requests) / span,
        error_ratio: num(r.requests) ? num(r.errors) / num(r.requests) : 0,
      }));
      const latency = (v, r) => (r.tcp ? "—" : fmtUs(v));
      const t = table(
        [
          {
            key: "service",
            label: "Service",
            fmt: (v, r) =>
              h("span", {}, h("span", { class: `dot ${health(r.error_ratio, r.requests)}` }), " ", v, r.tcp ? h("span", { class: "tag" }, "TCP") : null),
          },
          { key: "namespace", label: "Namespace" },
          { key: "rps", label: "Rate", num: true, fmt: (v, r) => `${fmtRate(v)} ${r.tcp ? "conn/s" : "rps"}`, title: "Requests (TCP: connections) per second" },
          { key: "error_ratio", label: "Errors", num: true, fmt: fmtPct, title: "Share of requests that failed" },
          { key: "p50_us", label: "p50", num: true, fmt: latency },
          { key: "p90_us", label: "p90", num: true, fmt: latency },
          { key: "p99_us", label: "p99", num: true, fmt: latency },
          { key: "versions", label: "Versions", num: true },
        ],
        rows,
        {
          sort,
          desc,
          id: "red-table",
          empty: "No requests in this range yet.",
          onRow: (r) => (location.hash = `#/service/${encodeURIComponent(r.namespace)}/${encodeURIComponent(r.service)}`),
        },
      );
      // Keep the user's sort across refreshes.
      t.addEventListener("click", (e) => {
        const th = e.target.closest("th");
        if (!th) return;
        const cols = ["service", "namespace", "rps", "error_ratio", "p50_us", "p90_us", "p99_us", "versions"];
        const k = cols[th.cellIndex];
        desc = sort === k ? !desc : true;
        sort = k;
      });
      body.replaceChildren(t);
      status.textContent = `${rows.length} services over the last ${ctx.range / 60} minutes, as their own sidecars saw them. Click a row for its page.`;
    } catch (e) {
      status.replaceChildren(errorBox(e));
    }
  });
}
