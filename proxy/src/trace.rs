//! W3C Trace Context (`traceparent`): read the caller's, start this hop's span,
//! and hand the next hop a header naming it as parent.

use http::HeaderValue;
use rand::RngCore;

pub const TRACEPARENT: &str = "traceparent";

/// The trace a request belongs to and this proxy's span in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub flags: u8,
}

impl TraceContext {
    /// Continues the trace of an incoming `traceparent`, or starts a new
    /// (sampled) trace when there is none or it is malformed, as the W3C
    /// spec asks of a participant that cannot parse the header.
    pub fn continue_from(header: Option<&HeaderValue>) -> Self {
        let span_id = random_span_id();
        if let Some((trace_id, parent, flags)) = header.and_then(|h| parse(h.as_bytes())) {
            return TraceContext {
                trace_id,
                span_id,
                parent_span_id: Some(parent),
                flags,
            };
        }
        let mut trace_id = [0u8; 16];
        while trace_id == [0u8; 16] {
            rand::rng().fill_bytes(&mut trace_id);
        }
        TraceContext {
            trace_id,
            span_id,
            parent_span_id: None,
            flags: 0x01,
        }
    }

    /// The `traceparent` to send upstream: same trace, this hop's span as parent.
    pub fn header_value(&self) -> HeaderValue {
        let mut buf = [0u8; 55];
        buf[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id, &mut buf[3..35]);
        buf[35] = b'-';
        hex_into(&self.span_id, &mut buf[36..52]);
        buf[52] = b'-';
        hex_into(&[self.flags], &mut buf[53..55]);
        // Only hex digits and dashes were written, always a valid header value.
        HeaderValue::from_bytes(&buf).expect("hex traceparent is a valid header value")
    }
}

fn random_span_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    while id == [0u8; 8] {
        rand::rng().fill_bytes(&mut id);
    }
    id
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 0xf) as usize];
    }
}

fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None, // the spec allows lower-case hex only
    };
    let mut out = [0u8; N];
    for i in 0..N {
        out[i] = (digit(s[2 * i])? << 4) | digit(s[2 * i + 1])?;
    }
    Some(out)
}

/// `version-traceid-parentid-flags`; ids of all zeros and version `ff` are invalid.
fn parse(h: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    let mut parts = h.split(|&b| b == b'-');
    let version: [u8; 1] = unhex(parts.next()?)?;
    if version[0] == 0xff {
        return None;
    }
    let trace_id: [u8; 16] = unhex(parts.next()?)?;
    let parent: [u8; 8] = unhex(parts.next()?)?;
    let flags: [u8; 1] = unhex(parts.next()?)?;
    // Version 00 has exactly four fields; later versions may append more.
    if version[0] == 0 && parts.next().is_some() {
        return None;
    }
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace_id, parent, flags[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_traceparent() {
        let h = HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let t = TraceContext::continue_from(Some(&h));
        assert_eq!(
            lumen_core::schema::hex_id(&t.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            t.parent_span_id,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert_ne!(t.span_id, [0; 8]);
        let next = t.header_value();
        let s = next.to_str().unwrap();
        assert!(s.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{s}");
        assert!(s.ends_with("-01"));
        assert_eq!(s.len(), 55);
        // The header we send parses back to the same trace with us as parent.
        let child = TraceContext::continue_from(Some(&next));
        assert_eq!(child.trace_id, t.trace_id);
        assert_eq!(child.parent_span_id, Some(t.span_id));
    }

    #[test]
    fn starts_a_new_trace_when_the_header_is_absent_or_invalid() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let h = HeaderValue::from_str(bad).unwrap();
            let t = TraceContext::continue_from(Some(&h));
            assert_eq!(t.parent_span_id, None, "{bad}");
            assert_ne!(t.trace_id, [0; 16]);
        }
        assert_eq!(TraceContext::continue_from(None).parent_span_id, None);
    }
}
