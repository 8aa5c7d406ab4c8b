//! Replays every committed fuzz input on stable: the seeds each fuzzer
//! starts from (`seeds/<target>/`) and every input a fuzzer once crashed or
//! hung on (`regressions/<target>/`, each kept as a regression test). The
//! binary seeds are checked against what today's encoders build, so they
//! stay inputs that reach deep into their parser.

use std::path::{Path, PathBuf};

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(kind)
        .join(target)
}

fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir(kind, target)) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// Runs `target` on each of its seeds and regression inputs.
fn replay(target: &str, run: fn(&[u8])) {
    let seeds = inputs("seeds", target);
    assert!(
        !seeds.is_empty(),
        "no seeds in {}",
        dir("seeds", target).display()
    );
    for (path, bytes) in seeds.iter().chain(&inputs("regressions", target)) {
        eprintln!("{target}: {}", path.display());
        run(bytes);
    }
}

macro_rules! replays {
    ($($target:ident),* $(,)?) => {$(
        #[test]
        fn $target() {
            replay(stringify!($target), lumen_fuzz::$target);
        }
    )*};
}

replays!(
    authorization,
    mesh_yaml,
    prometheus_rules,
    admission_review,
    alertmanager_webhook,
    otlp,
    flight_do_put,
    wal_replay,
    parquet_footer,
    sql,
    prometheus_api,
    promql,
    proxy_connection,
);

/// Compares a committed seed with what the encoder builds today; with
/// `LUMEN_FUZZ_WRITE_SEEDS=1` writes it instead.
fn current(target: &str, name: &str, built: Vec<u8>) {
    let path = dir("seeds", target).join(name);
    if std::env::var_os("LUMEN_FUZZ_WRITE_SEEDS").is_some() {
        std::fs::write(&path, &built).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        committed == built,
        "{} is not what today's encoder builds; rewrite the seeds with \
         LUMEN_FUZZ_WRITE_SEEDS=1 cargo test -p lumen-fuzz --test corpus",
        path.display()
    );
}

#[test]
fn binary_seeds_are_what_todays_encoders_build() {
    current(
        "flight_do_put",
        "put-requests",
        lumen_fuzz::seeds::flight_put(),
    );
    current(
        "wal_replay",
        "segment-requests",
        lumen_fuzz::seeds::wal_segment(),
    );
    current(
        "parquet_footer",
        "requests.parquet",
        lumen_fuzz::seeds::parquet_file(),
    );
    for (signal, name) in ["traces", "metrics", "logs"].iter().enumerate() {
        let json = std::fs::read(dir("seeds", "otlp").join(format!("json-{name}")))
            .expect("the OTLP/JSON seed");
        let signal = signal as u8;
        assert_eq!(
            json[0],
            0x80 | signal,
            "json-{name} starts with its pick byte"
        );
        let mut pb = vec![signal];
        pb.extend(
            lumen_fuzz::seeds::otlp_protobuf(signal, &json[1..])
                .unwrap_or_else(|e| panic!("json-{name} is not OTLP/JSON: {e}")),
        );
        current("otlp", &format!("pb-{name}"), pb);
    }
}

/// The seeds reach past decoding: a DoPut seed holds rows, a WAL seed
/// replays them, a Parquet seed is a file the catalog lists with its rows.
#[test]
fn binary_seeds_decode_into_rows() {
    let put = std::fs::read(dir("seeds", "flight_do_put").join("put-requests")).expect("seed");
    let messages: Vec<arrow_flight::FlightData> = lumen_fuzz::seeds::split_messages(&put)
        .into_iter()
        .map(|m| prost::Message::decode(m).expect("a FlightData message"))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let batches: Vec<arrow::array::RecordBatch> = rt.block_on(async {
        use futures_util::TryStreamExt;
        arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(
            futures_util::stream::iter(messages.into_iter().map(Ok)),
        )
        .try_collect()
        .await
        .expect("the seed's Arrow IPC decodes")
    });
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 20);

    let wal = tempfile::tempdir().expect("a directory");
    std::fs::write(
        wal.path().join(format!("{:020}.wal", 1)),
        std::fs::read(dir("seeds", "wal_replay").join("segment-requests")).expect("seed"),
    )
    .expect("segment written");
    let store = std::sync::Arc::new(lumen_collector::store::Store::new());
    let (handle, writer, replayed) =
        lumen_collector::wal::open(wal.path(), store).expect("the seed segment replays");
    assert_eq!(replayed.rows, 20);
    rt.block_on(handle.close());
    drop(handle);
    writer.join().expect("the writer ends");

    let parquet =
        std::fs::read(dir("seeds", "parquet_footer").join("requests.parquet")).expect("seed");
    let reader =
        parquet::file::serialized_reader::SerializedFileReader::new(bytes::Bytes::from(parquet))
            .expect("the seed is a Parquet file");
    use parquet::file::reader::FileReader;
    assert_eq!(reader.metadata().file_metadata().num_rows(), 20);
}

/// The sidecar target reaches routing: a request the route table knows
/// crosses both sidecar sides to the app; one it does not is answered by
/// the sidecar itself.
#[test]
fn the_sidecar_target_routes_its_seeds() {
    let seed =
        |name: &str| std::fs::read(dir("seeds", "proxy_connection").join(name)).expect("seed");
    let answer = String::from_utf8_lossy(&lumen_fuzz::proxy_answer(
        &seed("get-jason"),
        std::time::Duration::from_secs(10),
    ))
    .into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\r\n\r\nok"), "{answer}");
    let answer = String::from_utf8_lossy(&lumen_fuzz::proxy_answer(
        &seed("unknown-host"),
        std::time::Duration::from_secs(10),
    ))
    .into_owned();
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    assert!(!answer.contains("\r\n\r\nok"), "{answer}");
}
