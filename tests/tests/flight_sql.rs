//! Arrow Flight SQL from the ADBC Flight SQL driver (PyPI), as a data
//! scientist would use it: the same rows as the HTTP SQL API, prepared
//! statements with `?` parameters, the catalog calls, and an error that
//! leaves the connection usable.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use lumen_core::{RequestRecord, Workload};
use lumen_tests::flight::{self, client};
use lumen_tests::{UpPorts, run_python, sql, start_up, wait_for_count, write_mesh};
use serde_json::Value;

const QUERY: &str = "SELECT destination_service AS service, status, count(*) AS n, \
                     sum(response_bytes) AS bytes FROM requests GROUP BY 1, 2 ORDER BY 1, 2";

const SCRIPT: &str = r#"
import json, sys
import adbc_driver_flightsql.dbapi as flight_sql
conn = flight_sql.connect(sys.argv[1], autocommit=True)
cur = conn.cursor()
out = {}
cur.execute(sys.argv[2])
out["rows"] = cur.fetch_arrow_table().to_pylist()
cur.execute("SELECT count(*) AS n FROM requests WHERE destination_service = ? AND status = ?", parameters=("ratings", 503))
out["prepared"] = cur.fetchall()[0][0]
try:
    cur.execute("SELECT no_such_column FROM requests")
    out["error"] = None
except flight_sql.ProgrammingError as e:
    out["error"] = str(e)
cur.execute("SELECT 1 + 1 AS two")
out["after_error"] = cur.fetchall()[0][0]
objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
out["tables"] = sorted(t["table_name"] for c in objects for s in c["catalog_db_schemas"] for t in s["db_schema_tables"])
out["table_types"] = conn.adbc_get_table_types()
out["requests_columns"] = conn.adbc_get_table_schema("requests").names
out["vendor"] = conn.adbc_get_info()["vendor_name"]
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adbc_reads_the_same_rows_as_http_sql() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let mut up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &[]).await?;
    let url = ports.sql_url();

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let records: Vec<RequestRecord> = (0..500u64)
        .map(|i| {
            let service = ["reviews", "ratings", "details"][(i % 3) as usize];
            RequestRecord {
                start_time: UNIX_EPOCH + now - Duration::from_millis(i * 100),
                destination: Workload {
                    service: service.into(),
                    workload: format!("{service}-v1").into(),
                    namespace: "default".into(),
                    version: "v1".into(),
                },
                status: [200, 200, 404, 503][(i % 4) as usize],
                response_bytes: i * 7,
                span_id: rand::random(),
                ..RequestRecord::example()
            }
        })
        .collect();
    let mut flight_client = client(&ports).await?;
    flight::put_records(&mut flight_client, [9; 16], 0, &records).await?;
    assert_eq!(
        wait_for_count(&url, "SELECT count(*) AS n FROM requests", 500).await?,
        500
    );

    let endpoint = format!("grpc://127.0.0.1:{}", ports.flight_sql);
    let printed = run_python(SCRIPT, &[&endpoint, QUERY])?;
    let got: Value = serde_json::from_str(printed.trim())?;

    let want = sql(&url, QUERY).await?;
    assert_eq!(
        got["rows"],
        Value::Array(want),
        "Flight SQL rows differ from HTTP SQL"
    );
    let ratings_503 = sql(
        &url,
        "SELECT count(*) AS n FROM requests WHERE destination_service = 'ratings' AND status = 503",
    )
    .await?;
    assert_eq!(got["prepared"], ratings_503[0]["n"]);
    assert!(
        got["error"]
            .as_str()
            .is_some_and(|e| e.contains("no_such_column")),
        "{got}"
    );
    assert_eq!(got["after_error"], 2);
    assert_eq!(
        got["tables"],
        serde_json::json!([
            "logs",
            "metrics",
            "policy_events",
            "requests",
            "rollups",
            "spans"
        ])
    );
    assert_eq!(got["table_types"], serde_json::json!(["TABLE"]));
    let columns = got["requests_columns"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(columns.contains(&Value::from("duration_us")), "{got}");
    assert_eq!(got["vendor"], "Lumen");
    up.terminate()?;
    Ok(())
}
