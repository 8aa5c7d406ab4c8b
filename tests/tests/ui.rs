//! Lumen's web UI at `/` on the query port, in real Chromium driven by
//! Playwright (`tests/ui/browse.py`) against `lumen demo`: the service
//! graph with the demo's calls, a service page with its charts and tables,
//! the RED table sorted by a column, the live tail filtered, a trace's
//! waterfall opened from a row, the SQL console (results, a chart, an
//! error, and Cancel stopping the query on the server), the policy page.
//! Each page's screenshot is saved under `CARGO_TARGET_TMPDIR/ui-screenshots`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};
use lumen_tests::{UpPorts, python, start_demo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_shows_the_demo_mesh_in_a_real_browser() -> Result<()> {
    let chromium = std::env::var("LUMEN_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        bail!(
            "{chromium} is missing: the UI is tested in real Chromium \
             (apt-get install -y --no-install-recommends chromium; scripts/test.sh does)"
        );
    }
    let dir = tempfile::tempdir()?;
    let ports = UpPorts::pick();
    let query = ports.query;
    let demo = start_demo(dir.path(), &dir.path().join("data"), ports, &[]).await?;
    let base = format!("http://127.0.0.1:{query}");

    // The page and its assets, as a browser fetches them: gzipped, and a
    // 304 for a copy it already has.
    let http = reqwest::Client::new();
    let index = http.get(format!("{base}/")).send().await?;
    assert_eq!(index.status(), 200);
    assert!(
        index.headers()["content-type"]
            .to_str()?
            .starts_with("text/html")
    );
    let page = index.text().await?;
    assert!(
        page.contains("ui/app.js") && page.contains("ui/app.css"),
        "{page}"
    );
    let script = http
        .get(format!("{base}/ui/app.js"))
        .header("accept-encoding", "gzip")
        .send()
        .await?;
    assert_eq!(script.headers()["content-encoding"], "gzip");
    let etag = script.headers()["etag"].clone();
    let again = http
        .get(format!("{base}/ui/app.js"))
        .header("if-none-match", etag)
        .send()
        .await?;
    assert_eq!(again.status(), 304);

    // Traffic through every hop, closed into rollups, before the browser
    // looks.
    let sql_url = format!("{base}/api/v1/sql");
    lumen_tests::wait_for_count(
        &sql_url,
        "SELECT count(*) AS n FROM rollups WHERE destination_service = 'mongodb'",
        1,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(20)).await;

    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    let script = lumen_tests::crate_dir().join("ui/browse.py");
    let out = tokio::task::spawn_blocking({
        let base = base.clone();
        let shots = shots.clone();
        move || {
            Command::new(python())
                .arg(script)
                .arg(&base)
                .arg(&shots)
                .env("LUMEN_CHROMIUM", chromium)
                .output()
        }
    })
    .await??;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{printed}\nscreenshots: {}", shots.display());
    if !out.status.success() {
        bail!(
            "the browser found a problem (screenshots in {}):\n{printed}\n{}",
            shots.display(),
            demo.logs()
        );
    }
    for page in [
        "1-service-graph",
        "2-service-reviews",
        "3-services",
        "4-live-tail",
        "5-trace",
        "6-sql-console",
        "7-sql-cancelled",
        "8-policy",
    ] {
        let png = shots.join(format!("{page}.png"));
        assert!(png.metadata()?.len() > 10_000, "{}", png.display());
    }
    Ok(())
}
