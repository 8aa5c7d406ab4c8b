//! Just enough HTTP/1.1 for readiness probes, one sanity request and the SQL
//! API: one request per connection (`Connection: close`), so the response ends
//! at EOF and no async runtime or client crate is needed in the harness.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub struct Response {
    pub status: u16,
    pub body: String,
}

pub fn get(addr: SocketAddr, path: &str, host: Option<&str>) -> Result<Response> {
    request(addr, "GET", path, host, None)
}

pub fn post(addr: SocketAddr, path: &str, body: &str) -> Result<Response> {
    request(addr, "POST", path, None, Some(body))
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: Option<&str>,
    body: Option<&str>,
) -> Result<Response> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let host = host.map_or_else(|| addr.to_string(), str::to_string);
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Length: {}\r\nContent-Type: text/plain\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading the response of {method} {path} from {addr}"))?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("incomplete HTTP response: {:?}", truncate(&text, 200));
    };
    let status_line = head.lines().next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP status line {status_line:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok(Response { status, body })
}

fn dechunk(mut s: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").context("truncated chunked body")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).context("truncated chunk")?;
        out.push_str(chunk);
        s = rest.get(size + 2..).context("truncated chunk")?;
    }
}

/// The value of one series on a Lumen process's `/metrics` (NaN when the
/// page or the series is missing, so a caller waiting on it just waits).
pub fn metric(addr: SocketAddr, series: &str) -> f64 {
    get(addr, "/metrics", None)
        .ok()
        .and_then(|r| {
            r.body
                .lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        })
        .unwrap_or(f64::NAN)
}

pub fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n[{\"n\r\n6\r\n\":42}]\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, "[{\"n\":42}]");
    }
}
