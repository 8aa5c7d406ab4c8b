//! The Postgres wire endpoint as its users meet it: a scripted `psql`
//! session (list, describe, GROUP BY, a bad query then a good one in the
//! same session, SHOW / SET), a Python driver on the extended protocol with
//! parameters, and passwords when asked for.

use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use lumen_core::{RequestRecord, Workload};
use lumen_tests::flight::{self, client};
use lumen_tests::{
    UpPorts, free_port, peer_tool, run_python, sql, start_up, wait_for_count, write_mesh,
};

const INSTALL: &str = "apt-get install -y postgresql-client";

fn records(n: usize) -> Vec<RequestRecord> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (0..n)
        .map(|i| {
            let service = ["reviews", "ratings", "details"][i % 3];
            RequestRecord {
                start_time: UNIX_EPOCH + now - Duration::from_secs(60),
                destination: Workload {
                    service: service.into(),
                    workload: format!("{service}-v1").into(),
                    namespace: "default".into(),
                    version: "v1".into(),
                },
                status: if i % 7 == 0 { 503 } else { 200 },
                span_id: rand::random(),
                ..RequestRecord::example()
            }
        })
        .collect()
}

fn psql(port: u16, password: Option<&str>, script: &str) -> Result<Output> {
    let mut cmd = Command::new(peer_tool("psql", INSTALL));
    cmd.args([
        "-X",
        "-A",
        "-h",
        "127.0.0.1",
        "-U",
        "grafana",
        "-d",
        "lumen",
        "-p",
    ])
    .arg(port.to_string())
    .args([
        "-v",
        "ON_ERROR_STOP=0",
        "-v",
        "VERBOSITY=verbose",
        "-f",
        "-",
    ])
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    match password {
        Some(p) => cmd.env("PGPASSWORD", p),
        None => cmd.env_remove("PGPASSWORD"),
    };
    let mut child = cmd.spawn().context("starting psql")?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .context("psql stdin")?
            .write_all(script.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_a_python_driver_read_lumen_over_the_postgres_protocol() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let pg = ports.pg;
    let mut up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &[]).await?;
    let url = ports.sql_url();
    let mut flight = client(&ports).await?;
    flight::put_records(&mut flight, [5; 16], 0, &records(300)).await?;
    assert_eq!(
        wait_for_count(&url, "SELECT count(*) AS n FROM requests", 300).await?,
        300
    );

    let out = psql(
        pg,
        None,
        "\\dt\n\
         \\d requests\n\
         \\l\n\
         SELECT destination_service, count(*) AS n FROM requests GROUP BY 1 ORDER BY 1;\n\
         SELECT nope FROM requests;\n\
         SELECT count(*) AS after_error FROM requests WHERE status = 503;\n\
         SHOW server_version;\n\
         SET application_name = 'lumen-test';\n\
         SHOW application_name;\n\
         BEGIN;\n\
         SELECT 1 AS in_transaction;\n\
         COMMIT;\n",
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "psql failed: {stdout}\n{stderr}");
    // \dt and \d
    for table in ["logs", "metrics", "requests", "rollups", "spans"] {
        assert!(
            stdout.contains(&format!("public|{table}|table|")),
            "{table} missing from \\dt:\n{stdout}"
        );
    }
    for column in [
        "duration_us|bigint",
        "time|timestamp with time zone",
        "destination_service|text",
        "trace_id|bytea",
    ] {
        assert!(
            stdout.contains(column),
            "\\d requests lacks {column}:\n{stdout}"
        );
    }
    assert!(stdout.contains("lumen|"), "\\l lacks lumen:\n{stdout}");
    // GROUP BY: the same counts as the HTTP SQL API.
    let want = sql(
        &url,
        "SELECT destination_service AS s, count(*) AS n FROM requests GROUP BY 1 ORDER BY 1",
    )
    .await?;
    for row in &want {
        let line = format!(
            "{}|{}",
            row["s"].as_str().unwrap_or(""),
            row["n"].as_i64().unwrap_or(-1)
        );
        assert!(stdout.contains(&line), "{line} missing:\n{stdout}");
    }
    // The bad query is an error with its SQLSTATE; the session goes on.
    assert!(
        stderr.contains("ERROR:  42703") && stderr.contains("nope"),
        "{stderr}"
    );
    assert_eq!(want.len(), 3, "{want:?}");
    let failed = records(300).iter().filter(|r| r.status == 503).count();
    assert!(
        stdout.contains(&format!("after_error\n{failed}\n")),
        "{stdout}"
    );
    assert!(stdout.contains("server_version\n15.0 (Lumen)"), "{stdout}");
    assert!(stdout.contains("application_name\nlumen-test"), "{stdout}");
    assert!(stdout.contains("in_transaction\n1\n"), "{stdout}");

    // The extended protocol with parameters, from psycopg.
    let script = r#"
import sys, psycopg
with psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="grafana", dbname="lumen") as conn:
    cur = conn.cursor()
    cur.execute("SELECT count(*) AS n FROM requests WHERE destination_service = %s AND status = %s", ("ratings", 200))
    print("ratings_ok", cur.fetchone()[0])
    try:
        cur.execute("SELECT * FROM no_such_table WHERE x = %s", (1,))
    except psycopg.Error as e:
        print("error", e.sqlstate)
    conn.rollback()
    cur.execute("SELECT %s::bigint * 2 AS doubled", (21,))
    print("doubled", cur.fetchone()[0])
    # Trace and span ids (fixed-size binary) come as hex text, as the HTTP
    # API shows them: Grafana's trace links use them.
    cur.execute("SELECT trace_id, span_id FROM requests WHERE trace_id IS NOT NULL LIMIT 1")
    print("ids", *cur.fetchone())
    # A type the wire cannot encode (ids nested in a list) is an error for
    # this query, and the session and server go on.
    try:
        cur.execute("SELECT array_agg(trace_id) FROM requests")
        cur.fetchall()
        print("nested answered")
    except psycopg.Error as e:
        print("nested error")
    conn.rollback()
    cur.execute("SELECT 1 + 1")
    print("after", cur.fetchone()[0])
"#;
    let printed = run_python(script, &[&pg.to_string()])?;
    let ratings_ok = records(300)
        .iter()
        .filter(|r| &*r.destination.service == "ratings" && r.status == 200)
        .count();
    assert!(
        printed.contains(&format!("ratings_ok {ratings_ok}\n")),
        "{printed}"
    );
    assert!(printed.contains("error 42P01\n"), "{printed}");
    assert!(printed.contains("doubled 42\n"), "{printed}");
    assert!(
        printed.contains("nested error\n") || printed.contains("nested answered\n"),
        "{printed}"
    );
    assert!(printed.contains("after 2\n"), "{printed}");
    let ids: Vec<&str> = printed
        .lines()
        .find_map(|l| l.strip_prefix("ids "))
        .map(|l| l.split(' ').collect())
        .unwrap_or_default();
    assert!(
        ids.len() == 2
            && ids[0].len() == 32
            && ids[1].len() == 16
            && ids.iter().all(|i| i.chars().all(|c| c.is_ascii_hexdigit())),
        "{printed}"
    );
    up.terminate()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_is_asked_for_when_set_and_required_beyond_loopback() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;

    // Beyond loopback without a password: refused at start, saying why.
    let refused = Command::new(lumen_tests::lumen_bin())
        .args(["up", "-f"])
        .arg(&mesh)
        .arg("--data-dir")
        .arg(dir.path().join("refused"))
        .args(["--otlp-grpc", &format!("127.0.0.1:{}", free_port())])
        .args(["--otlp-http", &format!("127.0.0.1:{}", free_port())])
        .args(["--query-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--pg-addr", &format!("0.0.0.0:{}", free_port())])
        .args(["--flight-sql-addr", &format!("127.0.0.1:{}", free_port())])
        .env_remove("LUMEN_PG_PASSWORD")
        .output()?;
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("--pg-password"), "{message}");

    let ports = UpPorts::pick();
    let pg = ports.pg;
    let mut up = start_up(
        dir.path(),
        &mesh,
        &dir.path().join("data"),
        ports,
        &["--pg-password", "s3cret"],
    )
    .await?;
    let wrong = psql(pg, Some("guess"), "SELECT 1;\n")?;
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        said.to_lowercase()
            .contains("password authentication failed"),
        "{said}"
    );
    let right = psql(pg, Some("s3cret"), "SELECT 41 + 1 AS answer;\n")?;
    assert!(
        String::from_utf8_lossy(&right.stdout).contains("answer\n42\n"),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    up.terminate()?;
    Ok(())
}
