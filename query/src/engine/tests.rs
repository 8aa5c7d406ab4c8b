//! The engine's governance over generated data: every kind of operator can
//! be stopped, limits fail with clear errors, turns are bounded. Bounds on
//! time here are generous liveness bounds, not performance assertions.

use std::time::{Duration, Instant};

use super::*;
use crate::running::QueryState;

fn engine(config: QueryConfig) -> QueryEngine {
    QueryEngine::new(Arc::new(Store::new()), config).unwrap()
}

fn config() -> QueryConfig {
    QueryConfig {
        parallelism: 2,
        ..QueryConfig::default()
    }
}

/// Polls until `f` holds, failing after a minute.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "still not true after 60s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `sql` in the background and waits until it is executing.
async fn start(
    e: &QueryEngine,
    sql: &str,
) -> (
    u64,
    tokio::task::JoinHandle<Result<QueryResult, QueryError>>,
) {
    let (engine, query) = (e.clone(), sql.to_string());
    let task = tokio::spawn(async move { engine.execute(&query, "test").await });
    let mut id = 0;
    eventually(&format!("`{sql}` running"), || {
        match e.queries().iter().find(|q| q.sql == sql) {
            Some(q) if q.state == QueryState::Running => {
                id = q.id.parse().unwrap();
                true
            }
            _ => false,
        }
    })
    .await;
    (id, task)
}

/// Queries that each run for hours, one per kind of operator a runaway
/// spends its time in.
const RUNAWAYS: [(&str, &str); 8] = [
    (
        "cross join under an aggregate",
        "SELECT sum(a.value * b.value) AS s FROM generate_series(1, 100000) a, generate_series(1, 100000) b",
    ),
    (
        "three-way cross join",
        "SELECT max(a.value + b.value + c.value) AS m FROM generate_series(1, 3000) a, \
         generate_series(1, 3000) b, generate_series(1, 3000) c",
    ),
    (
        "hash join probing a huge side",
        "SELECT count(*) AS n FROM generate_series(1, 1000) a \
         JOIN generate_series(1, 10000000000000) b ON a.value = b.value % 1000",
    ),
    (
        "grouped aggregation over a repartition",
        "SELECT value % 100 AS k, count(*) AS n FROM generate_series(1, 10000000000000) GROUP BY 1",
    ),
    (
        "sort (top-k)",
        "SELECT value FROM generate_series(1, 10000000000000) ORDER BY value % 977 DESC, value LIMIT 3",
    ),
    (
        "window",
        "SELECT max(s) AS m FROM (SELECT sum(value) OVER (ORDER BY value ROWS BETWEEN 5 PRECEDING AND CURRENT ROW) AS s \
         FROM generate_series(1, 10000000000000))",
    ),
    (
        "nested-loop join",
        "SELECT count(*) AS n FROM generate_series(1, 100000) a JOIN generate_series(1, 100000) b ON a.value < b.value",
    ),
    (
        "EXPLAIN ANALYZE of a cross join (run in tasks of its own)",
        "EXPLAIN ANALYZE SELECT sum(a.value * b.value) AS s FROM generate_series(1, 100000) a, \
         generate_series(1, 100000) b",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_runaway_stops_when_cancelled_and_gives_back_its_turn_and_memory() {
    let e = engine(config());
    for (kind, sql) in RUNAWAYS {
        let began = Instant::now();
        let (id, task) = start(&e, sql).await;
        // Let it get deep into its work before cancelling.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(e.cancel(id), "{kind}: cancel by id");
        let err = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap_or_else(|_| panic!("{kind}: the cancelled query never answered"))
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err, QueryError::Stopped(StopReason::Cancelled)),
            "{kind}: {err:?}"
        );
        // The answer comes at once; the work itself ends at its next plan
        // node or yield point, and only then is it off the list.
        eventually(&format!("{kind}: work ended"), || e.in_flight() == 0).await;
        eprintln!("{kind}: stopped {:?} after it began", began.elapsed());
        // Operators' own tasks are dropped by the runtime just after.
        eventually(&format!("{kind}: memory given back"), || {
            e.running.budget.used() == 0
        })
        .await;
    }
    let metrics = e.metrics();
    assert!(
        metrics.contains(&format!(
            "lumen_queries_total{{outcome=\"cancelled\"}} {}",
            RUNAWAYS.len()
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_times_out_and_its_work_ends() {
    let e = engine(QueryConfig {
        timeout: Duration::from_millis(500),
        ..config()
    });
    let err = e.execute(RUNAWAYS[0].1, "test").await.unwrap_err();
    assert!(matches!(err, QueryError::Timeout(_)), "{err:?}");
    assert!(err.to_string().contains("time limit of 500ms"), "{err}");
    eventually("work ended", || e.in_flight() == 0).await;
    // The same engine still answers.
    let r = e.execute("SELECT 1 AS one", "test").await.unwrap();
    assert_eq!(r.num_rows(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_stops_its_query() {
    let e = engine(config());
    let (_, task) = start(&e, RUNAWAYS[3].1).await;
    task.abort();
    eventually("work ended", || e.in_flight() == 0).await;
    eventually("counted", || {
        e.metrics()
            .contains("lumen_queries_total{outcome=\"client_gone\"} 1")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_running_and_queued_limits_queries_are_told_to_retry() {
    let e = engine(QueryConfig {
        max_concurrent: 1,
        max_queued: 1,
        queue_timeout: Duration::from_millis(300),
        ..config()
    });
    let (runaway, first) = start(&e, RUNAWAYS[3].1).await;

    // One may wait; it gets no turn within the queue timeout.
    let waited = e.execute("SELECT 2 AS two", "test").await.unwrap_err();
    match &waited {
        QueryError::Busy(b @ Busy::QueueTimeout(_)) => assert!(b.retry_after() > Duration::ZERO),
        other => panic!("{other:?}"),
    }

    // While one waits, the next is refused at once.
    let (engine, waiting) = (e.clone(), "SELECT 3 AS three");
    let queued = tokio::spawn(async move { engine.execute(waiting, "test").await });
    eventually("one queued", || {
        e.queries().iter().any(|q| q.state == QueryState::Queued)
    })
    .await;
    let refused = e.execute("SELECT 4 AS four", "test").await.unwrap_err();
    assert!(
        matches!(refused, QueryError::Busy(Busy::QueueFull { .. })),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("retry"), "{refused}");

    // When the runaway is cancelled, the queued query gets its turn.
    assert!(e.cancel(runaway));
    let r = queued.await.unwrap().unwrap();
    assert_eq!(r.num_rows(), 1);
    assert!(first.await.unwrap().is_err());
    assert!(
        e.metrics()
            .contains("lumen_queries_total{outcome=\"busy\"} 2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limits_name_the_limit_that_stopped_the_query() {
    let e = engine(QueryConfig {
        memory_bytes: 4 << 20,
        memory_budget_bytes: 64 << 20,
        ..config()
    });
    let err = e
        .execute(
            "SELECT cardinality(array_agg(value)) AS n FROM generate_series(1, 2000000)",
            "test",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, QueryError::MemoryLimit(_)), "{err:?}");
    assert!(err.to_string().contains("memory limit of 4 MiB"), "{err}");

    // Two queries of 40 MiB each fit their own limit, not the budget together.
    let e = engine(QueryConfig {
        memory_bytes: 48 << 20,
        memory_budget_bytes: 64 << 20,
        max_concurrent: 2,
        ..config()
    });
    let hog = "SELECT count(*) AS n FROM (SELECT a.value FROM generate_series(1, 2000000) a \
               JOIN generate_series(1, 10000000000000) b ON a.value = b.value)";
    let (hog_id, hog_task) = start(&e, hog).await;
    eventually("the hog holds its hash table", || {
        e.queries()
            .iter()
            .any(|q| q.id == hog_id.to_string() && q.memory_bytes > 30 << 20)
    })
    .await;
    let err = e.execute(hog, "test").await.unwrap_err();
    assert!(
        err.to_string().contains("query memory budget of 64 MiB"),
        "{err}"
    );
    e.cancel(hog_id);
    let _ = hog_task.await;
    eventually("work ended", || e.in_flight() == 0).await;
    eventually("memory given back", || e.running.budget.used() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_past_the_byte_limit_are_refused_with_advice() {
    let e = engine(QueryConfig {
        max_result_bytes: 1 << 20,
        ..config()
    });
    // 8 bytes × 1M rows: 8 MiB.
    let err = e
        .execute("SELECT value FROM generate_series(1, 1000000)", "test")
        .await
        .unwrap_err();
    assert!(matches!(err, QueryError::TooLarge(_)), "{err:?}");
    assert!(err.to_string().contains("more than 1 MiB"), "{err}");
    let ok = e
        .execute(
            "SELECT sum(value) AS s FROM generate_series(1, 1000000)",
            "test",
        )
        .await
        .unwrap();
    assert_eq!(ok.num_rows(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_running_queries_and_refuses_new_ones() {
    let e = engine(config());
    let (_, task) = start(&e, RUNAWAYS[1].1).await;
    e.shutdown();
    let err = task.await.unwrap().unwrap_err();
    assert!(
        matches!(err, QueryError::Stopped(StopReason::Shutdown)),
        "{err:?}"
    );
    let err = e.execute("SELECT 1", "test").await.unwrap_err();
    assert!(
        matches!(err, QueryError::Stopped(StopReason::Shutdown)),
        "{err:?}"
    );
    eventually("work ended", || e.in_flight() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_plans_answer_as_before() {
    let e = engine(config());
    let rows = |r: QueryResult| {
        arrow::util::pretty::pretty_format_batches(&r.batches)
            .unwrap()
            .to_string()
    };
    let r = e
        .execute(
            "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 100) \
             SELECT sum(n) AS s FROM t",
            "test",
        )
        .await
        .unwrap();
    assert!(rows(r).contains("| 5050 |"));
    let r = e
        .execute(
            "SELECT count(*) AS n FROM generate_series(1, 1000) a \
             JOIN generate_series(1, 1000) b ON a.value = b.value WHERE a.value % 2 = 0",
            "test",
        )
        .await
        .unwrap();
    assert!(rows(r).contains("| 500 |"));
    let r = e
        .execute(
            "EXPLAIN ANALYZE SELECT count(*) FROM generate_series(1, 1000)",
            "test",
        )
        .await
        .unwrap();
    let text = rows(r);
    assert!(text.contains("AggregateExec"), "{text}");
    assert!(text.contains("output_rows"), "with its metrics: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_ingest_is_busy_queries_pause_yet_finish_and_still_stop() {
    let ingest = Pressure::new();
    let throttled = |timeout| {
        engine(QueryConfig {
            ingest: ingest.clone(),
            ingest_share: 20,
            timeout,
            ..config()
        })
    };
    let e = throttled(Duration::from_secs(300));
    let _busy = ingest.enter();
    let r = e
        .execute(
            "SELECT count(*) AS n FROM generate_series(1, 3000) a, generate_series(1, 3000) b",
            "test",
        )
        .await
        .unwrap();
    let n = r.batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(n, 9_000_000);
    let paused = e
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix("lumen_query_ingest_pause_seconds_total "))
        .map(|v| v.parse::<f64>().unwrap())
        .expect("pause metric exported");
    assert!(paused > 0.0, "query threads never paused for ingest");

    // Paused work still ends at the time limit.
    let e = throttled(Duration::from_secs(1));
    let err = e.execute(RUNAWAYS[0].1, "test").await.unwrap_err();
    assert!(matches!(err, QueryError::Timeout(_)), "{err:?}");
    eventually("work ended", || e.in_flight() == 0).await;
}

#[test]
fn only_what_datafusion_spilled_is_removed_from_the_spill_directory() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared-tmp");
    std::fs::create_dir_all(shared.join("datafusion-left-by-a-crash")).unwrap();
    std::fs::write(shared.join("someone-elses-file"), b"keep").unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _e = runtime.block_on(async {
        engine(QueryConfig {
            spill_dir: Some(shared.clone()),
            ..config()
        })
    });
    assert!(!shared.join("datafusion-left-by-a-crash").exists());
    assert!(shared.join("someone-elses-file").exists());
}
