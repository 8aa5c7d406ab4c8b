//! The Lumen policy engine (a later milestone): rules evaluated over live
//! request metrics become decisions — rate limits, quotas, allow/deny — that
//! are streamed to every proxy and enforced there.
//!
//! Nothing lives here yet; the proxy's request path already has the named
//! phases (authorize, rate-limit) where these decisions will be applied.
