//! Istio's networking API (`networking.istio.io/v1`, also `v1beta1` and
//! `v1alpha3`): `VirtualService`, `DestinationRule`, `ServiceEntry` and
//! `Gateway` and `Sidecar` (its `outboundTrafficPolicy`), read as Istio's users write them and validated into the typed
//! model the proxy compiles its routing table from.
//!
//! Every field of Istio's schema is known here. A field Lumen does not
//! implement is refused by name with the reason, never silently ignored; a
//! field Istio does not have is refused as unknown (a typo).

pub mod destination_rule;
pub mod gateway;
pub mod service_entry;
pub mod sidecar;
pub mod virtual_service;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::resource::ConfigError;
use crate::resource::Resource;

pub use destination_rule::{
    ConnectionPool, ConsistentHash, DestinationRule, HashKey, HashRing, LoadBalancer,
    LocalityFailover, OutlierDetection, Subset, TlsMode, TrafficPolicy,
};
pub use gateway::{Gateway, GatewayServer};
pub use service_entry::service_entry_services;
pub use sidecar::{OutboundMode, Sidecar};
pub use virtual_service::{
    Fault, HeaderOps, Headers, HttpAction, HttpMatch, HttpRoute, L4Match, Mirror, Redirect,
    Rewrite, RouteDestination, TcpRoute, TlsRoute, VirtualService, WeightedDestination,
};

/// Where a validation error points: the resource and a field path in it.
#[derive(Clone)]
pub(crate) struct At<'a> {
    pub res: &'a Resource,
    pub path: String,
}

impl<'a> At<'a> {
    pub fn spec(res: &'a Resource) -> Self {
        At {
            res,
            path: "spec".into(),
        }
    }

    /// A field below this one: `.name` for a key, `[i]` for an index.
    pub fn at(&self, field: impl std::fmt::Display) -> At<'a> {
        let field = field.to_string();
        let path = if field.starts_with('[') {
            format!("{}{field}", self.path)
        } else {
            format!("{}.{field}", self.path)
        };
        At {
            res: self.res,
            path,
        }
    }

    pub fn err(&self, reason: impl Into<String>) -> ConfigError {
        self.res.error(self.path.clone(), reason)
    }

    /// Refuses a field of Istio's schema that Lumen does not implement.
    pub fn unsupported<T>(
        &self,
        value: &Option<T>,
        field: &str,
        why: &str,
    ) -> Result<(), ConfigError> {
        match value {
            None => Ok(()),
            Some(_) => Err(self.at(field).err(format!("not supported by Lumen: {why}"))),
        }
    }
}

/// `{ exact | prefix | regex }`, Istio's `StringMatch`. A regex is RE2
/// syntax and must match the whole value, as Envoy's `safe_regex` does.
#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

impl PartialEq for StringMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (StringMatch::Exact(a), StringMatch::Exact(b)) => a == b,
            (StringMatch::Prefix(a), StringMatch::Prefix(b)) => a == b,
            (StringMatch::Regex(a), StringMatch::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(e) => value == e,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }

    /// Case-insensitive, for `ignoreUriCase`.
    pub fn matches_ignoring_case(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(e) => value.eq_ignore_ascii_case(e),
            StringMatch::Prefix(p) => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct StringMatchSpec {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
}

impl StringMatchSpec {
    /// `None` for `{}`, which Istio reads as "present, any value" in
    /// header matches.
    pub fn validate(self, at: &At<'_>) -> Result<Option<StringMatch>, ConfigError> {
        match (self.exact, self.prefix, self.regex) {
            (None, None, None) => Ok(None),
            (Some(e), None, None) => Ok(Some(StringMatch::Exact(e))),
            (None, Some(p), None) => Ok(Some(StringMatch::Prefix(p))),
            (None, None, Some(r)) => regex::Regex::new(&format!("^(?:{r})$"))
                .map(|re| Some(StringMatch::Regex(re)))
                .map_err(|e| {
                    at.at("regex")
                        .err(format!("`{r}` is not a valid RE2 regex: {e}"))
                }),
            _ => Err(at.err("set only one of exact, prefix and regex")),
        }
    }
}

/// `{ value: 12.5 }`, Istio's `Percent`, as a fraction of 1.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PercentSpec {
    #[serde(default)]
    value: f64,
}

impl PercentSpec {
    pub fn fraction(&self, at: &At<'_>) -> Result<f64, ConfigError> {
        if !(0.0..=100.0).contains(&self.value) || self.value.is_nan() {
            return Err(at.at("value").err(format!(
                "{} is not a percentage between 0 and 100",
                self.value
            )));
        }
        Ok(self.value / 100.0)
    }
}

/// Istio's `Destination`: a host, a subset of it, a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// As written; resolved against the registry when the mesh is built.
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DestinationSpec {
    host: String,
    #[serde(default)]
    subset: Option<String>,
    #[serde(default)]
    port: Option<PortSelectorSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortSelectorSpec {
    #[serde(default)]
    pub number: u32,
}

impl PortSelectorSpec {
    pub fn port(&self, at: &At<'_>) -> Result<u16, ConfigError> {
        u16::try_from(self.number)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                at.at("number")
                    .err(format!("{} is not a port (1-65535)", self.number))
            })
    }
}

impl DestinationSpec {
    pub fn validate(self, at: &At<'_>) -> Result<Destination, ConfigError> {
        if self.host.trim().is_empty() {
            return Err(at.at("host").err("must not be empty"));
        }
        if self.host.contains('*') {
            return Err(at
                .at("host")
                .err("a destination names one host, not a wildcard"));
        }
        let port = match &self.port {
            None => None,
            Some(p) => Some(p.port(&at.at("port"))?),
        };
        Ok(Destination {
            host: self.host,
            subset: self.subset.filter(|s| !s.is_empty()),
            port,
        })
    }
}

/// A duration as Istio writes one: Go's form (`7s`, `1.5s`, `250ms`,
/// `1h30m`), which protobuf's JSON form (`7s`, `0.5s`) is a case of.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration such as `250ms`, `1.5s` or `1m`");
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += n * unit;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// A duration field: parsed, and not negative.
pub(crate) fn duration_field(text: &str, at: &At<'_>) -> Result<Duration, ConfigError> {
    parse_duration(text).map_err(|e| at.err(e))
}

/// A label selector's `key: value` pairs, checked as Kubernetes label values.
pub(crate) fn labels(
    map: BTreeMap<String, String>,
    at: &At<'_>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    for (k, v) in &map {
        if k.is_empty() || k.len() > 317 {
            return Err(at.at(k).err("not a label key"));
        }
        if v.len() > 63 {
            return Err(at
                .at(k)
                .err(format!("`{v}` is longer than a label value may be (63)")));
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_go_writes_them() {
        assert_eq!(parse_duration("7s"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "7", "7x", "-1s", "1..2s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
