//! Istio's RequestAuthentication at the inbound side: a request that
//! carries a JWT (where the workload's rules look: `Authorization: Bearer`
//! and `?access_token=` unless they say otherwise) must carry a valid one
//! — signed by a key of its issuer's JWKS, not expired or not yet valid,
//! for an allowed audience — or it is answered 401 with Envoy's words; a
//! request without one passes (an AuthorizationPolicy may then require
//! one). A valid token's `iss/sub` is the request principal and its
//! claims are what AuthorizationPolicies match.
//!
//! Key sets given by `jwksUri` are fetched on first use (within the rule's
//! timeout), kept, and fetched again after [`JWKS_REFRESH`] or when a
//! token names a key the set lacks; a failed fetch keeps the last good set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use http::{HeaderMap, HeaderValue, Uri};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use lumen_core::security::{JwtRule, RequestAuthentication, TokenLocation};

/// Istio's JWKS refresh interval.
pub const JWKS_REFRESH: Duration = Duration::from_secs(20 * 60);
/// A key set is not fetched again for an unknown key more often than this.
const REFETCH_AT_MOST: Duration = Duration::from_secs(30);
/// Clock skew allowed on `exp` / `nbf`, as Envoy's default.
const LEEWAY_SECS: u64 = 60;

/// A request's validated token.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// `iss/sub`, Istio's request principal.
    pub principal: String,
    pub claims: serde_json::Value,
}

impl Authenticated {
    /// The claim at `path`, as strings (a list's items each; a
    /// space-separated `scope` string, as Istio, too).
    pub fn claim(&self, path: &[String]) -> Vec<String> {
        let mut v = &self.claims;
        for p in path {
            v = &v[p.as_str()];
        }
        match v {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(items) => items
                .iter()
                .filter_map(|x| match x {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Null => None,
                    other => Some(other.to_string()),
                })
                .collect(),
            serde_json::Value::Null => Vec::new(),
            other => vec![other.to_string()],
        }
    }
}

/// Why a token was refused: the RequestAuthentication and Envoy's reason.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub policy: Arc<str>,
    pub reason: String,
}

/// The key sets fetched from `jwksUri`s.
#[derive(Default)]
pub struct KeySets {
    fetched: Mutex<HashMap<String, Fetched>>,
    /// One fetch at a time per URI.
    fetching: tokio::sync::Mutex<()>,
    client: std::sync::OnceLock<reqwest::Client>,
}

impl std::fmt::Debug for KeySets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeySets")
    }
}

#[derive(Clone)]
struct Fetched {
    keys: Arc<JwkSet>,
    at: Instant,
}

impl KeySets {
    fn cached(&self, uri: &str) -> Option<Fetched> {
        self.fetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uri)
            .cloned()
    }

    /// The set at `uri`: cached, or fetched (`stale_for`: a key the cached
    /// set lacks, fetch again if allowed).
    async fn keys(&self, uri: &str, timeout: Duration, stale: bool) -> Result<Arc<JwkSet>, String> {
        let fresh = |f: &Fetched| {
            f.at.elapsed() < JWKS_REFRESH && !(stale && f.at.elapsed() > REFETCH_AT_MOST)
        };
        if let Some(f) = self.cached(uri).filter(fresh) {
            return Ok(f.keys);
        }
        let _one = self.fetching.lock().await;
        if let Some(f) = self.cached(uri).filter(fresh) {
            return Ok(f.keys);
        }
        let client = self.client.get_or_init(reqwest::Client::new);
        let fetched = async {
            let resp = client
                .get(uri)
                .timeout(timeout)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .error_for_status()
                .map_err(|e| e.to_string())?;
            resp.json::<JwkSet>().await.map_err(|e| e.to_string())
        }
        .await;
        match fetched {
            Ok(keys) => {
                let keys = Arc::new(keys);
                self.fetched
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        uri.to_string(),
                        Fetched {
                            keys: keys.clone(),
                            at: Instant::now(),
                        },
                    );
                Ok(keys)
            }
            // The last good set serves while the issuer is unreachable.
            Err(e) => match self.cached(uri) {
                Some(f) => {
                    tracing::warn!(%uri, error = %e, "JWKS fetch failed; keeping the last good key set");
                    Ok(f.keys)
                }
                None => {
                    tracing::warn!(%uri, error = %e, "JWKS fetch failed");
                    Err("Jwks remote fetch is failed".into())
                }
            },
        }
    }
}

/// A token found in a request, and where.
struct Found<'a> {
    token: String,
    rule: &'a JwtRule,
    policy: &'a RequestAuthentication,
    location: &'a TokenLocation,
}

fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

fn token_at(loc: &TokenLocation, headers: &HeaderMap, uri: &Uri) -> Option<String> {
    match loc {
        TokenLocation::Header { name, prefix } => {
            let v = headers.get(name.as_str())?.to_str().ok()?;
            // The prefix is matched as Envoy does, case-sensitively.
            let t = v.strip_prefix(prefix.as_str())?.trim();
            (!t.is_empty()).then(|| t.to_string())
        }
        TokenLocation::Param(p) => query_param(uri, p).map(str::to_string),
        TokenLocation::Cookie(c) => cookie(headers, c),
    }
}

/// The `iss` of a token, unverified (to pick its rule).
fn issuer_of(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_string)
}

/// Checks the request's token against `policies` (those that apply to
/// this workload) and, when valid, edits the headers as the rule says.
pub async fn authenticate(
    keys: &KeySets,
    policies: &[RequestAuthentication],
    headers: &mut HeaderMap,
    uri: &Uri,
) -> Result<Option<Authenticated>, Rejected> {
    let mut found: Vec<Found<'_>> = Vec::new();
    for policy in policies {
        for rule in &policy.rules {
            for location in &rule.locations {
                if let Some(token) = token_at(location, headers, uri) {
                    found.push(Found {
                        token,
                        rule,
                        policy,
                        location,
                    });
                }
            }
        }
    }
    let Some(first) = found.first() else {
        return Ok(None);
    };
    let reject = |f: &Found<'_>, reason: &str| Rejected {
        policy: f.policy.id().into(),
        reason: reason.to_string(),
    };
    let issuer = issuer_of(&first.token).ok_or_else(|| {
        reject(
            first,
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        )
    })?;
    // The rule of the token's issuer that looks where the token was.
    let Some(f) = found
        .iter()
        .find(|f| f.rule.issuer == issuer && f.token == first.token)
    else {
        return Err(reject(first, "Jwt issuer is not configured"));
    };
    let claims = verify(keys, f.rule, &f.token)
        .await
        .map_err(|reason| reject(f, &reason))?;
    let sub = claims.get("sub").and_then(|s| s.as_str()).unwrap_or("");
    let authenticated = Authenticated {
        principal: format!("{issuer}/{sub}"),
        claims,
    };
    edit_headers(f, &authenticated, headers);
    Ok(Some(authenticated))
}

async fn verify(keys: &KeySets, rule: &JwtRule, token: &str) -> Result<serde_json::Value, String> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|_| "Jwt header is an invalid JSON".to_string())?;
    let set = |stale: bool| async move {
        match (&rule.jwks, &rule.jwks_uri) {
            (Some(inline), _) => serde_json::from_str::<JwkSet>(inline)
                .map(Arc::new)
                .map_err(|_| "Jwks is an invalid JSON".to_string()),
            (None, Some(uri)) => keys.keys(uri, rule.timeout, stale).await,
            (None, None) => Err("Jwks doesn't have key to match kid or alg from Jwt".to_string()),
        }
    };
    let pick = |set: &JwkSet| -> Option<jsonwebtoken::jwk::Jwk> {
        match &header.kid {
            Some(kid) => set.find(kid).cloned(),
            None => set.keys.first().cloned(),
        }
    };
    let mut jwk = pick(&*set(false).await?);
    if jwk.is_none() && rule.jwks.is_none() {
        // A rotated key: the issuer's set may have it by now.
        jwk = pick(&*set(true).await?);
    }
    let jwk = jwk.ok_or("Jwks doesn't have key to match kid or alg from Jwt")?;
    let key = DecodingKey::from_jwk(&jwk)
        .map_err(|_| "Jwks doesn't have key to match kid or alg from Jwt")?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = LEEWAY_SECS;
    validation.validate_nbf = true;
    validation.required_spec_claims.clear();
    validation.set_issuer(&[&rule.issuer]);
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rule.audiences);
    }
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .map(|d| d.claims)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => "Jwt is expired",
                K::ImmatureSignature => "Jwt not yet valid",
                K::InvalidAudience | K::MissingRequiredClaim(_) => {
                    "Audiences in Jwt are not allowed"
                }
                K::InvalidIssuer => "Jwt issuer is not configured",
                K::InvalidAlgorithm => "Jwt algorithm is not supported",
                _ => "Jwt verification fails",
            }
            .to_string()
        })
}

/// Removes the token (unless `forwardOriginalToken`) and writes the
/// payload and claims the rule asks for.
fn edit_headers(f: &Found<'_>, a: &Authenticated, headers: &mut HeaderMap) {
    if !f.rule.forward_original_token
        && let TokenLocation::Header { name, .. } = f.location
    {
        headers.remove(name.as_str());
    }
    if let Some(h) = &f.rule.output_payload_to_header {
        let payload = f.token.split('.').nth(1).unwrap_or_default();
        if let (Ok(name), Ok(v)) = (
            http::HeaderName::try_from(h.as_str()),
            HeaderValue::from_str(payload),
        ) {
            headers.insert(name, v);
        }
    }
    for (h, claim) in &f.rule.output_claim_to_headers {
        let path: Vec<String> = claim.split('.').map(str::to_string).collect();
        let value = a.claim(&path).join(",");
        if let (Ok(name), Ok(v)) = (
            http::HeaderName::try_from(h.as_str()),
            HeaderValue::from_str(&value),
        ) {
            headers.insert(name, v);
        }
    }
}
