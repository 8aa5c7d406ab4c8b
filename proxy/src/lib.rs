//! lumen-proxy
