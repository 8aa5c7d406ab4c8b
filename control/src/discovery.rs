//! File discovery: the mesh's configuration files — Lumen's `Mesh` and
//! Istio's networking resources, in files or directories of them — loaded,
//! validated together and watched for changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lumen_core::resource::{Resource, parse_resources};
use lumen_core::{ConfigError, MeshConfig};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// The configuration files `paths` name: files as given, and the `.yaml`,
/// `.yml` and `.json` files of directories (sorted, not recursive).
pub fn config_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ControlError> {
    let mut out = Vec::new();
    for path in paths {
        let read = |source| ControlError::Read {
            path: path.clone(),
            source,
        };
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(read)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
                })
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}

/// Every resource of the files, each once: a resource defined in two files
/// is an error naming both.
pub fn load_resources(paths: &[PathBuf]) -> Result<Vec<Resource>, ControlError> {
    let mut all: Vec<Resource> = Vec::new();
    for file in config_files(paths)? {
        let text = std::fs::read_to_string(&file).map_err(|source| ControlError::Read {
            path: file.clone(),
            source,
        })?;
        for r in parse_resources(&file.display().to_string(), &text)? {
            if !r.kind.is_mesh_config() {
                continue;
            }
            if let Some(first) = all.iter().find(|x| x.key() == r.key()) {
                return Err(r
                    .error(
                        "metadata.name",
                        format!("{} is already defined in {}", r.key(), first.origin),
                    )
                    .into());
            }
            all.push(r);
        }
    }
    Ok(all)
}

/// Reads and validates the mesh configuration of files and directories.
pub fn load(paths: &[PathBuf]) -> Result<MeshConfig, ControlError> {
    let resources = load_resources(paths)?;
    Ok(MeshConfig::from_resources(&resources)?)
}

/// Reads and validates one mesh file.
pub fn load_file(path: &Path) -> Result<MeshConfig, ControlError> {
    let text = std::fs::read_to_string(path).map_err(|source| ControlError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(MeshConfig::from_yaml(&path.display().to_string(), &text)?)
}

/// Configuration files and the snapshots published from them.
pub struct FileDiscovery {
    paths: Vec<PathBuf>,
    tx: watch::Sender<Arc<MeshConfig>>,
}

impl FileDiscovery {
    /// Loads the files; fails if one is missing or invalid, so a bad config
    /// never starts a mesh.
    pub fn open(paths: impl IntoIterator<Item = impl Into<PathBuf>>) -> Result<Self, ControlError> {
        let paths: Vec<PathBuf> = paths.into_iter().map(Into::into).collect();
        let mesh = load(&paths)?;
        let (tx, _) = watch::channel(Arc::new(mesh));
        Ok(FileDiscovery { paths, tx })
    }

    /// Snapshots, starting with the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshConfig>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<MeshConfig> {
        self.tx.borrow().clone()
    }

    /// Polls the files every `interval` until `shutdown` turns true;
    /// publishes each valid change, keeps the last valid config otherwise.
    pub async fn watch(self, interval: Duration, shutdown: watch::Receiver<bool>) {
        on_change(&self.paths, interval, shutdown, || {
            match load(&self.paths) {
                Ok(mesh) if *self.tx.borrow().as_ref() == mesh => {}
                Ok(mesh) => {
                    tracing::info!(
                        version = %mesh.version,
                        services = mesh.services.len(),
                        virtual_services = mesh.virtual_services.len(),
                        destination_rules = mesh.destination_rules.len(),
                        "mesh config reloaded"
                    );
                    self.tx.send_replace(Arc::new(mesh));
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "mesh config change rejected; the last valid config stays in force"
                ),
            }
        })
        .await
    }
}

type Signature = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

/// What changes when a file is edited, added or removed.
fn signature(paths: &[PathBuf]) -> Signature {
    config_files(paths)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (p, m)
        })
        .collect()
}

/// Calls `changed` each time the files' signature changes (polled every
/// `interval`), until `shutdown` turns true.
async fn on_change(
    paths: &[PathBuf],
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut changed: impl FnMut(),
) {
    let mut last_seen = signature(paths);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let now = signature(paths);
        if now != last_seen {
            last_seen = now;
            changed();
        }
    }
}

/// Feeds a control plane's store from files: each valid change replaces
/// what the files held before; an invalid one is logged and left out.
pub fn feed_store(
    paths: Vec<PathBuf>,
    store: Arc<crate::store::ConfigStore>,
    interval: Duration,
    shutdown: watch::Receiver<bool>,
) -> lumen_core::BoxFuture<'static, ()> {
    Box::pin(feed_store_until(paths, store, interval, shutdown))
}

async fn feed_store_until(
    paths: Vec<PathBuf>,
    store: Arc<crate::store::ConfigStore>,
    interval: Duration,
    shutdown: watch::Receiver<bool>,
) {
    let mut held: Vec<lumen_core::resource::ResourceKey> = load_resources(&paths)
        .map(|rs| rs.iter().map(Resource::key).collect())
        .unwrap_or_default();
    on_change(&paths, interval, shutdown, || {
        let loaded = load_resources(&paths)
            .map_err(|e| e.to_string())
            .and_then(|rs| {
                let keys: Vec<_> = rs.iter().map(Resource::key).collect();
                store
                    .replace_files(&held, rs)
                    .map(|v| (keys, v))
                    .map_err(|e| e.to_string())
            });
        match loaded {
            Ok((keys, version)) => {
                tracing::info!(%version, "configuration files reloaded");
                held = keys;
            }
            Err(e) => tracing::error!(
                error = %e,
                "configuration change rejected; the last valid config stays in force"
            ),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata:\n  name: t\nspec:\n  services:\n    - name: a\n";

    #[tokio::test]
    async fn reloads_valid_changes_and_keeps_the_last_valid_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, MESH).unwrap();
        let discovery = FileDiscovery::open([&path]).unwrap();
        let mut rx = discovery.subscribe();
        assert_eq!(rx.borrow_and_update().services.len(), 1);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(discovery.watch(Duration::from_millis(20), stop_rx));

        // An invalid edit is not published.
        std::fs::write(&path, "apiVersion: nope\n").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!rx.has_changed().unwrap());

        std::fs::write(&path, format!("{MESH}    - name: b\n")).unwrap();
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().services.len(), 2);

        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn missing_and_invalid_files_are_errors_naming_the_file() {
        let e = FileDiscovery::open(["/nonexistent/mesh.yaml"])
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/mesh.yaml"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, MESH.replace("name: a", "name: A")).unwrap();
        let e = FileDiscovery::open([&path]).err().unwrap().to_string();
        assert!(
            e.contains("bad.yaml: Mesh default/t: spec.services[0].name"),
            "{e}"
        );
    }
}
