//! Fuzz targets for every parser of outside input, one function each, fed
//! arbitrary bytes by `cargo fuzz` (`fuzz_targets/`, one line per target)
//! and replayed from the committed corpora by `tests/corpus.rs` on stable.
//!
//! Each target drives the code a peer's bytes reach in the real binary: a
//! YAML file through the mesh and rule loaders, an OTLP payload or a Flight
//! `DoPut` through the collector's ingest (into its WAL when the rows are
//! current), WAL segments and
//! Parquet files through startup's replay and catalog load, SQL and PromQL
//! through the query engine over stored rows, the Prometheus, Alertmanager
//! and admission endpoints through their HTTP routers, and raw bytes into a
//! running sidecar's outbound listener (protocol detection, request line,
//! headers, authority, path, routing, the hop to its inbound side and back).
//! A target fails on a panic anywhere in the process (tasks included), on
//! an answer the interface's contract rules out (a 500, an error naming no
//! file), and — through libFuzzer — on a hang or unbounded memory.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Once};
use std::time::{Duration, SystemTime};

use arrow::array::RecordBatch;
use bytes::Bytes;
use http_body_util::BodyExt;
use lumen_collector::ingest::flight::FlightIngest;
use lumen_collector::ingest::{Encoding, Ingest, IngestError, Limits, Signal};
use lumen_collector::store::Store;
use lumen_core::{MeshConfig, RequestRecord};
use lumen_query::{QueryConfig, QueryEngine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

pub mod seeds;

static PANICKED: AtomicBool = AtomicBool::new(false);

/// Marks any panic, on any thread, so a target can fail on one a task
/// swallowed (libFuzzer's own hook aborts first when it runs the target).
/// Two kinds Lumen catches itself are let through: the PromQL parser's on
/// out-of-range numbers (`lumen_query::promql::parse`) and arrow's IPC
/// decoder's on inconsistent batches (`lumen_core::ipc::guarded`).
fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let caught = lumen_core::ipc::decoding()
                || info
                    .location()
                    .is_some_and(|l| l.file().contains("promql-parser"));
            if !caught {
                PANICKED.store(true, Ordering::SeqCst);
                previous(info);
            }
        }));
    });
}

fn check_no_panic(what: &str) {
    assert!(
        !PANICKED.load(Ordering::SeqCst),
        "{what}: a thread panicked (see above)"
    );
}

/// The runtime targets run on: several threads, as the binaries use.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    });
    &RT
}

/// A directory for this process's files, in memory when the machine has
/// `/dev/shm` (the WAL fsyncs each append).
fn scratch() -> &'static Path {
    static DIR: LazyLock<tempfile::TempDir> = LazyLock::new(|| {
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        tempfile::Builder::new()
            .prefix("lumen-fuzz-")
            .tempdir_in(parent)
            .expect("a scratch directory")
    });
    DIR.path()
}

fn fresh_dir(what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = scratch().join(format!("{what}-{}", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).expect("a scratch subdirectory");
    dir
}

/// A collector's ingest over a WAL in scratch space. The hot cap is low so
/// that a long run refuses payloads (as a full collector does) rather than
/// growing without bound.
struct Collector {
    ingest: Ingest,
    store: Arc<Store>,
}

fn collector() -> &'static Collector {
    static C: LazyLock<Collector> = LazyLock::new(|| {
        let store = Arc::new(Store::new());
        let (wal, _writer, _) =
            lumen_collector::wal::open(&fresh_dir("wal"), store.clone()).expect("a WAL");
        let limits = Limits {
            max_request_bytes: 4 << 20,
            max_hot_bytes: 64 << 20,
            max_inflight_payloads: 64,
            shape: Default::default(),
        };
        let ingest = Ingest::new(wal, store.clone(), limits);
        // Rows for SQL and PromQL to find: requests of the last minutes.
        runtime().block_on(async {
            let admitted = ingest.admit().await.expect("room for the first rows");
            ingest
                .arrow(&admitted, "requests", None, vec![recent_requests()])
                .await
                .expect("example rows are stored");
        });
        Collector { ingest, store }
    });
    &C
}

/// Requests between two Bookinfo services over the last five minutes.
pub fn recent_requests() -> RecordBatch {
    let now = SystemTime::now();
    let mut b = lumen_core::schema::RequestBatchBuilder::new();
    for i in 0..300u32 {
        let mut r = RequestRecord::example();
        r.start_time = now - Duration::from_secs(u64::from(i));
        r.status = if i % 10 == 0 { 503 } else { 200 };
        r.path = format!("/reviews/{}", i % 7);
        r.source.service = "productpage".into();
        r.destination.service = "reviews".into();
        r.destination.version = format!("v{}", 1 + i % 3).into();
        b.push(&r);
    }
    b.finish().expect("example rows make a batch")
}

fn engine() -> &'static QueryEngine {
    static E: LazyLock<QueryEngine> = LazyLock::new(|| {
        let config = QueryConfig {
            parallelism: 2,
            timeout: Duration::from_secs(2),
            ..QueryConfig::default()
        };
        QueryEngine::new(collector().store.clone(), config).expect("a query engine")
    });
    &E
}

/// Sends `request` to `router`; returns the status and body.
fn call(router: axum::Router, mut request: http::Request<axum::body::Body>) -> (u16, Bytes) {
    // What axum's server adds: the peer's address.
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(SocketAddr::from((
            [127, 0, 0, 1],
            40000,
        ))));
    runtime().block_on(async move {
        let response = router
            .oneshot(request)
            .await
            .expect("routers are infallible");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (status, body)
    })
}

/// The mesh file loader (Lumen's `Mesh` and Istio's kinds in one file):
/// anything but a valid file is an error that names the file.
pub fn mesh_yaml(data: &[u8]) {
    init();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = MeshConfig::from_yaml("fuzz.yaml", text) {
        assert!(
            e.to_string().contains("fuzz.yaml"),
            "error names no file: {e}"
        );
    }
    check_no_panic("mesh YAML");
}

/// The one token the `authorization` target's listener takes, and whose.
pub const FUZZ_TOKEN: &str = "fuzz-token-0123456789abcdef";

/// Every locked listener's `Authorization` header (first byte even) and
/// the token file (odd): no panic; only the token itself, as a bearer or
/// as Basic's password under its user's name or none, authenticates; a
/// token file is loaded or refused naming the file.
pub fn authorization(data: &[u8]) {
    init();
    static ACCESS: LazyLock<Arc<lumen_listen::Access>> = LazyLock::new(|| {
        let file = fresh_dir("tokens").join("tokens.csv");
        std::fs::write(&file, format!("{FUZZ_TOKEN},alice\n")).expect("a token file");
        lumen_listen::Access::load(&lumen_listen::AccessFiles {
            token_file: Some(file),
            ..Default::default()
        })
        .expect("the fuzz token file loads")
    });
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let Ok(value) = http::HeaderValue::from_bytes(rest) else {
            return;
        };
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value);
        for grant in [lumen_listen::Grant::Ingest, lumen_listen::Grant::Operate] {
            if let Ok(who) = ACCESS.authenticate(None, &headers, grant) {
                assert_eq!(who, lumen_listen::Principal::User("alice".into()));
                let text = String::from_utf8_lossy(rest);
                let (scheme, credentials) = text.split_once(' ').expect("a scheme");
                let secret = if scheme.eq_ignore_ascii_case("basic") {
                    use base64::Engine;
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(credentials.trim())
                        .expect("Basic credentials that authenticated decode");
                    String::from_utf8(decoded).expect("UTF-8")
                } else {
                    credentials.trim().to_string()
                };
                assert!(
                    secret == FUZZ_TOKEN
                        || secret == format!(":{FUZZ_TOKEN}")
                        || secret == format!("alice:{FUZZ_TOKEN}"),
                    "authenticated with {text:?}"
                );
            }
        }
    } else {
        // One file, rewritten each run: libFuzzer runs one input at a time.
        static FILE: LazyLock<PathBuf> =
            LazyLock::new(|| fresh_dir("token-file").join("tokens.csv"));
        let file = FILE.clone();
        std::fs::write(&file, rest).expect("writing the token file");
        if let Err(e) = lumen_listen::Access::load(&lumen_listen::AccessFiles {
            token_file: Some(file),
            ..Default::default()
        }) {
            assert!(
                e.to_string().contains("tokens.csv"),
                "error names no file: {e}"
            );
        }
    }
    check_no_panic("Authorization header / token file");
}

/// Prometheus rule files, as the policy engine loads them.
pub fn prometheus_rules(data: &[u8]) {
    init();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = lumen_policy::rules::parse("fuzz.rules.yaml", text) {
        assert!(
            e.to_string().contains("fuzz.rules.yaml"),
            "error names no file: {e}"
        );
    }
    check_no_panic("rule file");
}

/// Kubernetes' `AdmissionReview` for the sidecar injector: every body is
/// answered with a review (allowed or not), never a crash.
pub fn admission_review(data: &[u8]) {
    init();
    static INJECTOR: LazyLock<lumen_control::inject::Injector> =
        LazyLock::new(lumen_control::inject::Injector::default);
    let review = lumen_control::inject::review(data, &INJECTOR);
    assert!(review.response.is_some(), "no response in the review");
    check_no_panic("AdmissionReview");
}

/// Alertmanager's webhook into the policy engine: 200 or 400 with a reason.
pub fn alertmanager_webhook(data: &[u8]) {
    init();
    static ROUTER: LazyLock<axum::Router> = LazyLock::new(|| {
        let engine = Arc::new(lumen_policy::RuleEngine::new(
            Vec::new(),
            Duration::from_secs(1),
        ));
        lumen_policy::http::router(engine, Arc::default())
    });
    let request = http::Request::post("/api/v1/alerts/webhook")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(data.to_vec()))
        .expect("a request");
    let (status, body) = call(ROUTER.clone(), request);
    assert!(
        status == 200 || status == 400,
        "status {status}: {}",
        String::from_utf8_lossy(&body)
    );
    check_no_panic("Alertmanager webhook");
}

/// One OTLP export of any signal, protobuf or JSON (the first byte picks),
/// through decoding, conversion and the time window (rows inside it go on
/// into the WAL). A payload is stored or
/// refused as invalid; the collector never fails it for its own reasons.
pub fn otlp(data: &[u8]) {
    init();
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let signal = [Signal::Traces, Signal::Metrics, Signal::Logs][usize::from(pick % 3)];
    let encoding = if pick & 0x80 == 0 {
        Encoding::Protobuf
    } else {
        Encoding::Json
    };
    let c = collector();
    runtime().block_on(async {
        let admitted = c.ingest.admit().await.unwrap_or_else(|e| {
            panic!("the fuzz collector refuses payloads ({e}); rerun: this target tests no ingest while full")
        });
        match c.ingest.export(&admitted, signal, payload, encoding).await {
            Ok(_) | Err(IngestError::Invalid(_)) => {}
            Err(e) => panic!("payload failed for the collector's reasons: {e}"),
        }
    });
    check_no_panic("OTLP export");
}

/// A `DoPut` stream: messages as on the wire (each a protobuf `FlightData`
/// after a 2-byte little-endian length), stored or refused as invalid.
pub fn flight_do_put(data: &[u8]) {
    init();
    let messages = seeds::split_messages(data)
        .iter()
        .filter_map(|m| <arrow_flight::FlightData as prost::Message>::decode(*m).ok())
        .collect::<Vec<_>>();
    let c = collector();
    let flight = FlightIngest::new(c.ingest.clone());
    runtime().block_on(async {
        let admitted = c.ingest.admit().await.unwrap_or_else(|e| {
            panic!("the fuzz collector refuses payloads ({e}); rerun: this target tests no ingest while full")
        });
        if let Err(status) = flight.put(&admitted, messages).await {
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "DoPut failed for the collector's reasons: {status}"
            );
        }
    });
    check_no_panic("Flight DoPut");
}

/// A WAL segment of arbitrary bytes, replayed as at startup: rows are
/// recovered up to the first torn or corrupt entry, or the WAL is refused
/// with an error; either way the process goes on.
pub fn wal_replay(data: &[u8]) {
    init();
    let dir = fresh_dir("replay");
    std::fs::write(dir.join(format!("{:020}.wal", 1)), data).expect("segment written");
    if let Ok((wal, writer, _)) = lumen_collector::wal::open(&dir, Arc::new(Store::new())) {
        runtime().block_on(wal.close());
        drop(wal);
        writer.join().expect("the WAL writer thread ends");
    }
    let _ = std::fs::remove_dir_all(&dir);
    check_no_panic("WAL replay");
}

/// A Parquet file of arbitrary bytes in a table's directory, read as the
/// collector's catalog load at startup reads it (footer and metadata).
pub fn parquet_footer(data: &[u8]) {
    init();
    let dir = fresh_dir("tables");
    let table = dir.join("requests").join("hour=2026-12-07T08");
    std::fs::create_dir_all(&table).expect("table directory");
    std::fs::write(table.join("part-00000000000000000001-fuzz.parquet"), data)
        .expect("file written");
    let storage = lumen_collector::storage::Storage::local(&dir).expect("local storage");
    let _ = runtime().block_on(lumen_collector::persist::load_files(&storage, u64::MAX));
    let _ = std::fs::remove_dir_all(&dir);
    check_no_panic("Parquet load");
}

/// SQL as `lumen sql`, the HTTP API, Postgres and Flight SQL send it, over
/// stored rows, under the engine's time and memory guard.
pub fn sql(data: &[u8]) {
    init();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let e = engine();
    let _ = runtime().block_on(e.execute(text, "fuzz"));
    check_no_panic("SQL");
}

/// The Prometheus HTTP API: the first byte picks the endpoint, the rest is
/// its query string. Answers are Prometheus's: 200, 400 (bad data), 422
/// (cannot execute) or 503 (timed out) — never a 500.
pub fn prometheus_api(data: &[u8]) {
    init();
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let endpoint = [
        "query",
        "query_range",
        "series",
        "labels",
        "label/destination_service/values",
        "metadata",
        "query_exemplars",
        "format_query",
    ][usize::from(pick) % 8];
    let query = String::from_utf8_lossy(rest);
    prometheus(&format!("/api/v1/{endpoint}?{query}"));
    check_no_panic("Prometheus API");
}

/// PromQL, evaluated at an instant and over the last five minutes.
pub fn promql(data: &[u8]) {
    init();
    let Ok(expr) = std::str::from_utf8(data) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let instant = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", expr)
        .append_pair("time", &now.to_string())
        .finish();
    prometheus(&format!("/api/v1/query?{instant}"));
    let range = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", expr)
        .append_pair("start", &(now - 300).to_string())
        .append_pair("end", &now.to_string())
        .append_pair("step", "15")
        .finish();
    prometheus(&format!("/api/v1/query_range?{range}"));
    check_no_panic("PromQL");
}

fn prometheus(uri: &str) {
    static ROUTER: LazyLock<axum::Router> =
        LazyLock::new(|| lumen_query::prom_api::router().with_state(engine().clone()));
    let Ok(request) = http::Request::get(uri).body(axum::body::Body::empty()) else {
        return; // not a URI a client could send
    };
    let (status, body) = call(ROUTER.clone(), request);
    assert!(
        matches!(status, 200 | 400 | 404 | 422 | 503),
        "{uri}: status {status}: {}",
        String::from_utf8_lossy(&body)
    );
    if status != 404 {
        let json: Result<serde_json::Value, _> = serde_json::from_slice(&body);
        assert!(
            json.is_ok(),
            "{uri}: not JSON: {}",
            String::from_utf8_lossy(&body)
        );
    }
}

/// Raw bytes from an app into a running sidecar's outbound listener, then
/// end of input. The route table has header, path and authority matches,
/// rewrites and header edits; a routed request crosses to the sidecar's
/// own inbound side and on to a small app. Whatever the bytes, the sidecar
/// answers or closes, and goes on serving the next connection.
pub fn proxy_connection(data: &[u8]) {
    init();
    proxy_answer(data, Duration::from_millis(100));
    check_no_panic("sidecar connection");
}

/// What the sidecar answers to `data` sent on one connection, waiting up
/// to `first` for the answer to begin.
pub fn proxy_answer(data: &[u8], first: Duration) -> Vec<u8> {
    let outbound = sidecar();
    runtime().block_on(async {
        let Ok(mut conn) = tokio::net::TcpStream::connect(outbound).await else {
            panic!("the sidecar no longer accepts connections");
        };
        let _ = conn.write_all(data).await;
        // Read until the answer pauses (an incomplete request gets none),
        // then end the input: like Envoy, the sidecar takes a half-close
        // as the client leaving, so ending it first would cancel requests.
        let mut answer = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let mut wait = first;
        while let Ok(Ok(n @ 1..)) = tokio::time::timeout(wait, conn.read(&mut buf)).await {
            answer.extend_from_slice(&buf[..n]);
            wait = Duration::from_millis(20);
        }
        let _ = conn.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.read_to_end(&mut answer)).await;
        answer
    })
}

/// The mesh the sidecar target routes by; `APP` is the sidecar's inbound
/// address, where the service's endpoint is.
const PROXY_MESH: &str = r#"apiVersion: lumen.dev/v1alpha1
kind: Mesh
metadata:
  name: fuzz
spec:
  services:
    - name: reviews
      port: 9080
      endpoints:
        - address: APP
          version: v1
        # nothing listens here: refused connections, retries, ejection
        - address: 127.0.0.1:1
          version: v2
    - name: db
      port: 27017
      protocol: tcp
      endpoints:
        - address: APP
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 10s
      baseEjectionTime: 30s
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - name: jason
    match:
    - headers:
        end-user:
          exact: jason
      uri:
        prefix: /reviews
    route:
    - destination:
        host: reviews
        subset: v1
      headers:
        request:
          set:
            x-route: jason
        response:
          remove:
          - server
  - name: regex
    match:
    - uri:
        regex: "^/api/v[0-9]+/.*"
      method:
        exact: POST
    rewrite:
      uri: /rewritten
    route:
    - destination:
        host: reviews
        subset: v2
    retries:
      attempts: 2
      perTryTimeout: 1s
      retryOn: 5xx,reset
  - name: split
    route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v2
      weight: 50
    timeout: 2s
"#;

/// A sidecar with outbound and inbound listeners and a small app behind
/// it, started once per process; returns the outbound address.
fn sidecar() -> SocketAddr {
    static OUTBOUND: LazyLock<SocketAddr> = LazyLock::new(|| {
        runtime().block_on(async {
            let app = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("app listener");
            let app_addr = app.local_addr().expect("app address");
            tokio::spawn(serve_app(app));
            let identity = lumen_core::Workload {
                service: "productpage".into(),
                workload: "productpage-v1".into(),
                namespace: "default".into(),
                version: "v1".into(),
            };
            let mut pc = lumen_proxy::ProxyConfig::new(identity);
            pc.outbound = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
            pc.inbound = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
            pc.app = Some(app_addr);
            // Records go to a collector that is not there: counted drops.
            pc.telemetry.collector_endpoint = "http://127.0.0.1:9".into();
            pc.upstream_timeout = Duration::from_secs(2);
            pc.drain_timeout = Duration::from_millis(100);
            let (tx, rx) = tokio::sync::watch::channel(Arc::new(MeshConfig::default()));
            let proxy = lumen_proxy::Proxy::bind(pc, rx)
                .await
                .expect("sidecar listeners");
            let inbound = proxy.inbound_addr().expect("inbound address");
            let mesh = MeshConfig::from_yaml(
                "fuzz-mesh.yaml",
                &PROXY_MESH.replace("APP", &inbound.to_string()),
            )
            .expect("the sidecar target's mesh is valid");
            tx.send_replace(Arc::new(mesh));
            let outbound = proxy.outbound_addr().expect("outbound address");
            std::mem::forget(tx);
            tokio::spawn(proxy.run(std::future::pending()));
            outbound
        })
    });
    *OUTBOUND
}

/// Answers every HTTP/1 request on a connection with a small 200, and
/// echoes anything that is not HTTP (the TCP service).
async fn serve_app(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let reply: &[u8] = if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nserver: app\r\n\r\nok"
                } else {
                    &buf[..n]
                };
                if conn.write_all(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}
