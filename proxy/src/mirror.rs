//! Mirroring: a copy of a request sent to another cluster, fire and
//! forget. The copy goes out once the request body has ended and was kept
//! whole (bodies up to the replay limit); its answer is read and dropped,
//! and neither its failures nor its slowness ever reach the client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Uri, Version, header};
use http_body_util::BodyExt;

use crate::cluster::Cluster;

/// Sends `parts` with `body` to an endpoint of `cluster`, in the
/// background, within `timeout`. The authority gets Envoy's `-shadow`
/// suffix so the mirror's app can tell copies apart.
pub fn spawn(
    cluster: Arc<Cluster>,
    parts: &http::request::Parts,
    version: Version,
    authority: &str,
    body: (Bytes, Option<HeaderMap>),
    timeout: Duration,
) {
    let Some(endpoint) = cluster.pick(&[], None).map(|e| e.state.clone()) else {
        tracing::debug!(cluster = %cluster.name, "mirror: no healthy endpoint");
        return;
    };
    let shadow = match lumen_core::config::split_authority(authority) {
        Some((host, Some(port))) => format!("{host}-shadow:{port}"),
        Some((host, None)) => format!("{host}-shadow"),
        None => return,
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(shadow.as_str())
        .path_and_query(path)
        .build()
    else {
        return;
    };
    let (data, trailers) = body;
    let body = http_body_util::Full::new(data).map_err(|e| match e {});
    let mut req = Request::new(match trailers {
        None => body.boxed(),
        Some(t) => body.with_trailers(async move { Some(Ok(t)) }).boxed(),
    });
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = parts.headers.clone();
    *req.version_mut() = version;
    if version == Version::HTTP_2 {
        req.headers_mut().remove(header::HOST);
    } else if let Ok(v) = HeaderValue::from_str(&shadow) {
        req.headers_mut().insert(header::HOST, v);
    }
    tokio::spawn(async move {
        let pools = endpoint.pools();
        let pool = if version == Version::HTTP_2 {
            &pools.mirror_http2
        } else {
            &pools.mirror_http1
        };
        let sent = tokio::time::timeout(timeout, async {
            let resp = pool.request(req).await?;
            // Read the answer to its end so the connection can be reused.
            let _ = resp.into_body().collect().await;
            Ok::<_, hyper_util::client::legacy::Error>(())
        })
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "mirror: the copy failed"),
            Err(_) => tracing::debug!("mirror: no answer within the route timeout"),
        }
    });
}
