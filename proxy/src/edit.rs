//! What a route does to a request on its way: header edits, path and
//! authority rewrites, the redirect's location, and the key a
//! consistent-hash balancer hashes.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use lumen_core::config::split_authority;
use lumen_core::networking::{HashKey, HeaderOps, Redirect, Rewrite};

use crate::balance::hash64;

/// Applies `set`, `add` and `remove` (in that order, as Envoy does:
/// removals last, so a header both set and removed is gone).
pub fn apply(headers: &mut HeaderMap, ops: &HeaderOps) {
    for (k, v) in &ops.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.insert(n, v);
        }
    }
    for (k, v) in &ops.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.append(n, v);
        }
    }
    for k in &ops.remove {
        headers.remove(k.as_str());
    }
}

/// The request target after a route's rewrite: the part a `uri` prefix
/// matched replaced (the whole path for other matches, `/` with none, as
/// Istio configures Envoy), or every regex match replaced. The query stays.
pub fn rewrite_path(
    pq: Option<&PathAndQuery>,
    rewrite: &Rewrite,
    matched_prefix: Option<usize>,
    whole_path_matched: bool,
) -> Option<PathAndQuery> {
    let path = pq.map_or("/", |p| p.path());
    let query = pq.and_then(|p| p.query());
    let new_path = if let Some((re, with)) = &rewrite.uri_regex {
        re.replace_all(path, with.as_str()).into_owned()
    } else if let Some(to) = &rewrite.uri {
        let cut = match matched_prefix {
            Some(n) => n.min(path.len()),
            None if whole_path_matched => path.len(),
            None => 1.min(path.len()),
        };
        format!("{to}{}", &path[cut..])
    } else {
        return None;
    };
    let full = match query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    };
    full.parse().ok()
}

/// Where a redirect sends the client.
pub fn redirect_location(r: &Redirect, authority: &str, pq: Option<&PathAndQuery>) -> String {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let (req_host, req_port) = split_authority(authority).unwrap_or((authority, None));
    let bracketed;
    let req_host = if req_host.contains(':') {
        bracketed = format!("[{req_host}]");
        bracketed.as_str()
    } else {
        req_host
    };
    let host = match &r.authority {
        Some(a) => a.as_str(),
        None => req_host,
    };
    let port = if r.port.is_some() {
        r.port
    } else if r.port_from_request {
        req_port
    } else if r.authority.is_none() && r.scheme.is_none() {
        // Same scheme and host: keep the port the client used.
        req_port
    } else {
        None
    };
    let host_port = match port {
        Some(p) if !(scheme == "http" && p == 80 || scheme == "https" && p == 443) => {
            format!("{host}:{p}")
        }
        _ => host.to_string(),
    };
    let path = match (&r.uri, pq) {
        (Some(u), Some(pq)) if !u.contains('?') => match pq.query() {
            Some(q) => format!("{u}?{q}"),
            None => u.clone(),
        },
        (Some(u), _) => u.clone(),
        (None, Some(pq)) => pq.as_str().to_string(),
        (None, None) => "/".into(),
    };
    format!("{scheme}://{host_port}{path}")
}

/// A query parameter's value (`name` alone counts as empty).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if kv == name => Some(""),
        _ => None,
    })
}

/// The hash of a request's key, and the cookie to set when the key is a
/// cookie the client does not have yet (and a `ttl` says to make one).
pub fn request_hash(
    key: &HashKey,
    headers: &HeaderMap,
    pq: Option<&PathAndQuery>,
    peer: SocketAddr,
) -> (Option<u64>, Option<HeaderValue>) {
    match key {
        HashKey::Header(name) => (
            headers.get(name.as_str()).map(|v| hash64(v.as_bytes())),
            None,
        ),
        HashKey::SourceIp => (Some(hash64(peer.ip().to_string().as_bytes())), None),
        HashKey::QueryParameter(name) => (
            query_param(pq.and_then(|p| p.query()), name).map(|v| hash64(v.as_bytes())),
            None,
        ),
        HashKey::Cookie { name, path, ttl } => {
            let found = headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|c| {
                    let (k, v) = c.trim().split_once('=')?;
                    (k == name).then_some(v)
                });
            match (found, ttl) {
                (Some(v), _) => (Some(hash64(v.as_bytes())), None),
                (None, Some(ttl)) => {
                    let value = format!("{:016x}", rand::random::<u64>());
                    let mut cookie = format!("{name}={value}; Max-Age={}", ttl.as_secs().max(1));
                    if let Some(p) = path {
                        cookie.push_str(&format!("; Path={p}"));
                    }
                    cookie.push_str("; HttpOnly");
                    (
                        Some(hash64(value.as_bytes())),
                        HeaderValue::from_str(&cookie).ok(),
                    )
                }
                (None, None) => (None, None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pq(s: &str) -> PathAndQuery {
        s.parse().unwrap()
    }

    #[test]
    fn prefix_rewrites_replace_what_the_prefix_matched() {
        let rw = Rewrite {
            uri: Some("/v2".into()),
            authority: None,
            uri_regex: None,
        };
        let p = pq("/api/items?x=1");
        assert_eq!(
            rewrite_path(Some(&p), &rw, Some(4), false).unwrap(),
            "/v2/items?x=1"
        );
        assert_eq!(rewrite_path(Some(&p), &rw, None, true).unwrap(), "/v2?x=1");
        let re = Rewrite {
            uri: None,
            authority: None,
            uri_regex: Some((regex::Regex::new("^/api/(.*)$").unwrap(), "/${1}/v1".into())),
        };
        assert_eq!(
            rewrite_path(Some(&p), &re, None, false).unwrap(),
            "/items/v1?x=1"
        );
    }

    #[test]
    fn redirects_keep_what_they_do_not_change() {
        let r = Redirect {
            uri: Some("/new".into()),
            authority: None,
            port: None,
            port_from_request: false,
            scheme: None,
            code: 301,
        };
        assert_eq!(
            redirect_location(&r, "shop:8080", Some(&pq("/old?a=1"))),
            "http://shop:8080/new?a=1"
        );
        let r = Redirect {
            authority: Some("example.com".into()),
            scheme: Some("https".into()),
            uri: None,
            ..r
        };
        assert_eq!(
            redirect_location(&r, "shop:8080", Some(&pq("/x"))),
            "https://example.com/x"
        );
    }

    #[test]
    fn a_missing_cookie_with_a_ttl_is_made_and_set() {
        let key = HashKey::Cookie {
            name: "user".into(),
            path: Some("/".into()),
            ttl: Some(std::time::Duration::from_secs(60)),
        };
        let peer = "127.0.0.1:1".parse().unwrap();
        let (h, set) = request_hash(&key, &HeaderMap::new(), None, peer);
        let set = set.unwrap();
        let value = set.to_str().unwrap().split(';').next().unwrap().to_string();
        assert!(value.starts_with("user="));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {value}")).unwrap(),
        );
        let (again, none) = request_hash(&key, &headers, None, peer);
        assert_eq!(h, again);
        assert!(none.is_none());
    }
}
