//! Hostile and broken clients and upstreams: each limit and timeout is
//! answered with its status (and flag), counted on `/stats/prometheus`,
//! recorded where a request existed, and the sidecar keeps serving.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use lumen_tests::upstream::start_app;
use lumen_tests::{
    Sidecar, SidecarPorts, UpPorts, local, sql, start_up, wait_for_count, write_mesh,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FLAGS: &[&str] = &[
    "--request-headers-timeout",
    "1s",
    "--stream-idle-timeout",
    "1s",
    "--max-connections",
    "16",
    "--max-request-bytes",
    "10000",
    "--max-headers",
    "20",
    "--max-concurrent-streams",
    "50",
];

/// `lumen_downstream_refused_total{reason}` from a sidecar's admin port.
async fn refused(admin: u16, reason: &str) -> Result<u64> {
    let text = reqwest::get(format!("http://127.0.0.1:{admin}/stats/prometheus"))
        .await?
        .text()
        .await?;
    let line = format!("lumen_downstream_refused_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {reason} count in:\n{text}"))
}

/// Reads until the peer closes (or errors); fails if it stays open.
async fn until_closed(s: &mut TcpStream, within: Duration) -> Result<()> {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Ok(()),
            Ok(Ok(_)) => continue,
            Err(_) => anyhow::bail!("still open after {within:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_timeouts_answer_count_and_leave_the_sidecar_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let up_ports = UpPorts::pick();
    let app = start_app("backend").await;
    let (front, back) = (SidecarPorts::pick(), SidecarPorts::pick());
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("backend", 8080, &[(local(back.inbound), "v1")])])?;
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let sidecar = |service, ports, app| Sidecar {
        service,
        version: "v1",
        mesh: &mesh,
        ports,
        app,
        collector: &collector,
        extra: FLAGS,
    };
    let _front = sidecar("front", front, None).start(logs).await?;
    let _back = sidecar("backend", back, Some(app)).start(logs).await?;
    let outbound = format!("http://127.0.0.1:{}", front.outbound);
    let client = reqwest::Client::new();
    let get = |path: &str| {
        client
            .get(format!("{outbound}{path}"))
            .header("host", "backend")
    };

    // Too many header fields, and one too large: 431.
    let mut many = get("/many-headers");
    for i in 0..30 {
        many = many.header(format!("x-h{i}"), "v");
    }
    assert_eq!(many.send().await?.status(), 431);
    let r = get("/big-header")
        .header("x-big", "v".repeat(100_000))
        .send()
        .await?;
    assert_eq!(r.status(), 431);
    // A request target over 16 KiB: 414.
    let r = get(&format!("/{}", "u".repeat(20_000))).send().await?;
    assert_eq!(r.status(), 414);
    // A method token over 32 bytes: 400.
    let method = http::Method::from_bytes("X".repeat(40).as_bytes())?;
    let r = client
        .request(method, format!("{outbound}/method"))
        .header("host", "backend")
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    // A body over 10000 bytes: 413, whether declared or streamed.
    let r = client
        .post(format!("{outbound}/declared"))
        .header("host", "backend")
        .body("b".repeat(20_000))
        .send()
        .await?;
    assert_eq!(r.status(), 413);
    let chunks =
        futures_util::stream::iter((0..20).map(|_| {
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(vec![b'c'; 1000])))
        }));
    let r = client
        .post(format!("{outbound}/streamed"))
        .header("host", "backend")
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(chunks)))
        .send()
        .await?;
    assert_eq!(r.status(), 413);

    // A body that stalls: 408 and SI once the stream idle timeout passes.
    let mut s = TcpStream::connect(local(front.outbound)).await?;
    s.write_all(
        b"POST /stalled-upload HTTP/1.1\r\nHost: backend\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await?;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut answer))
        .await
        .context("no answer to a stalled upload")??;
    let head = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-lumen-response-flags: si"),
        "{head}"
    );
    drop(s);

    // An upstream that stops mid-body is cut, not waited on forever.
    let r = get("/stalled-download?stall_after=1000").send().await?;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.is_err(), "the body cannot end normally");

    // Slowloris: headers that never finish; the connection is closed.
    let mut s = TcpStream::connect(local(front.outbound)).await?;
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: backend\r\nX-A: 1\r\n")
        .await?;
    until_closed(&mut s, Duration::from_secs(10)).await?;

    // Connections beyond the limit are closed at once; the others still work.
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect(local(front.outbound)).await?;
        // A request line to get past protocol detection; headers pending.
        s.write_all(b"GET /held HTTP/1.1\r\n").await?;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(local(front.outbound)).await?;
    until_closed(&mut extra, Duration::from_secs(5)).await?;
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Tunnels count too, after their connection has become a tunnel.
    let mut tunnels = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect(local(front.outbound)).await?;
        s.write_all(b"CONNECT backend:8080 HTTP/1.1\r\nHost: backend:8080\r\n\r\n")
            .await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        assert_eq!(&head, b"HTTP/1.1 200");
        tunnels.push(s);
    }
    // A request on a 17th connection gets no answer: closed at accept.
    let mut extra = TcpStream::connect(local(front.outbound)).await?;
    let _ = extra
        .write_all(b"GET /status/200/over HTTP/1.1\r\nHost: backend\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    drop(tunnels);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // HTTP/2: the advertised stream limit, and rapid resets end in GOAWAY.
    let tcp = TcpStream::connect(local(front.outbound)).await?;
    let (mut h2, conn) = h2::client::handshake(tcp).await?;
    let conn = tokio::spawn(conn);
    h2 = h2.ready().await?;
    // One exchange, so the server's SETTINGS have arrived.
    let (resp, _) = h2.send_request(http::Request::get("http://backend/first").body(())?, true)?;
    assert_eq!(resp.await?.status(), 200);
    assert_eq!(h2.current_max_send_streams(), 50);
    for _ in 0..200 {
        let req = http::Request::get("http://backend/reset?delay_ms=1000").body(())?;
        match h2.send_request(req, true) {
            Ok((_resp, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => break,
        }
        h2 = match h2.ready().await {
            Ok(h) => h,
            Err(_) => break,
        };
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .context("the connection survived 200 rapid resets")?;
    let err = ended?.expect_err("the server ends the connection");
    // GOAWAY says why; a client still writing resets can find the socket
    // closed before it reads the GOAWAY — `http2_abuse` below counts it
    // either way.
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
        "{err}"
    );

    // Still serving, and every refusal counted.
    let r = get("/status/200/after").send().await?;
    assert_eq!(r.status(), 200);
    for reason in [
        "headers_too_large",
        "uri_too_long",
        "method_too_long",
        "body_too_large",
        "request_headers_timeout",
        "connection_limit",
        "http2_abuse",
    ] {
        assert!(refused(front.admin, reason).await? >= 1, "{reason}");
    }
    assert!(refused(front.admin, "body_too_large").await? >= 2);
    // A sidecar timed out each stall — the stalled upload and the stalled
    // app body: the inbound one, or the outbound one first (both wait the
    // same second).
    for reason in ["request_body_idle", "response_body_idle"] {
        let idle = refused(back.admin, reason).await? + refused(front.admin, reason).await?;
        assert!(idle >= 1, "{reason}");
    }

    let url = up_ports.sql_url();
    let rows = "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND \
         ((path = '/stalled-upload' AND status = 408) \
          OR (status = 413 AND path IN ('/declared', '/streamed')) \
          OR (status = 414) OR (path = '/method' AND status = 400))";
    assert_eq!(wait_for_count(&url, rows, 5).await?, 5);
    // Whichever sidecar cut the stalled upload flagged its row SI.
    let stalled = "SELECT count(*) AS n FROM requests WHERE path = '/stalled-upload' \
         AND status = 408 AND response_flags = 'SI'";
    assert!(wait_for_count(&url, stalled, 1).await? >= 1);
    let cut = "SELECT count(*) AS n FROM requests WHERE path = '/stalled-download' \
         AND status = 200 AND response_flags LIKE '%SI%' AND response_bytes = 1000";
    let both = "SELECT count(*) AS n FROM requests WHERE path = '/stalled-download'";
    assert_eq!(wait_for_count(&url, both, 2).await?, 2);
    let got = wait_for_count(&url, cut, 1).await?;
    let all = sql(
        &url,
        "SELECT reporter, path, status, response_flags, response_bytes FROM requests WHERE path = '/stalled-download'",
    )
    .await?;
    assert!(
        got >= 1 && all.len() == 2,
        "a row per side, one cut for SI: {all:?}"
    );
    Ok(())
}

/// Sends one request on `s` and reads its answer's status line and body
/// (`Content-Length` framed, as the test app answers).
async fn exchange(s: &mut TcpStream, path: &str) -> Result<String> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: backend\r\n\r\n").as_bytes())
        .await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
        anyhow::ensure!(
            n > 0,
            "closed mid-answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= len {
                return Ok(head.lines().next().unwrap_or("").to_string());
            }
        }
    }
}

/// A keep-alive connection idle for longer than the headers timeout is
/// still good for its next request (the timer runs from a request's first
/// byte); past the idle timeout it is closed, and that is no refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_outlives_the_headers_timeout_until_the_idle_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let up_ports = UpPorts::pick();
    let app = start_app("backend").await;
    let front = SidecarPorts::pick();
    let mesh = dir.path().join("mesh.yaml");
    write_mesh(&mesh, &[("backend", 8080, &[(app, "v1")])])?;
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let flags = ["--request-headers-timeout", "1s", "--idle-timeout", "4s"];
    let _front = Sidecar {
        service: "front",
        version: "v1",
        mesh: &mesh,
        ports: front,
        app: None,
        collector: &collector,
        extra: &flags,
    }
    .start(logs)
    .await?;

    let mut s = TcpStream::connect(local(front.outbound)).await?;
    assert!(
        exchange(&mut s, "/status/200/first")
            .await?
            .contains(" 200 ")
    );
    // Idle for twice the headers timeout: still open, still serving.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(
        exchange(&mut s, "/status/200/second")
            .await?
            .contains(" 200 ")
    );
    // A request begun and stalled is still cut by the headers timeout.
    let mut slow = TcpStream::connect(local(front.outbound)).await?;
    assert!(
        exchange(&mut slow, "/status/200/warm")
            .await?
            .contains(" 200 ")
    );
    slow.write_all(b"GET /status/200/slow HTTP/1.1\r\nHo")
        .await?;
    until_closed(&mut slow, Duration::from_secs(3)).await?;
    // Past the idle timeout the first connection is closed, and only the
    // stalled one counts as a refusal.
    until_closed(&mut s, Duration::from_secs(8)).await?;
    assert_eq!(refused(front.admin, "request_headers_timeout").await?, 1);
    Ok(())
}
