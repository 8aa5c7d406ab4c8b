//! Arrow Flight ingest as a producer sees it: numbered batches are stored
//! once however often they are sent, also across `kill -9`; batches that
//! cannot be stored are refused with the column at fault, and the collector
//! keeps serving.

use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Result;
use arrow::array::{ArrayRef, Int32Array, RecordBatch};
use arrow_flight::encode::DictionaryHandling;
use arrow_flight::error::FlightError;
use arrow_flight::{FlightClient, PutResult};
use bytes::Bytes;
use lumen_core::RequestRecord;
use lumen_core::schema::RequestBatchBuilder;
use lumen_tests::flight::{self, batch_id as id, client};
use lumen_tests::{UpPorts, sql_count, start_up, write_mesh};

fn records(n: usize, tag: &str) -> RecordBatch {
    let mut b = RequestBatchBuilder::new();
    for i in 0..n {
        b.push(&RequestRecord {
            start_time: SystemTime::now(),
            path: format!("/{tag}/{i}"),
            span_id: rand::random(),
            ..RequestRecord::example()
        });
    }
    b.finish().expect("a batch")
}

/// Plain strings for names, as a producer without dictionaries sends
/// them: the collector casts them to its dictionary columns.
async fn put(
    client: &mut FlightClient,
    table: &str,
    id: Bytes,
    batch: RecordBatch,
) -> Result<Vec<PutResult>, FlightError> {
    flight::put(client, table, id, batch, DictionaryHandling::Hydrate).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbered_batches_are_stored_once_across_retries_and_kill_9() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let mut up = start_up(dir.path(), &mesh, &data, ports, &[]).await?;
    let mut flight = client(&ports).await?;
    let producer: [u8; 16] = rand::random();
    let count = "SELECT count(*) AS n FROM requests";

    let acks = put(&mut flight, "requests", id(producer, 1), records(50, "a")).await?;
    assert_eq!(acks.len(), 1);
    assert_eq!(
        acks[0].app_metadata,
        id(producer, 1),
        "the ack names the batch"
    );
    assert_eq!(sql_count(&ports.sql_url(), count).await?, 50);
    // The ack was lost, so the producer sends the same batch again.
    put(&mut flight, "requests", id(producer, 1), records(50, "a")).await?;
    put(&mut flight, "requests", id(producer, 2), records(7, "b")).await?;
    assert_eq!(sql_count(&ports.sql_url(), count).await?, 57);

    up.kill9()?;
    let ports = UpPorts::pick();
    let mut up = start_up(dir.path(), &mesh, &data, ports, &[]).await?;
    let mut flight = client(&ports).await?;
    assert_eq!(sql_count(&ports.sql_url(), count).await?, 57);
    // A retry that arrives after the restart is still recognised.
    put(&mut flight, "requests", id(producer, 2), records(7, "b")).await?;
    assert_eq!(sql_count(&ports.sql_url(), count).await?, 57);
    let paths_b = "SELECT count(*) AS n FROM requests WHERE path LIKE '/b/%'";
    assert_eq!(sql_count(&ports.sql_url(), paths_b).await?, 7);

    // Batches that cannot be stored say why, and nothing of them is kept.
    let wrong = RecordBatch::try_from_iter([(
        "status",
        Arc::new(Int32Array::from(vec![200])) as ArrayRef,
    )])?;
    let err = put(&mut flight, "requests", id(producer, 3), wrong)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing column `time`"), "{err}");
    let err = put(&mut flight, "nonsense", id(producer, 4), records(1, "c"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown table `nonsense`"),
        "{err}"
    );
    let err = put(&mut flight, "rollups", id(producer, 5), records(1, "c"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("takes no rows"), "{err}");
    let err = put(
        &mut flight,
        "requests",
        Bytes::from_static(b"short"),
        records(1, "c"),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("24-byte batch id"), "{err}");
    assert_eq!(sql_count(&ports.sql_url(), count).await?, 57);
    up.terminate()?;
    Ok(())
}

/// The inputs fuzzing found to crash arrow's IPC decoder, sent to the real
/// collector: each `DoPut` is refused with INVALID_ARGUMENT, nothing is
/// printed as a crash, and the collector goes on storing good batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_arrow_ipc_from_the_fuzzer_is_refused_and_the_collector_goes_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("reviews", 9080, &[])])?;
    let ports = UpPorts::pick();
    let up = start_up(dir.path(), &mesh, &dir.path().join("data"), ports, &[]).await?;
    let regressions = lumen_tests::crate_dir().join("../fuzz/regressions/flight_do_put");
    let mut inputs: Vec<_> = std::fs::read_dir(&regressions)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    inputs.sort();
    assert!(inputs.len() >= 2, "{inputs:?}");
    for path in inputs {
        // As the fuzz target reads them: FlightData messages, each after a
        // 2-byte little-endian length.
        let mut data = std::fs::read(&path)?;
        let mut messages = Vec::new();
        while data.len() >= 2 {
            let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
            let end = (2 + len).min(data.len());
            if let Ok(m) = <arrow_flight::FlightData as prost::Message>::decode(&data[2..end]) {
                messages.push(Ok(m));
            }
            data.drain(..end);
        }
        let mut c = client(&ports).await?;
        let err = match c.do_put(futures_util::stream::iter(messages)).await {
            Ok(stream) => {
                let answer: Result<Vec<PutResult>, FlightError> =
                    futures_util::TryStreamExt::try_collect(stream).await;
                answer.expect_err("a malformed DoPut is refused")
            }
            Err(e) => e,
        };
        let FlightError::Tonic(status) = &err else {
            panic!("{}: {err}", path.display());
        };
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{}: {status}",
            path.display()
        );
    }
    let mut c = client(&ports).await?;
    flight::put(
        &mut c,
        "requests",
        id([9; 16], 1),
        records(3, "after-fuzz"),
        DictionaryHandling::Resend,
    )
    .await?;
    let stored = "SELECT count(*) AS n FROM requests WHERE path LIKE '/after-fuzz/%'";
    assert_eq!(sql_count(&ports.sql_url(), stored).await?, 3);
    assert!(
        !up.logs().contains("panicked"),
        "a malformed batch was printed as a crash:\n{}",
        up.logs()
    );
    Ok(())
}
