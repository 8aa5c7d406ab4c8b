//! Every protocol a mesh carries, through real sidecars: opaque TCP (by
//! detection or declared), `CONNECT` tunnels, WebSocket upgrades, and an
//! upstream protocol chosen per service rather than copied from the caller.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use lumen_tests::{
    Sidecar, SidecarPorts, UpPorts, h2_client_via, local, sql, start_sidecar, start_up,
    wait_for_count,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket server echoing each message back.
async fn websocket_app() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() {
                        break;
                    }
                    if ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// An app speaking only HTTP/1.1 (`h2 = false`) or only HTTP/2: it
/// answers with the version it saw.
async fn single_protocol_app(h2: bool) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let v = format!("{:?}", req.version());
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        v,
                    ))))
                });
                let io = TokioIo::new(s);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, svc)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    Ok(addr)
}

/// Reads an HTTP/1.1 response head from a raw stream.
async fn read_head(s: &mut TcpStream) -> Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(s.read(&mut byte).await? == 1, "closed in the response head");
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connect_websocket_and_per_service_protocols_pass_through_and_are_recorded()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let logs = dir.path();
    let up_ports = UpPorts::pick();
    let (echo, raw, ws, h1, h2) = (
        lumen_tests::upstream::start_echo().await,
        lumen_tests::upstream::start_echo().await,
        websocket_app().await?,
        single_protocol_app(false).await?,
        single_protocol_app(true).await?,
    );
    let ports: Vec<SidecarPorts> = (0..6).map(|_| SidecarPorts::pick()).collect();
    let [caller, echo_sc, raw_sc, ws_sc, h1_sc, h2_sc] = ports[..] else {
        unreachable!()
    };
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "apiVersion: lumen.dev/v1alpha1
kind: Mesh
metadata:
  name: protocols
spec:
  services:
    - name: echo
      port: 7000
      protocol: tcp
      endpoints: [{{address: {}}}]
    - name: raw
      endpoints: [{{address: {}}}]
    - name: ws
      port: 8080
      endpoints: [{{address: {}}}]
    - name: oldapp
      protocol: http
      endpoints: [{{address: {}}}]
    - name: newapp
      protocol: http2
      endpoints: [{{address: {}}}]
",
            local(echo_sc.inbound),
            local(raw_sc.inbound),
            local(ws_sc.inbound),
            local(h1_sc.inbound),
            local(h2_sc.inbound),
        ),
    )?;
    let _up = start_up(logs, &mesh, &dir.path().join("data"), up_ports, &[]).await?;
    let collector = up_ports.grpc_endpoint();
    let _sidecars = [
        start_sidecar(logs, "caller", "v1", &mesh, caller, None, &collector).await?,
        start_sidecar(logs, "echo", "v1", &mesh, echo_sc, Some(echo), &collector).await?,
        start_sidecar(logs, "raw", "v1", &mesh, raw_sc, Some(raw), &collector).await?,
        start_sidecar(logs, "ws", "v1", &mesh, ws_sc, Some(ws), &collector).await?,
        start_sidecar(logs, "oldapp", "v1", &mesh, h1_sc, Some(h1), &collector).await?,
        start_sidecar(logs, "newapp", "v1", &mesh, h2_sc, Some(h2), &collector).await?,
    ];

    // CONNECT through the caller's sidecar to a service declared `tcp`.
    let payload: Vec<u8> = (0..5000).map(|_| rand::random::<u8>()).collect();
    let mut s = TcpStream::connect(local(caller.outbound)).await?;
    s.write_all(b"CONNECT echo:7000 HTTP/1.1\r\nHost: echo:7000\r\n\r\n")
        .await?;
    let head = read_head(&mut s).await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(&payload).await?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).await?;
    assert_eq!(back, payload, "the echo came back whole");
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    assert!(rest.is_empty());

    // A port probe (connect, close) is nothing to record.
    drop(TcpStream::connect(local(raw_sc.inbound)).await?);
    // Bytes that are not HTTP, straight to a sidecar's inbound listener
    // (as another sidecar forwards them): detected as TCP.
    let mut s = TcpStream::connect(local(raw_sc.inbound)).await?;
    s.write_all(b"\x00\x01binary\xff").await?;
    let mut back = [0u8; 9];
    s.read_exact(&mut back).await?;
    assert_eq!(&back, b"\x00\x01binary\xff");
    drop(s);

    // A WebSocket conversation through both sidecars.
    let stream = TcpStream::connect(local(caller.outbound)).await?;
    let (mut socket, resp) = tokio_tungstenite::client_async("ws://ws:8080/chat", stream)
        .await
        .context("WebSocket handshake through the mesh")?;
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        let text = format!("message {i}");
        socket.send(Message::text(text.clone())).await?;
        let got = socket.next().await.context("echo")??;
        assert_eq!(got.into_text()?.as_str(), text);
    }
    socket.close(None).await?;
    while socket.next().await.is_some() {}
    drop(socket);

    // An HTTP/2 client reaches an HTTP/1.1-only app, and the reverse.
    let h2_client = h2_client_via(local(caller.outbound));
    let resp = h2_client
        .request(http::Request::get("http://oldapp/v").body(Full::new(Bytes::new()))?)
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.into_body().collect().await?.to_bytes(), "HTTP/1.1");
    let resp = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/v", caller.outbound))
        .header("host", "newapp")
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await?, "HTTP/2.0");

    // Istio's TCP metrics on the caller's sidecar count the tunnel.
    let stats = reqwest::get(format!(
        "http://127.0.0.1:{}/stats/prometheus",
        caller.admin
    ))
    .await?
    .text()
    .await?;
    let tcp_counter = |name: &str| {
        stats
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{name}{{"))
                    && l.contains("destination_service_name=\"echo\"")
                    && l.contains("request_protocol=\"tcp\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!(
        tcp_counter("istio_tcp_received_bytes_total"),
        payload.len() as f64,
        "{stats}"
    );
    assert_eq!(
        tcp_counter("istio_tcp_sent_bytes_total"),
        payload.len() as f64,
        "{stats}"
    );
    assert_eq!(
        tcp_counter("istio_tcp_connections_closed_total"),
        1.0,
        "{stats}"
    );

    let url = up_ports.sql_url();
    let n = payload.len() as i64;
    let connect = format!(
        "SELECT count(*) AS n FROM requests WHERE reporter = 'source' AND method = 'CONNECT' \
         AND protocol = 'tcp' AND status = 200 AND destination_service = 'echo' \
         AND request_bytes = {n} AND response_bytes = {n}"
    );
    assert_eq!(wait_for_count(&url, &connect, 1).await?, 1);
    let echoed = format!(
        "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND protocol = 'tcp' \
         AND destination_service = 'echo' AND request_bytes = {n} AND response_bytes = {n} AND method = ''"
    );
    assert_eq!(wait_for_count(&url, &echoed, 1).await?, 1);
    let detected = "SELECT count(*) AS n FROM requests WHERE reporter = 'destination' AND protocol = 'tcp' \
         AND destination_service = 'raw' AND request_bytes = 9 AND response_bytes = 9";
    assert_eq!(wait_for_count(&url, detected, 1).await?, 1);
    let raw_rows = "SELECT count(*) AS n FROM requests WHERE destination_service = 'raw'";
    assert_eq!(
        wait_for_count(&url, raw_rows, 1).await?,
        1,
        "no row for the probe"
    );
    let websocket = "SELECT count(*) AS n FROM requests WHERE protocol = 'websocket' AND status = 101 \
         AND destination_service = 'ws' AND path = '/chat' AND request_bytes > 0 AND response_bytes > 0";
    let got = wait_for_count(&url, websocket, 2).await?;
    let ws_rows = sql(
        &url,
        "SELECT reporter, protocol, status, path, request_bytes, response_bytes, response_flags \
         FROM requests WHERE destination_service = 'ws'",
    )
    .await?;
    assert_eq!(got, 2, "a row per side: {ws_rows:?}");
    let rows = sql(
        &url,
        "SELECT destination_service, protocol, reporter FROM requests \
         WHERE destination_service IN ('oldapp', 'newapp') ORDER BY 1, 3",
    )
    .await?;
    // Each row says what its downstream spoke: the caller's choice at the
    // source, the service's declared protocol between the sidecars.
    let seen: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["destination_service"].as_str().unwrap_or("").to_string(),
                r["protocol"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("newapp".to_string(), "h2".to_string()),
            ("newapp".to_string(), "http/1.1".to_string()),
            ("oldapp".to_string(), "http/1.1".to_string()),
            ("oldapp".to_string(), "h2".to_string()),
        ],
        "{rows:?}"
    );
    Ok(())
}

/// A tunnel outlives the HTTP connection it was opened on, so the drain
/// must wait for it on every worker, not only on the first: with two
/// workers, all of 16 `CONNECT` tunnels still carry bytes after SIGTERM,
/// and the sidecar exits cleanly once they close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_on_every_worker_keep_flowing_through_the_shutdown_drain() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let echo = lumen_tests::upstream::start_echo().await;
    let ports = SidecarPorts::pick();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "apiVersion: lumen.dev/v1alpha1
kind: Mesh
metadata:
  name: drain
spec:
  services:
    - name: echo
      port: 7000
      protocol: tcp
      endpoints: [{{address: {echo}}}]
"
        ),
    )?;
    let mut sidecar = Sidecar {
        service: "caller",
        version: "v1",
        mesh: &mesh,
        ports,
        app: None,
        // Nothing listens there: records are dropped and counted.
        collector: "http://127.0.0.1:1",
        extra: &["--workers", "2"],
    }
    .start(dir.path())
    .await?;

    let mut tunnels = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect(local(ports.outbound)).await?;
        s.write_all(b"CONNECT echo:7000 HTTP/1.1\r\nHost: echo:7000\r\n\r\n")
            .await?;
        let head = read_head(&mut s).await?;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        tunnels.push(s);
    }
    // The second worker holds some of them, or this would test nothing new.
    let (accepted, stats) = lumen_tests::accepted_by_worker(ports.admin, ports.outbound).await?;
    for worker in 0..2 {
        let took = accepted.get(worker).copied().unwrap_or(0);
        assert!(took > 0, "worker {worker} took no connection:\n{stats}");
    }

    let stopping = tokio::task::spawn_blocking(move || {
        let stopped = sidecar.stop_with("TERM", Duration::from_secs(30));
        (stopped, sidecar.logs())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, s) in tunnels.iter_mut().enumerate() {
        let payload = format!("still flowing {i}");
        s.write_all(payload.as_bytes()).await?;
        let mut back = vec![0u8; payload.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .context("no echo within 5 s of the drain")?
            .with_context(|| format!("tunnel {i} was cut in the drain"))?;
        assert_eq!(back, payload.as_bytes());
    }
    for mut s in tunnels {
        s.shutdown().await?;
    }
    let (stopped, logs) = stopping.await?;
    let (code, _) = stopped?;
    assert_eq!(code, 0, "{logs}");
    Ok(())
}
