#!/usr/bin/env python3
"""Writes Lumen's own Grafana dashboards (dashboards/lumen/*.json).

The JSON files are committed; run this after changing a panel here so the
files and this script agree: `python3 dashboards/lumen/build.py`. The
panels read Lumen through the data sources `dashboards/provisioning/`
defines: its Prometheus API (uid `lumen-prometheus`), its Postgres wire
(uid `lumen-sql`) and its Jaeger API (uid `lumen-jaeger`).
"""

import json
import pathlib

PROM = {"type": "prometheus", "uid": "lumen-prometheus"}
SQL = {"type": "grafana-postgresql-datasource", "uid": "lumen-sql"}
JAEGER = {"type": "jaeger", "uid": "lumen-jaeger"}

# Opens a trace in the Jaeger data source (Explore) from a row's trace_id.
TRACE_LINK = {
    "title": "Open the trace",
    "url": "",
    "internal": {
        "datasourceUid": "lumen-jaeger",
        "datasourceName": "Lumen traces",
        "query": {"query": "${__value.raw}"},
    },
}


class Board:
    def __init__(self, uid, title, description):
        self.uid, self.title, self.description = uid, title, description
        self.panels, self.variables, self.y, self.x, self.row_h = [], [], 0, 0, 0

    def var_sql(self, name, label, sql, multi=True):
        self.variables.append({
            "name": name, "label": label, "type": "query", "datasource": SQL,
            "query": sql, "definition": sql, "refresh": 2, "sort": 1,
            "multi": multi, "includeAll": multi,
            "current": {"selected": True, "text": "All", "value": "$__all"} if multi else {},
        })

    def panel(self, kind, title, description, targets, w=12, h=8, **extra):
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_h
            self.row_h = 0
        p = {
            "id": len(self.panels) + 1, "type": kind, "title": title,
            "description": description,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "datasource": targets[0]["datasource"], "targets": targets,
        }
        p.update(extra)
        self.panels.append(p)
        self.x += w
        self.row_h = max(self.row_h, h)

    def json(self):
        return {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["lumen"], "timezone": "browser", "schemaVersion": 39, "version": 1,
            "editable": True, "graphTooltip": 1, "refresh": "10s",
            "time": {"from": "now-15m", "to": "now"},
            "templating": {"list": self.variables}, "panels": self.panels,
            "links": [{"title": "Lumen dashboards", "type": "dashboards", "tags": ["lumen"],
                       "asDropdown": True}],
        }


def sql(ref, text, fmt="table"):
    return {"refId": ref, "datasource": SQL, "rawSql": " ".join(text.split()),
            "format": fmt, "rawQuery": True, "editorMode": "code"}


def prom(ref, expr, legend):
    return {"refId": ref, "datasource": PROM, "expr": expr, "legendFormat": legend,
            "range": True}


SERVICE = "destination_service IN (${service:sqlstring})"
# What the rollups count as an error: 5xx, gRPC failures, HTTP requests
# with no answer; TCP connections only when the proxy flagged them.
FAILED = ("(status >= 500 OR grpc_status > 0 OR (protocol <> 'tcp' AND status = 0) "
          "OR (protocol = 'tcp' AND response_flags <> '-'))")
NS = "destination_namespace IN (${namespace:sqlstring})"


def traffic():
    b = Board("lumen-traffic", "Lumen / Traffic explorer",
              "Every request the sidecars recorded, in SQL over the requests table.")
    b.var_sql("namespace", "Namespace",
              "SELECT DISTINCT destination_namespace FROM rollups WHERE $__timeFilter(time)")
    b.var_sql("service", "Service",
              "SELECT DISTINCT destination_service FROM rollups WHERE $__timeFilter(time) "
              "AND destination_namespace IN (${namespace:sqlstring})")
    b.var_sql("workload", "Workload",
              "SELECT DISTINCT destination_workload FROM rollups WHERE $__timeFilter(time) "
              "AND destination_service IN (${service:sqlstring})")
    filt = f"$__timeFilter(time) AND reporter = 'destination' AND {NS} AND {SERVICE} " \
           "AND destination_workload IN (${workload:sqlstring})"
    b.panel("timeseries", "Requests per second by service",
            "As the destination sidecars saw them, from the 10 s rollups.",
            [sql("A", f"""SELECT $__timeGroupAlias(time, 10s), destination_service AS metric,
                 sum(requests) / 10.0 AS rps FROM rollups WHERE window_seconds = 10 AND {filt}
                 GROUP BY 1, 2 ORDER BY 1""", "time_series")],
            fieldConfig={"defaults": {"unit": "reqps"}, "overrides": []})
    b.panel("timeseries", "p99 latency by service",
            "Istio's duration histogram; click a point to find its traces.",
            [prom("A", 'histogram_quantile(0.99, sum by (destination_service_name, le) '
                       '(rate(istio_request_duration_milliseconds_bucket{reporter="destination", '
                       'destination_service_name=~"${service:regex}"}[$__rate_interval])))',
                  "{{destination_service_name}}")],
            fieldConfig={"defaults": {"unit": "ms", "links": [{
                "title": "Traces of ${__field.labels.destination_service_name}",
                "url": "", "internal": {"datasourceUid": "lumen-jaeger",
                                        "datasourceName": "Lumen traces",
                                        "query": {"queryType": "search",
                                                  "service": "${__field.labels.destination_service_name}"}}}]},
                "overrides": []})
    links = {"defaults": {}, "overrides": [{
        "matcher": {"id": "byName", "options": "trace_id"},
        "properties": [{"id": "links", "value": [TRACE_LINK]}]}]}
    b.panel("table", "Slowest requests",
            "The 50 slowest in the range; trace_id opens the trace.",
            [sql("A", f"""SELECT time, source_workload, destination_workload, method, path, status,
                 duration_us / 1000.0 AS ms, trace_id FROM requests WHERE {filt}
                 ORDER BY duration_us DESC LIMIT 50""")],
            w=24, h=9, fieldConfig=links)
    b.panel("table", "Errors",
            "5xx, gRPC failures, requests that got no answer and flagged TCP connections, newest "
            "first; trace_id opens the trace.",
            [sql("A", f"""SELECT time, source_workload, destination_workload, path, status, grpc_status,
                 response_flags, trace_id FROM requests WHERE {filt}
                 AND {FAILED} ORDER BY time DESC LIMIT 100""")],
            w=24, h=9, fieldConfig=links)
    b.panel("table", "Top paths per service",
            "Requests, errors and p99 by service and path.",
            [sql("A", f"""SELECT destination_service, path, count(*) AS requests,
                 sum(CASE WHEN {FAILED} THEN 1 ELSE 0 END) AS errors,
                 approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY duration_us) / 1000.0 AS p99_ms FROM requests
                 WHERE {filt} GROUP BY 1, 2 ORDER BY requests DESC LIMIT 50""")],
            w=24, h=9)
    return b


def policy():
    b = Board("lumen-policy", "Lumen / Policy",
              "What the policy engine decided, and what the sidecars refused because of it.")
    b.panel("table", "Policies and alerts now",
            "Each alert's and policy's latest state, from policy_events.",
            [sql("A", """SELECT kind, name, last_value(target ORDER BY time) AS target,
                 last_value(new_state ORDER BY time) AS state, max(time) AS since,
                 last_value(reason ORDER BY time) AS reason FROM policy_events GROUP BY kind, name
                 ORDER BY since DESC""")], w=24, h=8)
    b.panel("timeseries", "Limited (429) and denied (403) requests per second",
            "By destination service, as the sidecars answered them.",
            [prom("A", 'sum by (destination_service) (rate(istio_requests_total{reporter="source", '
                       'response_code="429"}[$__rate_interval]))', "429 {{destination_service}}"),
             prom("B", 'sum by (destination_service) (rate(istio_requests_total{reporter="destination", '
                       'response_code="403"}[$__rate_interval]))', "403 {{destination_service}}")],
            fieldConfig={"defaults": {"unit": "reqps"}, "overrides": []})
    b.panel("timeseries", "Error ratio by service",
            "What the shipped ServiceHighErrorRate alert watches.",
            [prom("A", 'sum by (destination_service) (rate(istio_requests_total{reporter="destination", '
                       'response_code=~"5.."}[$__rate_interval])) / sum by (destination_service) '
                       '(rate(istio_requests_total{reporter="destination"}[$__rate_interval]))',
                  "{{destination_service}}")],
            fieldConfig={"defaults": {"unit": "percentunit"}, "overrides": []})
    b.panel("table", "Policy changes",
            "Every change of an alert or policy in the range, newest first.",
            [sql("A", """SELECT time, kind, name, target, old_state, new_state, value, reason
                 FROM policy_events WHERE $__timeFilter(time) ORDER BY time DESC LIMIT 200""")],
            w=24, h=10)
    return b


def collector():
    b = Board("lumen-collector", "Lumen / Collector health",
              "The collector and query service, from Lumen's own metrics (recorded every 15 s "
              "as job=\"lumen\").")
    rate = "[$__rate_interval]"
    b.panel("timeseries", "Items ingested per second",
            "Spans, records, data points and log records, by signal and outcome.",
            [prom("A", f'sum by (signal, outcome) (rate(lumen_ingest_items_total{{job="lumen"}}{rate}))',
                  "{{signal}} {{outcome}}")],
            fieldConfig={"defaults": {"unit": "ops"}, "overrides": []})
    b.panel("timeseries", "Payloads refused per second",
            "By reason (invalid, busy, memory, storage, shutdown); 0 when none.",
            [prom("A", f'sum by (reason) (rate(lumen_ingest_refused_total{{job="lumen"}}{rate})) '
                       f'or on () vector(0)', "{{reason}}")],
            fieldConfig={"defaults": {"unit": "ops"}, "overrides": []})
    b.panel("timeseries", "WAL fsync p99",
            "How long making ingested data durable takes.",
            [prom("A", f'histogram_quantile(0.99, sum by (le) '
                       f'(rate(lumen_wal_fsync_seconds_bucket{{job="lumen"}}{rate})))', "p99")],
            fieldConfig={"defaults": {"unit": "s"}, "overrides": []})
    b.panel("timeseries", "Flushes and compactions",
            "Hot rows written to Parquet, and small files merged, per 5 minutes.",
            [prom("A", 'sum by (outcome) (increase(lumen_flushes_total{job="lumen"}[5m])) '
                       'or on () vector(0)', "flushes {{outcome}}"),
             prom("B", 'sum(increase(lumen_compactions_total{job="lumen"}[5m])) or on () vector(0)',
                  "compactions")])
    b.panel("timeseries", "Rows per table",
            "In memory and in Parquet files.",
            [prom("A", 'sum by (table) (lumen_table_rows{job="lumen"})', "{{table}}")],
            fieldConfig={"defaults": {"unit": "short"}, "overrides": []})
    b.panel("timeseries", "Bytes per table",
            "Parquet files and hot rows.",
            [prom("A", 'sum by (table) (lumen_table_bytes{job="lumen"})', "{{table}}")],
            fieldConfig={"defaults": {"unit": "bytes"}, "overrides": []})
    b.panel("timeseries", "Queries per second by outcome",
            "SQL, PromQL, Postgres wire and Flight SQL queries, as they ended.",
            [prom("A", f'sum by (outcome) (rate(lumen_queries_total{{job="lumen"}}{rate}))',
                  "{{outcome}}")],
            w=24, fieldConfig={"defaults": {"unit": "ops"}, "overrides": []})
    return b


def proxy():
    b = Board("lumen-proxy", "Lumen / Proxy fleet",
              "Every sidecar and gateway: which config it runs, retries, outlier ejections, "
              "connection pools and its telemetry — from the stats each proxy pushes every 15 s "
              "(job=\"<namespace>/<service>\", instance = the proxy) and the control plane's "
              "view of them (job=\"lumen\").")
    rate = "[$__rate_interval]"
    b.panel("table", "Config version per proxy",
            "The version each connected proxy acknowledged and whether it is the one served "
            "(synced), an older one (stale) or refused (rejected): istioctl proxy-status.",
            [dict(prom("A", 'max by (proxy, workload, namespace, version, state) '
                            '(lumen_control_proxy_config_info{job="lumen"})', ""),
                  format="table", instant=True, range=False)],
            w=16, h=9, transformations=[{"id": "organize", "options": {
                "excludeByName": {"Time": True, "Value": True}}}])
    b.panel("stat", "Proxies not in sync",
            "Connected proxies whose config is stale or refused; 0 when all run the served one.",
            [prom("A", 'count(lumen_control_proxy_config_info{job="lumen",state!="synced"}) '
                       'or on () vector(0)', "not synced"),
             prom("B", 'sum(pilot_xds{job="lumen"})', "connected")],
            w=8, h=9)
    b.panel("timeseries", "Config refusals (NACK)",
            "Snapshots proxies refused, per 5 minutes (their last good config stays).",
            [prom("A", 'sum(increase(pilot_total_xds_rejects{job="lumen"}[5m])) or on () vector(0)',
                  "refused")])
    b.panel("timeseries", "Retries per second by proxy",
            "Retries sent upstream, and retries the retry budget held back.",
            [prom("A", f'sum by (instance) (rate(lumen_upstream_retries_total{rate}))', "{{instance}}"),
             prom("B", f'sum(rate(lumen_upstream_retries_budget_exhausted_total{rate})) '
                       f'or on () vector(0)', "held back by the budget")],
            fieldConfig={"defaults": {"unit": "ops"}, "overrides": []})
    b.panel("table", "Retried requests by service",
            "From the callers' records: requests that needed a retry, and retries sent.",
            [sql("A", """SELECT destination_service AS service,
                 sum(CASE WHEN retries > 0 THEN 1 ELSE 0 END) AS retried_requests,
                 sum(retries) AS retries, count(*) AS requests
                 FROM requests WHERE $__timeFilter(time) AND reporter = 'source'
                 GROUP BY 1 ORDER BY 3 DESC, 1""")])
    b.panel("timeseries", "Endpoints ejected by outlier detection",
            "Per cluster, across the proxies that call it.",
            [prom("A", 'sum by (cluster_name) (envoy_cluster_outlier_detection_ejections_active)',
                  "{{cluster_name}}")])
    b.panel("timeseries", "Requests in flight per cluster",
            "Sent and not yet answered, summed over the proxies: the connection pools' load.",
            [prom("A", 'sum by (cluster_name) (envoy_cluster_upstream_rq_active)', "{{cluster_name}}"),
             prom("B", 'sum(envoy_cluster_upstream_rq_pending_active) or on () vector(0)',
                  "waiting for a connection (maxConnections)")])
    b.panel("timeseries", "TCP connections open per cluster",
            "TCP-proxied connections (and tunnels) open now, summed over the proxies.",
            [prom("A", 'sum by (cluster_name) (envoy_cluster_upstream_cx_active)', "{{cluster_name}}")])
    b.panel("timeseries", "Request records exported and dropped",
            "Records the collector acknowledged, and records dropped by reason; drops never "
            "fail a request.",
            [prom("A", f'sum(rate(lumen_telemetry_records_exported_total{rate}))', "exported"),
             prom("B", f'sum by (reason) (rate(lumen_telemetry_records_dropped_total{rate}))',
                  "dropped {{reason}}")],
            fieldConfig={"defaults": {"unit": "ops"}, "overrides": []})
    b.panel("timeseries", "Downstream refusals by reason",
            "Connections and requests the proxies' limits and timeouts refused.",
            [prom("A", f'sum by (reason) (rate(lumen_downstream_refused_total{rate}))', "{{reason}}")],
            fieldConfig={"defaults": {"unit": "ops"}, "overrides": []})
    return b


def main():
    here = pathlib.Path(__file__).resolve().parent
    for board in (traffic(), policy(), collector(), proxy()):
        name = board.uid.removeprefix("lumen-")
        (here / f"{name}.json").write_text(json.dumps(board.json(), indent=2) + "\n")


if __name__ == "__main__":
    main()
