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

/// Where a connection redirected by iptables (`REDIRECT`) was going, from
/// `SO_ORIGINAL_DST`; `None` when it was not redirected.
#[cfg(target_os = "linux")]
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    use std::os::fd::AsRawFd;
    let local = stream.local_addr().ok()?;
    let fd = stream.as_raw_fd();
    // SAFETY: `getsockopt` writes at most `len` bytes into a zeroed
    // sockaddr_storage we own, on a socket fd that outlives the call.
    let dst = unsafe {
        let mut addr: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let (level, name) = if local.is_ipv4() {
            (libc::SOL_IP, libc::SO_ORIGINAL_DST)
        } else {
            (libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST)
        };
        let rc = libc::getsockopt(
            fd,
            level,
            name,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        );
        if rc != 0 {
            return None;
        }
        match addr.ss_family as libc::c_int {
            libc::AF_INET => {
                let a = &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                SocketAddr::from((
                    std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                ))
            }
            libc::AF_INET6 => {
                let a = &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                SocketAddr::from((
                    std::net::Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                ))
            }
            _ => return None,
        }
    };
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
}
