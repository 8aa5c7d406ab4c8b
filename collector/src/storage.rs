//! Where Parquet files live: a local directory or an object store (S3, GCS,
//! Azure), behind one [`Storage`].
//!
//! A collector alone keeps its tables in `<data>/tables`. Given a store
//! (`--store s3://bucket/prefix`), each collector writes under its own
//! prefix, `<store>/<collector-id>/<table>/date=…/hour=…/part-….parquet`,
//! and reads every other collector's prefix too: the store is the shared
//! truth, collectors scale out beside it, and any Parquet reader (DuckDB,
//! Spark, pyarrow) reads the same Hive-style layout.
//!
//! A local directory is written `*.tmp`, fsynced, renamed and its directory
//! fsynced, so a file is whole and durable before the WAL behind it goes; an
//! object store's PUT is atomic and durable when it answers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    ObjectMeta, ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutMode, PutOptions, PutPayload,
    RetryConfig,
};
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("store URL `{url}`: {message}")]
    Url { url: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error("store option `{key}`: {message}")]
    Option { key: String, message: String },
    #[error(
        "collector id `{0}`: use letters, digits, `.`, `_` and `-` only (it names the collector's prefix in the store)"
    )]
    CollectorId(String),
    #[error(
        "{prefix} belongs to another collector (its data directory holds another claim); give each collector its own --collector-id, or delete {prefix}{CLAIM} if that collector is gone for good"
    )]
    Claimed { prefix: String },
    #[error("{what} {location}: {message}")]
    Io {
        what: &'static str,
        location: String,
        message: String,
    },
}

/// How the store is reached and shared, as the user configured it.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// `None`: `<data>/tables`, this collector's alone. Otherwise a
    /// directory or a URL (`s3://`, `gs://`, `az://`, `file://`).
    pub url: Option<String>,
    /// Names this collector's prefix in a shared store.
    pub collector_id: String,
    /// Settings of the store's client (`aws_endpoint`, `aws_region`,
    /// `google_service_account`, `azure_storage_account_name`, …), over
    /// what the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`) gives.
    pub options: Vec<(String, String)>,
    /// How often other collectors' files are listed.
    pub refresh: Duration,
    /// How long a file this collector took out of its catalog (compacted,
    /// expired) stays in a shared store, so other collectors' queries that
    /// planned with it can still read it.
    pub delete_grace: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            url: None,
            collector_id: default_collector_id(),
            options: Vec::new(),
            refresh: Duration::from_secs(10),
            delete_grace: Duration::from_secs(60),
        }
    }
}

/// The host name: stable for a StatefulSet's pods, which a collector with a
/// local WAL is.
pub fn default_collector_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| valid_id(h))
        .unwrap_or_else(|| "collector".to_string())
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// One collector's view of the store.
#[derive(Debug, Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// `scheme://authority/`, under which DataFusion finds `store`.
    base: Url,
    /// This collector's tables.
    root: Path,
    /// Where every collector's root is, when the store is shared.
    shared: Option<Path>,
    /// For a local filesystem: written with fsyncs, tmp files cleaned up.
    local: Option<Arc<LocalFileSystem>>,
    /// How long taken-out files stay before deletion (shared stores only).
    delete_grace: Duration,
}

impl Storage {
    /// `tables_dir` on the local filesystem, this collector's alone.
    pub fn local(tables_dir: &std::path::Path) -> Result<Storage, StorageError> {
        let dir = std::path::absolute(tables_dir).map_err(|e| StorageError::Url {
            url: tables_dir.display().to_string(),
            message: e.to_string(),
        })?;
        std::fs::create_dir_all(&dir).map_err(|e| StorageError::Io {
            what: "creating",
            location: dir.display().to_string(),
            message: e.to_string(),
        })?;
        sync_parent(&dir);
        Ok(Storage {
            root: local_path(&dir)?,
            ..Storage::filesystem()
        })
    }

    /// The local filesystem as a whole: locations are absolute paths.
    pub fn filesystem() -> Storage {
        Storage {
            store: Arc::new(LocalFileSystem::new()),
            base: Url::parse("file:///").expect("valid URL"),
            root: Path::default(),
            shared: None,
            local: Some(Arc::new(LocalFileSystem::new())),
            delete_grace: Duration::ZERO,
        }
    }

    /// The store `config` names, or `<data_dir>/tables` without one.
    pub fn open(
        config: &StorageConfig,
        data_dir: &std::path::Path,
    ) -> Result<Storage, StorageError> {
        let Some(url) = &config.url else {
            return Storage::local(&data_dir.join("tables"));
        };
        if !valid_id(&config.collector_id) {
            return Err(StorageError::CollectorId(config.collector_id.clone()));
        }
        if config.refresh >= config.delete_grace {
            return Err(StorageError::Config(format!(
                "--store-refresh ({}s) must be shorter than --store-delete-grace ({}s): other collectors must list a compacted file before the files it replaces are deleted",
                config.refresh.as_secs_f64(),
                config.delete_grace.as_secs_f64()
            )));
        }
        let url_err = |message: String| StorageError::Url {
            url: url.clone(),
            message,
        };
        let parsed = match Url::parse(url) {
            Ok(u) if u.scheme().len() > 1 => u,
            // A path (or a Windows drive letter, which is one).
            _ => {
                let dir = std::path::absolute(url).map_err(|e| url_err(e.to_string()))?;
                Url::from_directory_path(&dir)
                    .map_err(|()| url_err("not an absolute directory".into()))?
            }
        };
        // `https://` spellings of buckets would need the bucket moved into
        // each file's URL for readers; the schemes name it as the authority.
        if !matches!(
            parsed.scheme(),
            "file" | "s3" | "s3a" | "gs" | "az" | "adl" | "azure" | "abfs" | "abfss"
        ) {
            return Err(url_err(format!(
                "`{}:` is not a store for tables; use a directory, file://, s3://, gs:// or az://",
                parsed.scheme()
            )));
        }
        let (scheme, prefix) =
            ObjectStoreScheme::parse(&parsed).map_err(|e| url_err(e.to_string()))?;
        let options = config.options.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        // A dead endpoint holds a flush (and a stop) no longer than this;
        // the rows wait in the WAL for the next attempt.
        let retry = RetryConfig {
            retry_timeout: Duration::from_secs(30),
            ..RetryConfig::default()
        };
        let (store, local): (Arc<dyn ObjectStore>, bool) = match scheme {
            ObjectStoreScheme::Local => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| url_err("not a local path".into()))?;
                std::fs::create_dir_all(&dir).map_err(|e| url_err(e.to_string()))?;
                sync_parent(&dir);
                if let Some((key, _)) = config.options.first() {
                    return Err(StorageError::Option {
                        key: key.clone(),
                        message: "a local directory takes no options".into(),
                    });
                }
                (Arc::new(LocalFileSystem::new()), true)
            }
            ObjectStoreScheme::AmazonS3 => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
                let mut b = AmazonS3Builder::from_env()
                    .with_url(url.as_str())
                    .with_retry(retry.clone());
                for (k, v) in options {
                    b = b.with_config(parse_key::<AmazonS3ConfigKey>(k)?, v);
                }
                (
                    Arc::new(b.build().map_err(|e| url_err(e.to_string()))?),
                    false,
                )
            }
            ObjectStoreScheme::GoogleCloudStorage => {
                use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
                let mut b = GoogleCloudStorageBuilder::from_env()
                    .with_url(url.as_str())
                    .with_retry(retry.clone());
                for (k, v) in options {
                    b = b.with_config(parse_key::<GoogleConfigKey>(k)?, v);
                }
                (
                    Arc::new(b.build().map_err(|e| url_err(e.to_string()))?),
                    false,
                )
            }
            ObjectStoreScheme::MicrosoftAzure => {
                use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
                let mut b = MicrosoftAzureBuilder::from_env()
                    .with_url(url.as_str())
                    .with_retry(retry.clone());
                for (k, v) in options {
                    b = b.with_config(parse_key::<AzureConfigKey>(k)?, v);
                }
                (
                    Arc::new(b.build().map_err(|e| url_err(e.to_string()))?),
                    false,
                )
            }
            other => return Err(url_err(format!("{other:?} is not a store for tables"))),
        };
        let base = Url::parse(&format!("{}://{}/", parsed.scheme(), parsed.authority()))
            .map_err(|e| url_err(e.to_string()))?;
        Ok(Storage {
            store,
            base,
            root: prefix.clone().join(config.collector_id.as_str()),
            shared: Some(prefix),
            local: local.then(|| Arc::new(LocalFileSystem::new())),
            delete_grace: config.delete_grace,
        })
    }

    /// The shared store as a query service alone reads it: it owns no
    /// prefix (its root is the shared prefix itself, which no collector's
    /// equals), so every collector's files are others' to it.
    pub fn reader(config: &StorageConfig) -> Result<Storage, StorageError> {
        if config.url.is_none() {
            return Err(StorageError::Config(
                "the query service alone reads a store shared by collectors: give it --store (or LUMEN_STORE), the URL the collectors write to".into(),
            ));
        }
        let as_collector = StorageConfig {
            collector_id: "reader".into(),
            ..config.clone()
        };
        let mut storage = Storage::open(&as_collector, std::path::Path::new("."))?;
        storage.root = storage.shared.clone().unwrap_or_default();
        Ok(storage)
    }

    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// `scheme://authority/` of the store, as DataFusion registers it.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// The full URL of a file, for readers and for logs: each part is
    /// percent-encoded, so readers decode it back to `location` whatever
    /// characters (`#`, `?`, `%`, spaces) a directory name holds.
    pub fn url_of(&self, location: &Path) -> String {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(location.parts());
        }
        url.to_string()
    }

    /// This collector's prefix.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether other collectors share the store (their files are read, and
    /// files taken out of the catalog wait out the delete grace).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    pub fn delete_grace(&self) -> Duration {
        if self.is_shared() {
            self.delete_grace
        } else {
            Duration::ZERO
        }
    }

    /// On the local filesystem, a location's path.
    pub fn local_path(&self, location: &Path) -> Option<PathBuf> {
        self.local.as_ref()?.path_to_filesystem(location).ok()
    }

    /// Claims this collector's prefix of a shared store for the data
    /// directory whose `token` this is, so two collectors given one id
    /// cannot delete each other's files. The same token claims it again
    /// after a restart.
    pub async fn claim(&self, token: &str) -> Result<(), StorageError> {
        if !self.is_shared() {
            return Ok(());
        }
        let at = self.root.clone().join(CLAIM);
        let create = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let payload = PutPayload::from(token.to_string());
        match self.store.put_opts(&at, payload.clone(), create).await {
            Ok(_) => return Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {}
            // Without conditional writes, check first: it catches a second
            // collector started later, not two racing to start.
            Err(object_store::Error::NotImplemented { .. }) => {
                if self.get(&at).await.is_err() {
                    return self
                        .store
                        .put(&at, payload)
                        .await
                        .map(drop)
                        .map_err(|e| self.io_err("writing", &at, e.to_string()));
                }
            }
            Err(e) => return Err(self.io_err("writing", &at, e.to_string())),
        }
        let held = self.get(&at).await?;
        if held.as_ref() == token.as_bytes() {
            Ok(())
        } else {
            Err(StorageError::Claimed {
                prefix: self.url_of(&self.root),
            })
        }
    }

    /// Writes a whole file by `encode`, from a blocking thread (it blocks on
    /// the store's PUT): on a local filesystem streamed into `*.tmp` (no
    /// copy held in memory), fsynced and renamed; to an object store as one
    /// PUT of what it encoded. It appears complete or not at all, and is
    /// durable when this returns. Returns its size.
    pub fn write_blocking(
        &self,
        location: &Path,
        encode: impl FnOnce(&mut (dyn std::io::Write + Send)) -> Result<(), String>,
    ) -> Result<u64, StorageError> {
        let err = |e: String| self.io_err("writing", location, e);
        if let Some(path) = self.local_path(location) {
            return write_local_with(&path, encode).map_err(|e| err(e.to_string()));
        }
        let mut data = Vec::new();
        encode(&mut data).map_err(err)?;
        let size = data.len() as u64;
        tokio::runtime::Handle::current()
            .block_on(self.store.put(location, PutPayload::from(data)))
            .map_err(|e| err(e.to_string()))?;
        Ok(size)
    }

    pub async fn get(&self, location: &Path) -> Result<Bytes, StorageError> {
        let err = |e: object_store::Error| self.io_err("reading", location, e.to_string());
        self.store
            .get(location)
            .await
            .map_err(err)?
            .bytes()
            .await
            .map_err(err)
    }

    pub async fn get_range(
        &self,
        location: &Path,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, StorageError> {
        self.store
            .get_range(location, range)
            .await
            .map_err(|e| self.io_err("reading", location, e.to_string()))
    }

    /// Deletes a file (one already gone is fine); on a local filesystem,
    /// also its `hour=`/`date=` directories once empty.
    pub async fn delete(&self, location: &Path) -> Result<(), StorageError> {
        match self.store.delete(location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.io_err("deleting", location, e.to_string())),
        }
        if let Some(path) = self.local_path(location) {
            for dir in path.ancestors().skip(1).take(2) {
                if std::fs::remove_dir(dir).is_err() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Every file under `prefix`.
    pub async fn list(&self, prefix: &Path) -> Result<Vec<ObjectMeta>, StorageError> {
        self.store
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|e| self.io_err("listing", prefix, e.to_string()))
    }

    /// The prefixes of the other collectors writing the shared store.
    pub async fn others(&self) -> Result<Vec<Path>, StorageError> {
        let Some(shared) = &self.shared else {
            return Ok(Vec::new());
        };
        let listed = self
            .store
            .list_with_delimiter(Some(shared))
            .await
            .map_err(|e| self.io_err("listing", shared, e.to_string()))?;
        Ok(listed
            .common_prefixes
            .into_iter()
            .filter(|p| *p != self.root)
            .collect())
    }

    fn io_err(&self, what: &'static str, location: &Path, message: String) -> StorageError {
        StorageError::Io {
            what,
            location: self.url_of(location),
            message,
        }
    }
}

/// Names the owner of a collector's prefix in a shared store.
pub const CLAIM: &str = "_lumen_collector";

/// Makes a new directory's entry durable (best effort: a store that is
/// not a plain filesystem may not allow it).
fn sync_parent(dir: &std::path::Path) {
    if let Some(parent) = dir.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
}

fn parse_key<K: std::str::FromStr>(key: &str) -> Result<K, StorageError>
where
    K::Err: std::fmt::Display,
{
    key.to_ascii_lowercase()
        .parse()
        .map_err(|e: K::Err| StorageError::Option {
            key: key.to_string(),
            message: e.to_string(),
        })
}

fn local_path(dir: &std::path::Path) -> Result<Path, StorageError> {
    Path::from_absolute_path(dir).map_err(|e| StorageError::Url {
        url: dir.display().to_string(),
        message: e.to_string(),
    })
}

/// `*.tmp`, fsync, rename, fsync of the directories above it: the file's
/// entry must be durable before the WAL behind it is deleted.
fn write_local_with(
    path: &std::path::Path,
    encode: impl FnOnce(&mut (dyn std::io::Write + Send)) -> Result<(), String>,
) -> std::io::Result<u64> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("a file needs a directory"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("parquet.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    let written = encode(&mut file)
        .map_err(std::io::Error::other)
        .and_then(|()| file.sync_all())
        .and_then(|()| file.metadata().map(|m| m.len()));
    drop(file);
    let size = match written.and_then(|size| std::fs::rename(&tmp, path).map(|()| size)) {
        Ok(size) => size,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    // hour=, date=, the table and the root: any of them may be new.
    for d in path.ancestors().skip(1).take(4) {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_store_and_each_collector_its_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig {
            url: Some(format!("file://{}/shared", dir.path().display())),
            collector_id: "c-1".into(),
            ..StorageConfig::default()
        };
        let s = Storage::open(&config, dir.path()).unwrap();
        assert!(s.is_shared());
        let file = s.root().clone().join("requests").join("part-1.parquet");
        assert_eq!(
            s.url_of(&file),
            format!(
                "file://{}/shared/c-1/requests/part-1.parquet",
                dir.path().display()
            )
        );
        assert_eq!(
            s.local_path(&file).unwrap(),
            dir.path().join("shared/c-1/requests/part-1.parquet")
        );

        let alone = Storage::open(&StorageConfig::default(), dir.path()).unwrap();
        assert!(!alone.is_shared());
        assert_eq!(
            alone.local_path(alone.root()).unwrap(),
            dir.path().join("tables")
        );
    }

    #[test]
    fn file_urls_decode_back_to_their_location_whatever_a_directory_is_called() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("lumen data #2?x=%41~[a]");
        let s = Storage::local(&odd).unwrap();
        let file = s.root().clone().join("requests").join("part-1.parquet");
        let url = url::Url::parse(&s.url_of(&file)).unwrap();
        assert_eq!(url.fragment(), None);
        assert_eq!(url.query(), None);
        assert_eq!(Path::from_url_path(url.path()).unwrap(), file);
        assert_eq!(
            s.local_path(&file).unwrap(),
            odd.join("requests/part-1.parquet")
        );
    }

    #[tokio::test]
    async fn a_prefix_is_claimed_by_one_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig {
            url: Some(dir.path().join("shared").display().to_string()),
            collector_id: "c".into(),
            ..StorageConfig::default()
        };
        let s = Storage::open(&config, dir.path()).unwrap();
        s.claim("first").await.unwrap();
        s.claim("first").await.unwrap();
        let e = s.claim("second").await.unwrap_err().to_string();
        assert!(e.contains("belongs to another collector"), "{e}");
    }

    #[test]
    fn bad_ids_urls_and_options_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let with = |url: &str, id: &str, options: Vec<(&str, &str)>| {
            let config = StorageConfig {
                url: Some(url.into()),
                collector_id: id.into(),
                options: options
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..StorageConfig::default()
            };
            Storage::open(&config, dir.path())
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        assert!(with("s3://b/p", "a/b", vec![]).contains("collector id `a/b`"));
        let e = with("s3://b/p", "a", vec![("aws_endpoit", "http://x")]);
        assert!(e.contains("store option `aws_endpoit`"), "{e}");
        let e = with("memory:///", "a", vec![]);
        assert!(e.contains("not a store for tables"), "{e}");
    }

    #[tokio::test]
    async fn local_files_are_written_whole_listed_and_deleted_with_their_directories() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::local(&dir.path().join("tables")).unwrap();
        let file = s
            .root()
            .clone()
            .join("spans")
            .join("date=2026-12-01")
            .join("hour=14")
            .join("part-1.parquet");
        let size = s
            .write_blocking(&file, |w| w.write_all(b"PAR1").map_err(|e| e.to_string()))
            .unwrap();
        assert_eq!(size, 4);
        assert_eq!(s.get(&file).await.unwrap(), Bytes::from_static(b"PAR1"));
        let listed = s.list(&s.root().clone().join("spans")).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].location, file);
        s.delete(&file).await.unwrap();
        s.delete(&file).await.unwrap();
        assert!(!dir.path().join("tables/spans/date=2026-12-01").exists());
        assert!(dir.path().join("tables/spans").exists());
    }
}
