// Policy: every policy and whether it is on and why, the alerts that
// switch them, the rules, and the recent policy events.

import { getJson, sql } from "./api.js";
import { h, every, errorBox, fmtTime, panel, table } from "./util.js";

export function policyPage(root) {
  const policies = h("div");
  const alerts = h("div");
  const rules = h("div");
  const events = h("div");
  root.append(
    h("div", { class: "grid2" }, panel("Policies", policies), panel("Alerts", alerts)),
    panel("Policy events (newest first)", events),
    panel("Alerting rules", rules),
  );
  const missing = (e) =>
    e.status === 404 ? errorBox("No rule engine on this port: policies and alerts are served where `lumen up` or `lumen demo` runs the policy engine.") : errorBox(e);
  return every(5000, async () => {
    const [p, a, r, ev] = await Promise.allSettled([
      getJson("api/v1/policies"),
      getJson("api/v1/alerts"),
      getJson("api/v1/rules?type=alert"),
      sql("SELECT time, kind, name, target, old_state, new_state, value, reason FROM policy_events ORDER BY time DESC LIMIT 50"),
    ]);
    if (p.status === "fulfilled") {
      const list = p.value.data.policies || [];
      policies.replaceChildren(
        table(
          [
            { key: "policy", label: "Policy" },
            { key: "kind", label: "Kind" },
            { key: "target", label: "Target" },
            { key: "state", label: "State", fmt: (v) => h("span", { class: `state ${v}` }, v) },
            { key: "why", label: "Why" },
          ],
          list.map((x) => ({ ...x, state: x.on ? (x.dry_run ? "dry-run" : "enforcing") : "off" })),
          { id: "policies", empty: "No policies configured." },
        ),
      );
    } else policies.replaceChildren(missing(p.reason));
    if (a.status === "fulfilled") {
      const list = a.value.data.alerts || [];
      alerts.replaceChildren(
        table(
          [
            { key: "name", label: "Alert" },
            { key: "state", label: "State", fmt: (v) => h("span", { class: `state ${v}` }, v) },
            { key: "labels", label: "Labels" },
            { key: "activeAt", label: "Active since", fmt: fmtTime },
            { key: "value", label: "Value", num: true },
          ],
          list.map((x) => ({
            name: x.labels.alertname,
            state: x.state,
            labels: Object.entries(x.labels)
              .filter(([k]) => k !== "alertname")
              .map(([k, v]) => `${k}=${v}`)
              .join(" "),
            activeAt: x.activeAt,
            value: x.value,
          })),
          { id: "alerts", empty: "No alert is pending or firing." },
        ),
      );
    } else alerts.replaceChildren(missing(a.reason));
    if (r.status === "fulfilled") {
      const list = (r.value.data.groups || []).flatMap((g) => g.rules.map((x) => ({ ...x, group: g.name })));
      rules.replaceChildren(
        table(
          [
            { key: "group", label: "Group" },
            { key: "name", label: "Rule" },
            { key: "state", label: "State", fmt: (v) => h("span", { class: `state ${v}` }, v) },
            { key: "query", label: "Expression", fmt: (v) => h("code", {}, v) },
            { key: "health", label: "Health" },
          ],
          list,
          { id: "rules", empty: "No alerting rules." },
        ),
      );
    } else rules.replaceChildren(missing(r.reason));
    if (ev.status === "fulfilled") {
      events.replaceChildren(
        table(
          [
            { key: "time", label: "Time", fmt: fmtTime },
            { key: "kind", label: "Kind" },
            { key: "name", label: "Name" },
            { key: "target", label: "Target" },
            { key: "old_state", label: "From" },
            { key: "new_state", label: "To", fmt: (v) => h("span", { class: `state ${v}` }, v) },
            { key: "value", label: "Value", num: true, fmt: (v) => (v === null ? "" : String(+Number(v).toPrecision(4))) },
            { key: "reason", label: "Reason" },
          ],
          ev.value,
          { id: "policy-events", empty: "No policy events yet." },
        ),
      );
    } else events.replaceChildren(errorBox(ev.reason));
  });
}
