//! The query service's settings as a resource in a config file:
//!
//! ```yaml
//! apiVersion: lumen.dev/v1alpha1
//! kind: QueryService
//! metadata:
//!   name: default
//! spec:
//!   threads: 4              # query executor threads [default: concurrency]
//!   parallelism: 1          # cores one query may use [default: half the cores]
//!   timeout: 30s            # per query, from its turn to its last row
//!   memoryMiB: 512          # per query: operators and result
//!   memoryBudgetMiB: 1024   # all running queries together
//!   concurrency: 4          # queries executing at once
//!   queue: 16               # queries waiting for a turn
//!   queueTimeout: 10s       # longest wait for a turn
//!   maxRows: 1000000        # rows in one result
//!   maxResultMiB: 256       # memory of one result
//!   slowQuery: 5s           # log queries at least this slow
//!   spillMiB: 2048          # disk one query may spill to; 0: no spilling
//!   spillDir: /var/tmp/x    # [default: <data-dir>/query-spill]
//!   ingestShare: 25         # % of query threads' time kept while ingest
//!                           # is busy; 100: never step aside
//! ```
//!
//! Every field is optional; command-line flags override the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lumen_core::ConfigError;
use lumen_core::resource::{Kind, parse_resources};
use serde::Deserialize;

use crate::engine::QueryConfig;

/// The kind of resource these settings come in.
pub const KIND: &str = "QueryService";

/// `spec` of a `QueryService` resource; unset fields keep their defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct QuerySettings {
    pub threads: Option<usize>,
    pub parallelism: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: Option<usize>,
    #[serde(rename = "memoryBudgetMiB")]
    pub memory_budget_mib: Option<usize>,
    pub concurrency: Option<usize>,
    pub queue: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    pub queue_timeout: Option<Duration>,
    pub max_rows: Option<usize>,
    #[serde(rename = "maxResultMiB")]
    pub max_result_mib: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    pub slow_query: Option<Duration>,
    #[serde(rename = "spillMiB")]
    pub spill_mib: Option<u64>,
    pub spill_dir: Option<PathBuf>,
    pub ingest_share: Option<u32>,
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{s}` is not a duration like 30s, 500ms or 5m: {e}"
        ))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

impl QuerySettings {
    /// Reads the `QueryService` resource of a file (other kinds are refused,
    /// so a misspelt kind is not silently ignored).
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: file.clone(),
            source,
        })?;
        Ok(Self::from_yaml(&file, &text)?)
    }

    pub fn from_yaml(file: &str, text: &str) -> Result<Self, ConfigError> {
        let mut found: Option<QuerySettings> = None;
        for res in parse_resources(file, text)? {
            if res.kind != Kind::QueryService {
                return Err(res.error(
                    "kind",
                    format!("unexpected kind `{}`, expected `{KIND}`", res.kind),
                ));
            }
            if found.is_some() {
                return Err(res.error(
                    "kind",
                    format!("only one `{KIND}` resource is allowed per file"),
                ));
            }
            let settings: QuerySettings = res.spec()?;
            settings
                .validate()
                .map_err(|(field, reason)| res.error(format!("spec.{field}"), reason))?;
            found = Some(settings);
        }
        found.ok_or_else(|| ConfigError {
            file: file.to_string(),
            resource: String::new(),
            field: String::new(),
            reason: format!("no {KIND} resource in file"),
        })
    }

    /// Values that parse but cannot work.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let positive = [
            ("threads", self.threads),
            ("parallelism", self.parallelism),
            ("memoryMiB", self.memory_mib),
            ("memoryBudgetMiB", self.memory_budget_mib),
            ("concurrency", self.concurrency),
            ("maxResultMiB", self.max_result_mib),
        ];
        for (field, v) in positive {
            if v == Some(0) {
                return Err((field.into(), "must be at least 1".into()));
            }
        }
        for (field, v) in [
            ("timeout", self.timeout),
            ("queueTimeout", self.queue_timeout),
        ] {
            if v == Some(Duration::ZERO) {
                return Err((field.into(), "must be longer than 0s".into()));
            }
        }
        if let Some(share) = self.ingest_share
            && !(1..=100).contains(&share)
        {
            return Err((
                "ingestShare".into(),
                format!("{share} is not a percentage from 1 to 100"),
            ));
        }
        if let (Some(q), Some(b)) = (self.memory_mib, self.memory_budget_mib)
            && q > b
        {
            return Err((
                "memoryMiB".into(),
                format!("{q} MiB per query is more than the budget of {b} MiB for all queries"),
            ));
        }
        Ok(())
    }

    /// Settings given here override `base`; this is how a file and then
    /// flags are layered over the defaults.
    pub fn or(self, base: QuerySettings) -> QuerySettings {
        QuerySettings {
            threads: self.threads.or(base.threads),
            parallelism: self.parallelism.or(base.parallelism),
            timeout: self.timeout.or(base.timeout),
            memory_mib: self.memory_mib.or(base.memory_mib),
            memory_budget_mib: self.memory_budget_mib.or(base.memory_budget_mib),
            concurrency: self.concurrency.or(base.concurrency),
            queue: self.queue.or(base.queue),
            queue_timeout: self.queue_timeout.or(base.queue_timeout),
            max_rows: self.max_rows.or(base.max_rows),
            max_result_mib: self.max_result_mib.or(base.max_result_mib),
            slow_query: self.slow_query.or(base.slow_query),
            spill_mib: self.spill_mib.or(base.spill_mib),
            spill_dir: self.spill_dir.or(base.spill_dir),
            ingest_share: self.ingest_share.or(base.ingest_share),
        }
    }

    /// The engine's configuration: these settings over the defaults.
    pub fn config(&self) -> QueryConfig {
        let d = QueryConfig::default();
        let mib =
            |v: Option<usize>, default: usize| v.map_or(default, |m| m.saturating_mul(1 << 20));
        let memory_bytes = mib(self.memory_mib, d.memory_bytes);
        let max_concurrent = self.concurrency.unwrap_or(d.max_concurrent);
        QueryConfig {
            threads: self.threads.unwrap_or(max_concurrent),
            parallelism: self.parallelism.unwrap_or(d.parallelism),
            timeout: self.timeout.unwrap_or(d.timeout),
            memory_bytes,
            // A per-query limit above the default budget raises the budget
            // with it, so that one such query can run.
            memory_budget_bytes: mib(
                self.memory_budget_mib,
                d.memory_budget_bytes.max(memory_bytes),
            ),
            max_result_rows: self.max_rows.unwrap_or(d.max_result_rows),
            max_result_bytes: mib(self.max_result_mib, d.max_result_bytes),
            max_concurrent,
            max_queued: self.queue.unwrap_or(d.max_queued),
            queue_timeout: self.queue_timeout.unwrap_or(d.queue_timeout),
            slow_query: self.slow_query.unwrap_or(d.slow_query),
            spill_dir: self.spill_dir.clone().or(d.spill_dir),
            spill_bytes: self
                .spill_mib
                .map_or(d.spill_bytes, |m| m.saturating_mul(1 << 20)),
            ingest: d.ingest,
            ingest_share: self.ingest_share.unwrap_or(d.ingest_share),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str =
        "apiVersion: lumen.dev/v1alpha1\nkind: QueryService\nmetadata:\n  name: default\nspec:\n";

    #[test]
    fn a_file_sets_what_it_names_and_flags_override_it() {
        let s = QuerySettings::from_yaml(
            "lumen.yaml",
            &format!("{FILE}  timeout: 2s\n  memoryMiB: 64\n  concurrency: 2\n"),
        )
        .unwrap();
        let flags = QuerySettings {
            concurrency: Some(3),
            ..Default::default()
        };
        let c = flags.or(s).config();
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.memory_bytes, 64 << 20);
        assert_eq!(c.max_concurrent, 3);
        assert_eq!(c.max_result_rows, QueryConfig::default().max_result_rows);
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let e =
            QuerySettings::from_yaml("q.yaml", &format!("{FILE}  timeout: soon\n")).unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.field.as_str()),
            ("q.yaml", "spec.timeout")
        );
        assert!(e.reason.contains("not a duration"), "{e}");

        let e = QuerySettings::from_yaml("q.yaml", &format!("{FILE}  memoryMB: 5\n")).unwrap_err();
        assert_eq!(e.field, "spec.memoryMB");

        let e =
            QuerySettings::from_yaml("q.yaml", &format!("{FILE}  concurrency: 0\n")).unwrap_err();
        assert_eq!(e.field, "spec.concurrency");

        let e = QuerySettings::from_yaml(
            "q.yaml",
            &format!("{FILE}  memoryMiB: 900\n  memoryBudgetMiB: 100\n"),
        )
        .unwrap_err();
        assert!(e.reason.contains("more than the budget"), "{e}");

        let e =
            QuerySettings::from_yaml("q.yaml", &FILE.replace("QueryService", "Mesh")).unwrap_err();
        assert_eq!(e.field, "kind");
    }
}
