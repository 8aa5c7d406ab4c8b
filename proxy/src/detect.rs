//! What a new connection speaks, from its first bytes (peeked, not read):
//! the HTTP/2 preface, an HTTP/1 request line, a TLS ClientHello, or else
//! opaque TCP. A client that sends nothing (a server-first protocol) is
//! TCP once the detection timeout passes; declare such ports `tcp` to
//! skip the wait.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// What a connection was found to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// A TLS ClientHello: passed through as bytes (until mTLS terminates it).
    Tls,
    Tcp,
    /// Closed before sending a byte (a port probe): nothing to serve or record.
    Closed,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest HTTP method token we wait for before calling the bytes TCP.
const MAX_METHOD: usize = 24;

/// Classifies the bytes seen so far; `None`: not enough to tell yet.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    if bytes.is_empty() {
        return None;
    }
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    if bytes[0] == 0x16 {
        return match bytes.get(1) {
            None => None,
            Some(0x03) => Some(Detected::Tls),
            Some(_) => Some(Detected::Tcp),
        };
    }
    // An HTTP/1 request line: a method token of capitals, then a space.
    for (i, &b) in bytes.iter().enumerate().take(MAX_METHOD + 1) {
        match b {
            b'A'..=b'Z' | b'-' | b'_' => continue,
            b' ' if i > 0 => return Some(Detected::Http1),
            _ => return Some(Detected::Tcp),
        }
    }
    if bytes.len() > MAX_METHOD {
        return Some(Detected::Tcp);
    }
    None
}

/// Peeks at `stream` until [`classify`] decides, the peer closes, or
/// `timeout` passes (then: TCP, a server-first protocol).
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 32];
    let mut seen = 0;
    // A client that sent a prefix and stopped is looked at less and less
    // often, so thousands of them cost little.
    let mut pause = Duration::from_millis(1);
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) => n,
            Ok(Err(_)) if seen == 0 => return Detected::Closed,
            // Failed mid-way, or silent past the deadline: bytes it is.
            _ => return Detected::Tcp,
        };
        if n == 0 {
            return if seen == 0 {
                Detected::Closed
            } else {
                Detected::Tcp
            };
        }
        if let Some(d) = classify(&buf[..n]) {
            return d;
        }
        if n == seen {
            // Nothing new yet: peek returns at once while data waits, so
            // give the next segment a moment.
            if tokio::time::timeout_at(deadline, tokio::time::sleep(pause))
                .await
                .is_err()
            {
                return Detected::Tcp;
            }
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        seen = n;
    }
}

/// Largest ClientHello peeked for its server name: a TLS record's most
/// (16 KiB) and its header. Larger hellos (post-quantum key shares can
/// span records) route as if they named no server.
const MAX_HELLO: usize = 16 * 1024 + 5;

/// The server name (SNI) of the TLS ClientHello `stream` opens with,
/// peeked, not read, so the bytes still go upstream untouched. `None`:
/// the hello names no server, is not valid TLS, is larger than one
/// record, or does not arrive within `timeout`.
pub async fn server_name(stream: &TcpStream, timeout: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_HELLO];
    let mut seen = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if n > seen {
            // rustls parses the hello (and refuses a malformed one)
            // without any handshake state or keys.
            let mut acceptor = rustls::server::Acceptor::default();
            let mut bytes = &buf[..n];
            while !bytes.is_empty() {
                match acceptor.read_tls(&mut bytes) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            match acceptor.accept() {
                Ok(Some(hello)) => return hello.client_hello().server_name().map(str::to_owned),
                Ok(None) if n < MAX_HELLO => {}
                _ => return None,
            }
            seen = n;
        }
        tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(5)))
            .await
            .ok()?;
    }
}

/// Where a connection redirected by iptables (`REDIRECT`) was going, from
/// `SO_ORIGINAL_DST`; `None` when it was not redirected.
#[cfg(target_os = "linux")]
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let socket = socket2::SockRef::from(stream);
    let dst = if local.is_ipv4() {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    let dst = dst.ok()?.as_socket()?;
    // Without a REDIRECT the "original" destination is the listener itself.
    (dst != local).then_some(dst)
}

#[cfg(not(target_os = "linux"))]
pub fn original_dst(_stream: &TcpStream) -> Option<SocketAddr> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_the_protocol() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"PROPFIND /x"), Some(Detected::Http1));
        assert_eq!(classify(b"CONNECT a:1 HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), Some(Detected::Tls));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Tcp));
        assert_eq!(classify(b"\x00\x00\x00\x08"), Some(Detected::Tcp));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Detected::Tcp));
        assert_eq!(
            classify(b"HELLOWORLDHELLOWORLDHELLOWORLD"),
            Some(Detected::Tcp)
        );
    }

    #[test]
    fn a_prefix_waits_for_more() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(&[0x16]), None);
    }

    /// The first flight of a real TLS client (rustls) naming `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(config.into(), name.to_owned().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    #[tokio::test]
    async fn the_server_name_is_peeked_from_a_hello_sent_in_pieces() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hello = client_hello("api.example.com");
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(&hello[..7]).await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(&hello[7..]).await.unwrap();
            client
        });
        let name = server_name(&server, Duration::from_secs(5)).await;
        assert_eq!(name.as_deref(), Some("api.example.com"));
        let _client = writer.await.unwrap();
        // Peeked, not read: every byte is still there for upstream.
        let mut buf = vec![0u8; 7];
        assert_eq!(server.peek(&mut buf).await.unwrap(), 7);
        assert_eq!(buf[0], 0x16);

        let mut other = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        other.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
        assert_eq!(server_name(&server, Duration::from_secs(5)).await, None);
    }
}
