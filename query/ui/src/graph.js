// Service graph: workloads as nodes, calls as edges with their rate, error
// ratio and p99 over the range, coloured by health — from the 10 s rollups.

import { sql } from "./api.js";
import { coveredSpan, h, svg, every, errorBox, fmtRate, fmtPct, fmtUs, health, num, panel } from "./util.js";

/** Each (caller, callee, service) pair as each side's proxy reported it. */
export function edgesQuery(range) {
  return `SELECT reporter, source_workload AS src, source_namespace AS src_ns,
  destination_workload AS dst, destination_namespace AS dst_ns, destination_service AS service,
  protocol = 'tcp' AS tcp, sum(requests) AS requests, sum(errors) AS errors,
  sketch_quantile(sketch_merge(duration_sketch), 0.99) AS p99_us,
  to_unixtime(min(time)) AS first_s, to_unixtime(max(time)) + 10 AS last_s
FROM rollups WHERE window_seconds = 10 AND time >= now() - INTERVAL '${range} seconds'
GROUP BY 1, 2, 3, 4, 5, 6, 7`;
}

/**
 * One edge per (caller, callee, service): the callee's report where there
 * is one (it saw every request that arrived), else the caller's (a callee
 * without a sidecar).
 */
export function mergeEdges(rows, range) {
  // Rates over the time the range has data for: a mesh up for a minute
  // shows its rate, not a fifteenth of it.
  const span = coveredSpan(rows, range);
  const byKey = new Map();
  for (const r of rows) {
    const key = [r.src_ns, r.src, r.dst_ns, r.dst, r.service, r.tcp].join("\u0000");
    const had = byKey.get(key);
    if (!had || (had.reporter === "source" && r.reporter === "destination")) byKey.set(key, r);
  }
  // A callee that cannot name its caller (a TCP connection without peer
  // metadata) while the caller's own sidecar reported the call: the
  // caller's report says who it was.
  const named = new Set(
    rows.filter((r) => r.reporter === "source" && known(r.src)).map((r) => [r.dst_ns, r.dst, r.service, r.tcp].join("\u0000")),
  );
  const edges = [...byKey.values()].filter(
    (r) => known(r.src) || r.reporter !== "destination" || !named.has([r.dst_ns, r.dst, r.service, r.tcp].join("\u0000")),
  );
  return edges.map((r) => ({
    from: nodeId(r.src_ns, r.src, null),
    to: nodeId(r.dst_ns, r.dst, r.service),
    toLabel: known(r.dst) ? r.dst : r.service,
    fromLabel: known(r.src) ? r.src : "unknown",
    service: r.service,
    namespace: r.dst_ns,
    tcp: !!r.tcp,
    rps: num(r.requests) / span,
    errors: num(r.requests) ? num(r.errors) / num(r.requests) : 0,
    requests: num(r.requests),
    p99: num(r.p99_us),
  }));
}

function known(w) {
  return w && w !== "unknown";
}

function nodeId(ns, workload, service) {
  if (known(workload)) return `${ns || ""}/${workload}`;
  return service ? `service:${service}` : "unknown";
}

/** Columns by call depth from the callers nobody calls; rows within. */
export function layout(edges) {
  const nodes = new Map();
  const node = (id, label) => {
    if (!nodes.has(id)) nodes.set(id, { id, label, in: [], out: [], depth: 0 });
    return nodes.get(id);
  };
  for (const e of edges) {
    node(e.from, e.fromLabel).out.push(e);
    node(e.to, e.toLabel).in.push(e);
  }
  // Longest path from a root, bounded so a cycle cannot loop forever.
  for (let pass = 0; pass < nodes.size; pass++) {
    let changed = false;
    for (const e of edges) {
      const a = nodes.get(e.from);
      const b = nodes.get(e.to);
      if (a !== b && b.depth < a.depth + 1 && a.depth + 1 < nodes.size) {
        b.depth = a.depth + 1;
        changed = true;
      }
    }
    if (!changed) break;
  }
  const columns = [];
  for (const n of [...nodes.values()].sort((a, b) => a.label.localeCompare(b.label))) {
    (columns[n.depth] ||= []).push(n);
  }
  const W = 250;
  const H = 110;
  const tallest = Math.max(1, ...columns.map((c) => (c ? c.length : 0)));
  columns.forEach((col, d) => {
    (col || []).forEach((n, i) => {
      n.x = 90 + d * W;
      n.y = 60 + (i + (tallest - col.length) / 2) * H;
    });
  });
  return {
    nodes: [...nodes.values()],
    width: 180 + (columns.length - 1) * W + 90,
    height: 60 + tallest * H,
  };
}

export function graphPage(root, _arg, ctx) {
  const status = h("p", { class: "muted" }, "Loading…");
  const canvas = h("div", { class: "graph", id: "service-graph" });
  const legend = h(
    "p",
    { class: "legend" },
    h("span", { class: "dot ok" }),
    " errors < 1%  ",
    h("span", { class: "dot warn" }),
    " < 5%  ",
    h("span", { class: "dot bad" }),
    " ≥ 5%  · edges: requests/s · error % · p99 (TCP: connections/s)",
  );
  root.append(panel("Service graph", status, canvas, legend));
  return every(10_000, async () => {
    try {
      const edges = mergeEdges(await sql(edgesQuery(ctx.range)), ctx.range);
      draw(canvas, edges);
      status.textContent = edges.length
        ? `${edges.length} edges over the last ${ctx.range / 60} minutes, refreshed every 10 s.`
        : "No traffic in this range yet. Rollups close every 10 s.";
    } catch (e) {
      status.replaceChildren(errorBox(e));
    }
  });
}

/**
 * Moves edge labels that would overlap apart, top to bottom: a label that
 * collides with one already placed goes below it.
 */
function separate(labels) {
  const LINE = 13;
  const placed = [];
  for (const l of labels.sort((a, b) => a.y - b.y || a.x - b.x)) {
    let moved = true;
    for (let tries = 0; moved && tries < 20; tries++) {
      moved = false;
      for (const p of placed) {
        if (Math.abs(p.x - l.x) < (p.w + l.w) / 2 + 4 && Math.abs(p.y - l.y) < LINE) {
          l.y = p.y + LINE;
          moved = true;
        }
      }
    }
    l.text.setAttribute("y", l.y);
    placed.push(l);
  }
}

/** The point at `t` of a cubic Bézier curve. */
function bezier([p0, p1, p2, p3], t) {
  const u = 1 - t;
  return [0, 1].map((i) => u * u * u * p0[i] + 3 * u * u * t * p1[i] + 3 * u * t * t * p2[i] + t * t * t * p3[i]);
}

function draw(canvas, edges) {
  const { nodes, width, height } = layout(edges);
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const root = svg("svg", {
    width,
    height,
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": "Service graph",
  });
  const defs = svg("defs");
  for (const cls of ["ok", "warn", "bad", "idle"]) {
    defs.append(
      svg(
        "marker",
        { id: `arrow-${cls}`, viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
        svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: `arrow ${cls}` }),
      ),
    );
  }
  root.append(defs);
  const labels = [];
  for (const e of edges) {
    const a = byId.get(e.from);
    const b = byId.get(e.to);
    const cls = health(e.errors, e.requests);
    const back = b.x <= a.x;
    // A cubic curve: forward edges leave right and enter left; an edge
    // back to an earlier column loops below.
    const pts = back
      ? [
          [a.x, a.y + 30],
          [a.x, a.y + 100],
          [b.x, b.y + 100],
          [b.x, b.y + 32],
        ]
      : [
          [a.x + 34, a.y],
          [(a.x + b.x) / 2, a.y],
          [(a.x + b.x) / 2, b.y],
          [b.x - 36, b.y],
        ];
    const d = `M ${pts[0]} C ${pts[1]}, ${pts[2]}, ${pts[3]}`;
    const label = e.tcp
      ? `${fmtRate(e.rps)} conn/s`
      : `${fmtRate(e.rps)} rps · ${fmtPct(e.errors)} · ${fmtUs(e.p99)}`;
    // Labels nearer the callee than the middle, where a caller's edges
    // fan out and would overlap.
    const [mx, my] = bezier(pts, back ? 0.5 : 0.72);
    const text = svg("text", { x: mx, y: my - 4, "text-anchor": "middle" }, label);
    labels.push({ x: mx, y: my - 4, w: label.length * 6.3, text });
    root.append(
      svg(
        "g",
        { class: `edge ${cls}`, "data-from": a.label, "data-to": b.label },
        svg("title", {}, `${a.label} → ${b.label} (${e.service}): ${label}`),
        svg("path", { d, "marker-end": `url(#arrow-${cls})` }),
        text,
      ),
    );
  }
  separate(labels);
  for (const n of nodes) {
    const worst = n.in.reduce((w, e) => Math.max(w, e.requests ? e.errors : 0), 0);
    const traffic = n.in.reduce((s, e) => s + e.requests, 0);
    const cls = n.in.length ? health(worst, traffic) : "idle";
    const into = n.in.find((e) => e.service);
    const service = into && into.service;
    const g = svg(
      "g",
      {
        class: `node ${cls}${service ? " link" : ""}`,
        "data-node": n.label,
        transform: `translate(${n.x} ${n.y})`,
        onclick: service ? () => (location.hash = `#/service/${encodeURIComponent(into.namespace)}/${encodeURIComponent(service)}`) : undefined,
      },
      svg("title", {}, service ? `${n.label}: open service ${service}` : n.label),
      svg("circle", { r: 30 }),
      svg("text", { y: 48, "text-anchor": "middle" }, n.label),
    );
    if (n.in.length) {
      const rps = n.in.reduce((s, e) => s + e.rps, 0);
      g.append(svg("text", { y: 5, "text-anchor": "middle", class: "inner" }, fmtRate(rps)));
    }
    root.append(g);
  }
  canvas.replaceChildren(root);
}
