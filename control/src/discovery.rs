//! File discovery: the mesh file, loaded, validated and watched for changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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

/// Reads and validates a mesh file.
pub fn load_file(path: &Path) -> Result<MeshConfig, ControlError> {
    let text = std::fs::read_to_string(path).map_err(|source| ControlError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(MeshConfig::from_yaml(&path.display().to_string(), &text)?)
}

/// A mesh file and the snapshots published from it.
pub struct FileDiscovery {
    path: PathBuf,
    tx: watch::Sender<Arc<MeshConfig>>,
}

impl FileDiscovery {
    /// Loads the file; fails if it is missing or invalid, so a bad config
    /// never starts a mesh.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, ControlError> {
        let path = path.into();
        let mesh = load_file(&path)?;
        let (tx, _) = watch::channel(Arc::new(mesh));
        Ok(FileDiscovery { path, tx })
    }

    /// Snapshots, starting with the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<MeshConfig>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<MeshConfig> {
        self.tx.borrow().clone()
    }

    /// Polls the file every `interval` until `shutdown` turns true;
    /// publishes each valid change, keeps the last valid config otherwise.
    pub async fn watch(self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut last_seen = modified(&self.path);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let now = modified(&self.path);
            if now == last_seen {
                continue;
            }
            last_seen = now;
            match load_file(&self.path) {
                Ok(mesh) if *self.tx.borrow().as_ref() == mesh => {}
                Ok(mesh) => {
                    tracing::info!(
                        file = %self.path.display(),
                        services = mesh.services.len(),
                        "mesh config reloaded"
                    );
                    self.tx.send_replace(Arc::new(mesh));
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "mesh config change rejected; the last valid config stays in force"
                ),
            }
        }
    }
}

fn modified(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
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
        let discovery = FileDiscovery::open(&path).unwrap();
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
        let e = FileDiscovery::open("/nonexistent/mesh.yaml").err().unwrap();
        assert!(e.to_string().contains("/nonexistent/mesh.yaml"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, MESH.replace("name: a", "name: A")).unwrap();
        let e = FileDiscovery::open(&path).err().unwrap().to_string();
        assert!(e.contains("bad.yaml: spec.services[0].name"), "{e}");
    }
}
