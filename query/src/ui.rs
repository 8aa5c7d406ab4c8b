//! The built-in web UI at `/` on the query port: one page application
//! (service graph, RED table, service pages, live tail, trace view, SQL
//! console, policy) that reads the same HTTP APIs every other client does.
//!
//! Its sources are in `query/ui/src`; `query/ui/build.sh` bundles them
//! with uPlot and Arrow JS into `query/ui/dist`, which is committed and
//! compiled into the binary, so building Lumen needs no npm and the UI
//! works with no network. Each asset is served gzipped to clients that
//! take it, with an ETag, revalidated on every load (`no-cache`), so a
//! new binary's UI shows at once.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

struct Asset {
    content_type: &'static str,
    body: &'static [u8],
    gzip: &'static [u8],
}

macro_rules! asset {
    ($file:literal, $type:literal) => {
        Asset {
            content_type: $type,
            body: include_bytes!(concat!("../ui/dist/", $file)),
            gzip: include_bytes!(concat!("../ui/dist/", $file, ".gz")),
        }
    };
}

static INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");
static SCRIPT: Asset = asset!("app.js", "text/javascript; charset=utf-8");
static STYLE: Asset = asset!("app.css", "text/css; charset=utf-8");
static ICON: Asset = asset!("favicon.svg", "image/svg+xml");

pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|h: HeaderMap| async move { serve(&INDEX, &h) }))
        .route(
            "/ui/app.js",
            get(|h: HeaderMap| async move { serve(&SCRIPT, &h) }),
        )
        .route(
            "/ui/app.css",
            get(|h: HeaderMap| async move { serve(&STYLE, &h) }),
        )
        .route(
            "/favicon.svg",
            get(|h: HeaderMap| async move { serve(&ICON, &h) }),
        )
}

/// The asset, or 304 when the client's copy is this one.
fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", twox_hash::XxHash64::oneshot(0, asset.body));
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else if accepts_gzip(request) {
        let mut r = asset.gzip.into_response();
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        asset.body.into_response()
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    response
}

fn accepts_gzip(request: &HeaderMap) -> bool {
    request
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            // `gzip;q=0` refuses it.
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name == "gzip" || name == "*") && !refused
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn gzip_only_when_taken_and_not_refused() {
        assert!(accepts_gzip(&headers(&[(
            "accept-encoding",
            "gzip, deflate, br"
        )])));
        assert!(!accepts_gzip(&headers(&[("accept-encoding", "br")])));
        assert!(!accepts_gzip(&headers(&[(
            "accept-encoding",
            "gzip;q=0, br"
        )])));
        assert!(!accepts_gzip(&headers(&[])));
    }

    #[test]
    fn a_client_with_this_copy_gets_not_modified() {
        let first = serve(&SCRIPT, &HeaderMap::new());
        assert_eq!(first.status(), StatusCode::OK);
        let etag = first.headers()[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(serve(&SCRIPT, &again).status(), StatusCode::NOT_MODIFIED);
    }

    #[test]
    fn the_committed_bundle_is_built_from_the_committed_sources() {
        // build.sh records a hash of every source it bundled; a change to
        // the sources without a rebuild would ship a stale UI.
        // The checkout `cargo test` runs in, not the one that compiled this
        // test into a shared target directory.
        let dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(
                || env!("CARGO_MANIFEST_DIR").into(),
                std::path::PathBuf::from,
            )
            .join("ui");
        let recorded = std::fs::read_to_string(dir.join("dist/SOURCES"))
            .expect("ui/dist/SOURCES: run query/ui/build.sh");
        let mut files: Vec<String> = std::fs::read_dir(dir.join("src"))
            .expect("ui/src")
            .map(|e| format!("src/{}", e.expect("ui/src entry").file_name().display()))
            .collect();
        files.push("package-lock.json".into());
        files.push("build.sh".into());
        files.sort();
        let mut listing = String::new();
        for name in &files {
            let bytes = std::fs::read(dir.join(name)).expect("ui source");
            let digest = sha2::Sha256::digest(&bytes);
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            listing.push_str(&format!("{hex}  {name}\n"));
        }
        assert_eq!(
            recorded, listing,
            "query/ui/dist is stale: run query/ui/build.sh and commit dist/"
        );
    }
}
