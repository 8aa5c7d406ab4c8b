// The query port's HTTP APIs, as the UI calls them. Paths are relative, so
// the UI works behind a path prefix (`kubectl proxy`, an ingress).

import { tableFromIPC } from "apache-arrow";

/** An API error with the server's message (Prometheus's error shape). */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function failure(r) {
  const text = await r.text();
  try {
    const body = JSON.parse(text);
    return new ApiError(r.status, body.error || text);
  } catch {
    return new ApiError(r.status, `${r.status} ${r.statusText}: ${text.slice(0, 300)}`);
  }
}

/** SQL → rows as objects (JSON). */
export async function sql(query, { signal } = {}) {
  const r = await fetch("api/v1/sql", {
    method: "POST",
    body: query,
    headers: { Accept: "application/json", "Content-Type": "text/plain" },
    signal,
  });
  if (!r.ok) throw await failure(r);
  return r.json();
}

/**
 * SQL → an Arrow table (typed: timestamps stay timestamps). `label` tags
 * the query in the running-queries API so it can be cancelled there.
 */
export async function sqlArrow(query, { signal, label } = {}) {
  const headers = { Accept: "application/vnd.apache.arrow.stream", "Content-Type": "text/plain" };
  if (label) headers["X-Lumen-Query-Label"] = label;
  const r = await fetch("api/v1/sql", { method: "POST", body: query, headers, signal });
  if (!r.ok) throw await failure(r);
  const bytes = new Uint8Array(await r.arrayBuffer());
  return tableFromIPC(bytes);
}

/** The queries running now (`GET /api/v1/queries`). */
export async function runningQueries() {
  return (await getJson("api/v1/queries")).queries || [];
}

/** Cancels a running query by id. */
export async function cancelQuery(id) {
  const r = await fetch(`api/v1/queries/${encodeURIComponent(id)}`, { method: "DELETE" });
  if (!r.ok) throw await failure(r);
  return r.json();
}

export async function getJson(path, { signal } = {}) {
  const r = await fetch(path, { headers: { Accept: "application/json" }, signal });
  if (!r.ok) throw await failure(r);
  return r.json();
}

/** A Jaeger trace (`/api/traces/{id}`). */
export async function trace(id) {
  const body = await getJson(`api/traces/${encodeURIComponent(id)}`);
  return (body.data && body.data[0]) || null;
}
