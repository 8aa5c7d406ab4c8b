//! The SQL API as a user sees it: formats, errors, and that it is read-only.

use anyhow::Result;
use lumen_tests::{LumenProcess, UpPorts, lumen_bin, sql, start_up, write_mesh};

/// `lumen up` over a one-service mesh in `dir`, with extra flags.
async fn up(dir: &std::path::Path, extra: &[&str]) -> Result<(LumenProcess, UpPorts)> {
    let mesh = dir.join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let process = start_up(dir, &mesh, &dir.join("data"), ports, extra).await?;
    Ok((process, ports))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_api_answers_json_csv_arrow_and_refuses_writes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_up, ports) = up(dir.path(), &["--query-max-rows", "5"]).await?;
    let url = ports.sql_url();
    let http = reqwest::Client::new();
    let post = |sql: &str, accept: &str| {
        http.post(&url)
            .header("accept", accept)
            .body(sql.to_string())
            .send()
    };

    let r = post(
        "SELECT count(*) AS n, 'x' AS s FROM requests",
        "application/json",
    )
    .await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await?, r#"[{"n":0,"s":"x"}]"#);

    let r = post(
        "SELECT 1 AS a, 'b' AS b UNION ALL SELECT 2, 'c' ORDER BY a",
        "text/csv",
    )
    .await?;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()?
            .starts_with("text/csv")
    );
    assert_eq!(r.text().await?, "a,b\n1,b\n2,c\n");

    let r = post("SELECT path FROM requests", "text/csv").await?;
    assert_eq!(
        r.text().await?,
        "path\n",
        "an empty result still names its columns"
    );

    let r = post("SELECT 42 AS answer", "application/vnd.apache.arrow.stream").await?;
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.apache.arrow.stream"
    );
    let bytes = r.bytes().await?;
    assert!(
        bytes.len() > 8 && bytes[..4] == [0xff, 0xff, 0xff, 0xff],
        "Arrow IPC stream"
    );

    let r = post("SELECT nosuch FROM requests", "application/json").await?;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await?;
    assert!(body["error"].as_str().unwrap().contains("nosuch"), "{body}");

    // Results are bounded: past --query-max-rows the query fails, clearly.
    let r = post(
        "SELECT * FROM (VALUES (1), (2), (3), (4), (5), (6)) AS t(x)",
        "text/csv",
    )
    .await?;
    assert_eq!(r.status(), 422);
    assert!(r.text().await?.contains("more than 5 rows"));

    let copied = dir.path().join("copied.csv");
    let external = dir.path().join("ext.csv");
    std::fs::write(&external, "a\n1\n")?;
    for write in [
        "DROP TABLE requests".to_string(),
        "INSERT INTO requests SELECT * FROM requests".to_string(),
        format!("COPY (SELECT 1) TO '{}'", copied.display()),
        format!("COPY requests TO '{}' STORED AS CSV", copied.display()),
        format!(
            "CREATE EXTERNAL TABLE ext STORED AS CSV LOCATION '{}'",
            external.display()
        ),
        "CREATE TABLE t AS SELECT 1".to_string(),
        "CREATE VIEW v AS SELECT 1".to_string(),
        "SET datafusion.execution.batch_size = 1".to_string(),
    ] {
        let r = post(&write, "application/json").await?;
        assert_eq!(r.status(), 400, "{write}");
        let body: serde_json::Value = r.json().await?;
        assert!(
            body["error"].as_str().unwrap().contains("read-only"),
            "{write}: {body}"
        );
    }
    assert!(!copied.exists(), "COPY wrote a file");
    let r = post("SELECT count(*) AS n FROM requests", "application/json").await?;
    assert_eq!(r.text().await?, r#"[{"n":0}]"#, "the table is still there");

    // The CLI client prints a table, or the server's error with a failing exit code.
    let out = std::process::Command::new(lumen_bin())
        .args(["sql", "--url", &format!("http://127.0.0.1:{}", ports.query)])
        .arg("SELECT 'hello' AS greeting")
        .output()?;
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout)?;
    assert!(
        table.contains("| greeting |") && table.contains("| hello    |"),
        "{table}"
    );
    let out = std::process::Command::new(lumen_bin())
        .args(["sql", "--url", &format!("http://127.0.0.1:{}", ports.query)])
        .arg("DROP TABLE requests")
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)?.contains("read-only"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_past_the_time_or_memory_limit_fail_and_the_server_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // 2 s is far more than any query below needs at its small scale, even in
    // a debug build on a busy machine, and far less than the big one needs.
    let (_up, ports) = up(
        dir.path(),
        &["--query-timeout", "2s", "--query-memory-mib", "1"],
    )
    .await?;
    let url = ports.sql_url();
    let http = reqwest::Client::new();
    let error_of = |query: &'static str| {
        let request = http.post(&url).body(query).send();
        async move {
            let r = request.await?;
            let status = r.status();
            let body: serde_json::Value = r.json().await?;
            let message = body["error"].as_str().unwrap_or_default().to_string();
            anyhow::Ok((status, message, body))
        }
    };

    // Summing ten trillion generated rows takes hours, in little memory.
    let (status, message, body) =
        error_of("SELECT sum(value % 7) AS s FROM generate_series(1, 10000000000000)").await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["errorType"], "timeout", "{body}");
    assert!(message.contains("time limit of 2s"), "{body}");

    // A million-element array and a hash table of 300,000 rows each need
    // more than 1 MiB, and neither can spill to disk.
    for query in [
        "SELECT cardinality(array_agg(value)) AS n FROM generate_series(1, 1000000)",
        "SELECT count(*) AS n FROM generate_series(1, 300000) a \
         JOIN generate_series(1, 300000) b ON a.value = b.value",
    ] {
        let (status, message, body) = error_of(query).await?;
        assert_eq!(status, 422, "{query}: {body}");
        assert!(message.contains("memory limit of 1 MiB"), "{query}: {body}");
    }

    // The server still answers, and the same queries at a small scale
    // succeed: the limits, not the SQL, stopped them.
    let rows = sql(
        &url,
        "SELECT sum(value % 7) AS s FROM generate_series(1, 1000)",
    )
    .await?;
    assert_eq!(rows, [serde_json::json!({"s": 3003})]);
    let rows = sql(
        &url,
        "SELECT cardinality(array_agg(value)) AS n FROM generate_series(1, 1000)",
    )
    .await?;
    assert_eq!(rows, [serde_json::json!({"n": 1000})]);
    let rows = sql(
        &url,
        "SELECT count(*) AS n FROM generate_series(1, 1000) a \
         JOIN generate_series(1, 1000) b ON a.value = b.value",
    )
    .await?;
    assert_eq!(rows, [serde_json::json!({"n": 1000})]);
    Ok(())
}
