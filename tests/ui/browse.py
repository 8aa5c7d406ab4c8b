"""Drives Lumen's web UI in real Chromium (Playwright), as a user would,
against a running `lumen demo`; asserts what the user sees on every page
and saves a screenshot of each into the directory given.

    python3 tests/ui/browse.py http://127.0.0.1:9900 SCREENSHOT_DIR

Exits non-zero with the failed check's message. Run by tests/tests/ui.rs.
"""

import json
import os
import re
import sys
import urllib.request

from playwright.sync_api import expect, sync_playwright

BASE = sys.argv[1].rstrip("/")
SHOTS = sys.argv[2]
CHROMIUM = os.environ.get("LUMEN_CHROMIUM", "/usr/bin/chromium")
os.makedirs(SHOTS, exist_ok=True)
expect.set_options(timeout=45_000)


def metric(name_and_labels):
    """A sample of the query port's /metrics, 0 if absent."""
    text = urllib.request.urlopen(f"{BASE}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name_and_labels + " "):
            return float(line.split()[-1])
    return 0.0


def running_queries():
    body = urllib.request.urlopen(f"{BASE}/api/v1/queries", timeout=10).read()
    return json.loads(body)["queries"]


def shot(page, name, full_page=True):
    page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=full_page)


def cell_texts(page, table_id, column):
    """The text of one column (0-based) of a table's body rows."""
    return page.locator(f"#{table_id} tbody tr td:nth-child({column + 1})").all_inner_texts()


def check_graph(page):
    page.goto(f"{BASE}/")
    graph = page.locator("#service-graph svg")
    expect(graph).to_be_visible()
    for workload in ["productpage-v1", "details-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1"]:
        expect(page.locator(f'#service-graph g.node[data-node="{workload}"]')).to_be_visible()
    # The demo's calls, each with its rate, error ratio and p99.
    edge = page.locator('#service-graph g.edge[data-from="productpage-v1"][data-to="details-v1"]')
    expect(edge).to_have_count(1)
    expect(edge.locator("text")).to_have_text(re.compile(r"^[\d.]+ rps · [\d.]+% · [\d.]+ (µs|ms|s)$"))
    # ratings v2 reads MongoDB over TCP: an edge in connections per second.
    expect(page.locator('#service-graph g.edge[data-from="ratings-v2"][data-to="mongodb-v1"] text')).to_have_text(
        re.compile(r"conn/s")
    )
    # The callee's record of that connection cannot name its caller; the
    # caller's record does, so no edge comes from "unknown".
    expect(page.locator('#service-graph g.edge[data-from="unknown"][data-to="mongodb-v1"]')).to_have_count(0)
    # The demo sends 50 requests/s into productpage: the edge says so.
    ingress = page.locator('#service-graph g.edge[data-from="loadgen-v1"][data-to="productpage-v1"] text')
    rps = float(re.match(r"([\d.]+) rps", ingress.text_content())[1])
    assert 25 <= rps <= 75, ingress.text_content()
    # Healthy demo traffic is green.
    assert "ok" in (edge.get_attribute("class") or ""), edge.get_attribute("class")
    shot(page, "1-service-graph")
    # A node opens its service's page.
    page.locator('#service-graph g.node[data-node="reviews-v2"]').click()
    expect(page).to_have_url(re.compile(r"#/service/default/reviews$"))


def check_service(page):
    expect(page.locator("h1")).to_contain_text("reviews")
    # Latency percentiles and rate over time, one line per version.
    charts = page.locator(".chart canvas")
    expect(charts).to_have_count(2)
    legend = page.locator(".chart .u-legend").first
    for version in ["v1", "v2", "v3"]:
        expect(legend).to_contain_text(f"{version} p99")
    expect(page.locator("#status-codes tbody")).to_contain_text("200")
    expect(page.locator("#top-callers tbody")).to_contain_text("productpage-v1")
    expect(page.locator("#top-routes tbody tr").first).to_be_visible()
    shot(page, "2-service-reviews")
    # The slowest requests open their traces.
    expect(page.locator("#slowest tbody tr").first).to_be_visible()
    page.locator("#slowest tbody tr").first.click()
    expect(page).to_have_url(re.compile(r"#/trace/[0-9a-f]{32}$"))
    expect(page.locator("#waterfall .wf-row.link").first).to_be_visible()


def check_services(page):
    page.goto(f"{BASE}/#/services")
    table = page.locator("#red-table")
    expect(table).to_be_visible()
    for service in ["productpage", "details", "reviews", "ratings"]:
        expect(table.locator("tbody")).to_contain_text(service)
    # Sorting by p99: descending, then ascending on a second click.
    page.locator("#red-table th", has_text="p99").click()
    expect(page.locator("#red-table th.sorted")).to_have_text(re.compile("p99"))
    page.wait_for_timeout(200)

    def p99s():
        values = []
        for text in cell_texts(page, "red-table", 6):
            m = re.match(r"([\d.]+) (µs|ms|s)", text)
            if m:
                values.append(float(m[1]) * {"µs": 1, "ms": 1e3, "s": 1e6}[m[2]])
        return values

    values = p99s()
    assert len(values) >= 4 and values == sorted(values, reverse=True), values
    page.locator("#red-table th", has_text="p99").click()
    values = p99s()
    assert values == sorted(values), values
    shot(page, "3-services")
    page.locator("#red-table tbody tr", has_text="details").click()
    expect(page).to_have_url(re.compile(r"#/service/default/details$"))


def check_tail_and_trace(page):
    page.goto(f"{BASE}/#/tail")
    expect(page.locator("#tail tbody tr").first).to_be_visible()
    # Filter to one service: every row shown is that service's.
    expect(page.locator("#tail-service option", has_text="reviews")).to_have_count(1)
    page.select_option("#tail-service", "reviews")
    page.wait_for_timeout(2500)
    services = cell_texts(page, "tail", 2)
    assert services and all(s.startswith("reviews") for s in services), services
    # A minimum duration: every row at least that long.
    page.fill("#tail-min", "1")
    page.locator("#tail-min").dispatch_event("change")
    page.wait_for_timeout(2500)
    durations = cell_texts(page, "tail", 6)
    # reviews v2 and v3 call ratings: many of their requests take over 1 ms.
    assert durations, "no request of reviews took 1 ms or more"
    for text in durations:
        m = re.match(r"([\d.]+) (µs|ms|s)", text)
        assert m and float(m[1]) * {"µs": 1e-3, "ms": 1, "s": 1e3}[m[2]] >= 1, text
    page.fill("#tail-min", "")
    page.locator("#tail-min").dispatch_event("change")
    expect(page.locator("#tail tbody tr").first).to_be_visible()
    shot(page, "4-live-tail", full_page=False)
    page.locator("#tail tbody tr").first.click()
    expect(page).to_have_url(re.compile(r"#/trace/[0-9a-f]{32}$"))
    waterfall = page.locator("#waterfall")
    # productpage's call to reviews: the caller's and the callee's records.
    expect(waterfall).to_contain_text("reviews")
    expect(waterfall).to_contain_text("productpage")
    rows = page.locator("#waterfall .wf-row.link")
    assert rows.count() >= 2, rows.count()
    # Both sidecars' records of each hop, and the apps' own spans (which
    # may arrive a few seconds after the records: the page fills in).
    expect(page.locator('#waterfall .wf-row[data-source="app"]').first).to_be_visible()
    assert page.locator('#waterfall .wf-row[data-source="proxy"]').count() >= 2
    rows.first.click()
    expect(page.locator(".span-details table")).to_be_visible()
    shot(page, "5-trace")


def check_console(page):
    page.goto(f"{BASE}/#/sql")
    editor = page.locator("#sql-editor")
    query = (
        "SELECT destination_service, count(*) AS requests FROM requests "
        "WHERE reporter = 'destination' GROUP BY 1 ORDER BY 2 DESC"
    )
    editor.fill(query)
    page.click("#sql-run")
    expect(page.locator("#sql-status")).to_contain_text("rows in")
    expect(page.locator("#sql-table thead")).to_contain_text("destination_service")
    expect(page.locator("#sql-table tbody")).to_contain_text("productpage")
    expect(page.locator("#sql-history li").first).to_contain_text("count(*) AS requests")
    # A time series draws a chart.
    page.select_option("#sql-examples", label="p99 per service, 10 s windows (chart)")
    page.click("#sql-run")
    expect(page.locator("#sql-chart canvas")).to_have_count(1)
    expect(page.locator("#sql-chart .u-legend")).to_contain_text("reviews")
    shot(page, "6-sql-console")
    # Thousands of rows: all counted, only those in view drawn, the last
    # reached by scrolling.
    editor.fill("SELECT value FROM generate_series(1, 20000) ORDER BY value")
    editor.press("Control+Enter")
    expect(page.locator("#sql-status")).to_contain_text("20,000 rows")
    drawn = page.locator("#sql-table tbody tr td:not(.spacer)").count()
    assert 0 < drawn < 1000, drawn
    page.locator("#sql-scroll").evaluate("el => el.scrollTop = el.scrollHeight")
    expect(page.locator("#sql-table tbody")).to_contain_text("20000")
    # Bad SQL: the server's message, and the console still works.
    editor.fill("SELECT nope FROM requests")
    page.click("#sql-run")
    expect(page.locator("#sql-result .error")).to_contain_text("nope")
    # Cancel stops the query on the server, through the running-queries API.
    cancelled = metric('lumen_queries_total{outcome="cancelled"}')
    editor.fill(
        "SELECT sum(a.value * b.value) FROM generate_series(1, 200000) a(value) "
        "CROSS JOIN generate_series(1, 200000) b(value)"
    )
    page.click("#sql-run")
    expect(page.locator("#sql-cancel")).to_be_enabled()
    page.wait_for_timeout(800)
    assert any("console-" in q.get("origin", "") for q in running_queries()), running_queries()
    page.click("#sql-cancel")
    expect(page.locator("#sql-result .error")).to_contain_text("Cancelled")
    expect(page.locator("#sql-run")).to_be_enabled()
    page.wait_for_timeout(500)
    assert not any("console-" in q.get("origin", "") for q in running_queries()), running_queries()
    after = metric('lumen_queries_total{outcome="cancelled"}')
    assert after == cancelled + 1, (cancelled, after)
    shot(page, "7-sql-cancelled")


def check_policy(page):
    page.goto(f"{BASE}/#/policy")
    # The demo's conditional RateLimit, off while ratings is healthy, and
    # the shipped alerting rules that switch it.
    expect(page.locator("#policies tbody")).to_contain_text("default/shed-ratings")
    expect(page.locator("#policies tbody")).to_contain_text("RateLimit")
    expect(page.locator("#rules tbody")).to_contain_text("ServiceHighErrorRate")
    expect(page.locator("#policy-events")).to_be_visible()
    shot(page, "8-policy")


def main():
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on(
            "console",
            lambda m: errors.append(f"console {m.type}: {m.text}")
            if m.type == "error" and "status of 400" not in m.text and "status of 499" not in m.text
            else None,
        )
        for check in [check_graph, check_service, check_services, check_tail_and_trace, check_console, check_policy]:
            try:
                check(page)
            except Exception:
                shot(page, f"failed-{check.__name__}")
                raise
            print(f"ok {check.__name__}", flush=True)
        browser.close()
    assert not errors, "\n".join(errors)


if __name__ == "__main__":
    main()
