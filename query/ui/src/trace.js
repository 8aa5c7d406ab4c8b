// Trace view: the waterfall of one trace — each sidecar's client and
// server records and the apps' own spans, nested by parent — from the
// Jaeger API the query port serves. A span opens its tags.

import { trace as getTrace } from "./api.js";
import { h, errorBox, fmtUs, panel } from "./util.js";

/** Spans in tree order (children under their parent, by start), with depth. */
export function order(spans) {
  const byId = new Map(spans.map((s) => [s.spanID, s]));
  const children = new Map();
  const roots = [];
  for (const s of spans) {
    const parent = (s.references || []).find((r) => r.refType === "CHILD_OF" && byId.has(r.spanID));
    if (parent) {
      if (!children.has(parent.spanID)) children.set(parent.spanID, []);
      children.get(parent.spanID).push(s);
    } else {
      roots.push(s);
    }
  }
  const out = [];
  const visit = (s, depth) => {
    if (out.length > spans.length) return; // a cycle in bad data
    out.push({ span: s, depth });
    for (const c of (children.get(s.spanID) || []).sort((a, b) => a.startTime - b.startTime)) visit(c, depth + 1);
  };
  for (const r of roots.sort((a, b) => a.startTime - b.startTime)) visit(r, 0);
  return out;
}

function tag(span, key) {
  const t = (span.tags || []).find((x) => x.key === key);
  return t ? t.value : undefined;
}

export function tracePage(root, id) {
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  root.append(h("h1", {}, "Trace ", h("code", {}, id || "")), body);
  if (!id) {
    body.replaceChildren(errorBox("No trace id: open a trace from the live tail or a service page."));
    return null;
  }
  // A trace opened as it happens fills in as its records and the apps'
  // spans arrive (each sender sends in batches): look again every few
  // seconds while it is recent, redrawing when it has grown.
  let shown = 0;
  let attempts = 0;
  let timer = null;
  const load = async () => {
    let recent = false;
    attempts++;
    try {
      const t = await getTrace(id);
      if (!t || !t.spans || !t.spans.length) {
        body.replaceChildren(errorBox(`Trace ${id} was not found (its records may not have arrived yet, or are past retention).`));
        recent = shown === 0 && attempts < 10;
      } else {
        if (t.spans.length !== shown) {
          shown = t.spans.length;
          draw(body, t);
        }
        const end = Math.max(...t.spans.map((s) => s.startTime + s.duration)) / 1000;
        recent = Date.now() - end < RECENT_MS;
      }
    } catch (e) {
      body.replaceChildren(errorBox(e));
    }
    if (recent) timer = setTimeout(load, 3000);
  };
  load();
  return () => clearTimeout(timer);
}

/** How long after its last span a trace may still be growing. */
const RECENT_MS = 30_000;

function draw(body, t) {
  const rows = order(t.spans);
  const start = Math.min(...t.spans.map((s) => s.startTime));
  const end = Math.max(...t.spans.map((s) => s.startTime + s.duration));
  const total = Math.max(1, end - start);
  const services = new Set(Object.values(t.processes || {}).map((p) => p.serviceName));
  const details = h("div", { class: "span-details" }, h("p", { class: "muted" }, "Click a span for its tags."));
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => h("span", { style: { left: `${f * 100}%` } }, fmtUs(f * total)));
  const list = h(
    "div",
    { class: "waterfall", id: "waterfall" },
    h("div", { class: "wf-row wf-head" }, h("div", { class: "wf-name" }, "Service · operation"), h("div", { class: "wf-track ticks" }, ticks)),
    rows.map(({ span, depth }) => {
      const service = (t.processes[span.processID] || {}).serviceName || "?";
      const kind = tag(span, "span.kind") || "";
      const code = tag(span, "http.status_code");
      const failed = tag(span, "error") === true || Number(code) >= 500;
      // A sidecar's record, or the app's own span.
      const source = tag(span, "component") === "lumen-proxy" ? "proxy" : "app";
      const left = ((span.startTime - start) / total) * 100;
      const width = Math.max(0.3, (span.duration / total) * 100);
      return h(
        "div",
        {
          class: `wf-row link${failed ? " failed" : ""}`,
          "data-span": span.spanID,
          "data-source": source,
          tabindex: 0,
          onclick: () => show(details, span, service, span.startTime - start),
          onkeydown: (e) => e.key === "Enter" && show(details, span, service, span.startTime - start),
        },
        h(
          "div",
          { class: "wf-name", style: { paddingLeft: `${depth * 14 + 4}px` }, title: span.operationName },
          h("b", {}, service),
          " ",
          span.operationName,
          kind ? h("span", { class: "tag" }, kind) : null,
          source === "proxy" ? h("span", { class: "tag" }, "sidecar") : null,
        ),
        h(
          "div",
          { class: "wf-track" },
          h("div", { class: `wf-bar ${kind}`, style: { left: `${left}%`, width: `${width}%` } }),
          // The duration after the bar, or inside its end when the bar
          // reaches the right edge.
          left + width > 82
            ? h("span", { class: "wf-dur inside", style: { right: `${100 - left - width}%` } }, fmtUs(span.duration))
            : h("span", { class: "wf-dur", style: { left: `${left + width}%` } }, fmtUs(span.duration)),
        ),
      );
    }),
  );
  body.replaceChildren(
    h("p", { class: "muted" }, `${t.spans.length} spans across ${services.size} services, ${fmtUs(total)} end to end.`),
    panel("Waterfall", list),
    panel("Span", details),
  );
}

function show(details, span, service, offset) {
  details.replaceChildren(
    h("h3", {}, service, " · ", span.operationName),
    h("p", {}, `Span ${span.spanID}: started ${fmtUs(offset)} into the trace, lasted ${fmtUs(span.duration)}.`),
    h(
      "table",
      { class: "data" },
      h(
        "tbody",
        {},
        (span.tags || []).map((x) => h("tr", {}, h("th", {}, x.key), h("td", {}, String(x.value)))),
      ),
    ),
  );
}
