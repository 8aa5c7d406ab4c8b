//! The control plane's resources: one set, keyed by kind, namespace and
//! name, written by the watched files and by `lumen apply / delete`, always
//! valid as a whole. Every accepted change is published as a snapshot with
//! a content version, and kept on disk so a restarted control plane serves
//! what it served before.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lumen_core::control::v1;
use lumen_core::resource::{Resource, ResourceKey, content_version};
use lumen_core::{ConfigError, MeshConfig};
use tokio::sync::watch;

/// One published configuration.
#[derive(Debug)]
pub struct Published {
    pub version: String,
    /// Encoded once, as every stream sends them.
    pub resources: Vec<bytes::Bytes>,
    /// `resources` cut into the parts of a snapshot, each about
    /// [`PART_BYTES`] encoded (one resource larger than that is a part of
    /// its own); one empty part when there are none.
    pub parts: Vec<std::ops::Range<usize>>,
    pub mesh: Arc<MeshConfig>,
}

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error("{0} not found")]
    NotFound(ResourceKey),
    #[error("cannot keep the configuration in {path}: {source}")]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct ConfigStore {
    resources: Mutex<BTreeMap<ResourceKey, Resource>>,
    tx: watch::Sender<Arc<Published>>,
    /// Conditional policies the policy engine has switched on.
    decisions: watch::Sender<Arc<std::collections::BTreeSet<String>>>,
    /// Where the set is kept between runs.
    persist: Option<PathBuf>,
}

/// The encoded size a snapshot part aims at. Each stream's gRPC encoder
/// keeps a buffer as large as the largest message it sent, for as long as
/// the stream lives: with whole views that was the view's size times the
/// proxies connected (76 KiB × 1,000 for 100 services). Parts within
/// tonic's initial 8 KiB buffer never grow it.
pub const PART_BYTES: usize = 4 * 1024;

fn parts(resources: &[bytes::Bytes]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, r) in resources.iter().enumerate() {
        let len = r.len();
        if size > 0 && size + len > PART_BYTES {
            out.push(start..i);
            (start, size) = (i, 0);
        }
        size += len;
    }
    out.push(start..resources.len());
    out
}

fn publish(resources: &BTreeMap<ResourceKey, Resource>) -> Result<Published, ConfigError> {
    let list: Vec<Resource> = resources.values().cloned().collect();
    let mesh = MeshConfig::from_resources(&list)?;
    let resources: Vec<bytes::Bytes> = list
        .iter()
        .map(|r| prost::Message::encode_to_vec(&v1::Resource::from(r)).into())
        .collect();
    Ok(Published {
        version: content_version(&list),
        parts: parts(&resources),
        resources,
        mesh: Arc::new(mesh),
    })
}

impl ConfigStore {
    /// The resources kept at `persist` from the last run (if any), with
    /// `files` over them. Fails when the result is invalid.
    pub fn open(files: Vec<Resource>, persist: Option<PathBuf>) -> Result<Self, StoreError> {
        let from_files: BTreeMap<ResourceKey, Resource> =
            files.into_iter().map(|r| (r.key(), r)).collect();
        let mut map = BTreeMap::new();
        if let Some(path) = &persist
            && let Ok(text) = std::fs::read_to_string(path)
        {
            match serde_json::from_str::<Vec<Resource>>(&text) {
                Ok(kept) => map.extend(kept.into_iter().map(|r| (r.key(), r))),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "kept configuration unreadable; starting from the files")
                }
            }
        }
        let kept_some = !map.is_empty();
        map.extend(from_files.clone());
        let published = match publish(&map) {
            Ok(p) => p,
            // What was kept may not fit today's files: the files win.
            Err(e) if kept_some => {
                tracing::warn!(error = %e, "kept configuration does not validate with the files; starting from the files");
                map = from_files;
                publish(&map)?
            }
            Err(e) => return Err(e.into()),
        };
        let (tx, _) = watch::channel(Arc::new(published));
        let store = ConfigStore {
            resources: Mutex::new(map),
            decisions: watch::channel(Arc::default()).0,
            tx,
            persist,
        };
        store.save(&store.lock())?;
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ResourceKey, Resource>> {
        self.resources.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, map: &BTreeMap<ResourceKey, Resource>) -> Result<(), StoreError> {
        let Some(path) = &self.persist else {
            return Ok(());
        };
        let err = |source| StoreError::Persist {
            path: path.clone(),
            source,
        };
        let list: Vec<&Resource> = map.values().collect();
        let text = serde_json::to_string_pretty(&list).map_err(|e| err(e.into()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Snapshots, starting with the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.tx.subscribe()
    }

    /// Switches conditional policies on (the ones in `active`) and off
    /// (the rest); streams tell every proxy when the set changes.
    pub fn set_active_policies(&self, active: std::collections::BTreeSet<String>) {
        self.decisions.send_if_modified(|current| {
            let changed = **current != active;
            if changed {
                *current = Arc::new(active);
            }
            changed
        });
    }

    pub fn active_policies(&self) -> watch::Receiver<Arc<std::collections::BTreeSet<String>>> {
        self.decisions.subscribe()
    }

    pub fn current(&self) -> Arc<Published> {
        self.tx.borrow().clone()
    }

    /// Changes the set with `edit`; publishes and keeps the result when it
    /// validates (unless `dry_run`), refuses it otherwise.
    fn change<T>(
        &self,
        dry_run: bool,
        edit: impl FnOnce(&mut BTreeMap<ResourceKey, Resource>) -> Result<T, StoreError>,
    ) -> Result<(T, String), StoreError> {
        let mut map = self.lock();
        let mut next = map.clone();
        let out = edit(&mut next)?;
        let published = publish(&next)?;
        let version = published.version.clone();
        if dry_run || version == self.tx.borrow().version {
            return Ok((out, version));
        }
        self.save(&next)?;
        *map = next;
        self.tx.send_replace(Arc::new(published));
        Ok((out, version))
    }

    /// Creates or replaces resources, as `kubectl apply`: one line per
    /// resource (`created`, `configured`, `unchanged`).
    pub fn apply(
        &self,
        resources: Vec<Resource>,
        dry_run: bool,
    ) -> Result<(Vec<String>, String), StoreError> {
        self.change(dry_run, |map| {
            let mut results = Vec::new();
            for r in resources {
                let key = r.key();
                let what = match map.get(&key) {
                    None => "created",
                    Some(old) if old.spec == r.spec && old.labels == r.labels => "unchanged",
                    Some(_) => "configured",
                };
                results.push(format!(
                    "{key} {what}{}",
                    if dry_run { " (dry run)" } else { "" }
                ));
                map.insert(key, r);
            }
            Ok(results)
        })
    }

    /// Deletes resources; an unknown one is an error naming it.
    pub fn delete(&self, keys: Vec<ResourceKey>) -> Result<(Vec<String>, String), StoreError> {
        self.change(false, |map| {
            let mut results = Vec::new();
            for key in keys {
                if map.remove(&key).is_none() {
                    return Err(StoreError::NotFound(key));
                }
                results.push(format!("{key} deleted"));
            }
            Ok(results)
        })
    }

    /// The files changed: `before` are the keys they held, `now` what they
    /// hold. Resources the files no longer define are removed.
    pub fn replace_files(
        &self,
        before: &[ResourceKey],
        now: Vec<Resource>,
    ) -> Result<String, StoreError> {
        self.change(false, |map| {
            for k in before {
                map.remove(k);
            }
            map.extend(now.into_iter().map(|r| (r.key(), r)));
            Ok(())
        })
        .map(|((), v)| v)
    }

    /// A source of resources (the cluster) changed: `before` are the keys
    /// it held, `now` what it holds. Unlike files, one object that does not
    /// validate does not hold back the rest: it is left out and returned
    /// with its error. The change is refused only for an error no resource
    /// of `now` is at fault for.
    pub fn replace_source(
        &self,
        before: &[ResourceKey],
        now: Vec<Resource>,
    ) -> Result<(String, Vec<(ResourceKey, ConfigError)>), StoreError> {
        let mut map = self.lock();
        let mut next = map.clone();
        for k in before {
            next.remove(k);
        }
        let mut ours: std::collections::BTreeSet<ResourceKey> =
            now.iter().map(Resource::key).collect();
        next.extend(now.into_iter().map(|r| (r.key(), r)));
        let mut refused = Vec::new();
        let published = loop {
            match publish(&next) {
                Ok(p) => break p,
                Err(e) => {
                    let Some(key) = ours.iter().find(|k| k.to_string() == e.resource).cloned()
                    else {
                        return Err(e.into());
                    };
                    ours.remove(&key);
                    next.remove(&key);
                    refused.push((key, e));
                }
            }
        };
        let version = published.version.clone();
        if version != self.tx.borrow().version {
            self.save(&next)?;
            *map = next;
            self.tx.send_replace(Arc::new(published));
        }
        Ok((version, refused))
    }

    /// Resources of a kind (all with `None`) in a namespace (all with `None`).
    pub fn get(
        &self,
        kind: Option<lumen_core::resource::Kind>,
        namespace: Option<&str>,
    ) -> Vec<Resource> {
        self.lock()
            .values()
            .filter(|r| kind.is_none_or(|k| r.kind == k))
            .filter(|r| namespace.is_none_or(|n| r.namespace == n))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lumen_core::resource::parse_resources;

    const MESH: &str = "apiVersion: lumen.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec:\n  services:\n    - name: reviews\n      endpoints: [{address: 127.0.0.1:1, version: v1}]\n";
    const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews}}]\n";

    #[test]
    fn apply_publishes_valid_changes_refuses_invalid_ones_and_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("resources.json");
        let store = ConfigStore::open(parse_resources("m.yaml", MESH).unwrap(), Some(kept.clone()))
            .unwrap();
        let v0 = store.current().version.clone();
        let (lines, v1) = store
            .apply(parse_resources("vs.yaml", VS).unwrap(), false)
            .unwrap();
        assert_eq!(lines, ["VirtualService default/reviews created"]);
        assert_ne!(v0, v1);
        let (lines, again) = store
            .apply(parse_resources("vs.yaml", VS).unwrap(), false)
            .unwrap();
        assert_eq!(lines, ["VirtualService default/reviews unchanged"]);
        assert_eq!(again, v1);
        // A destination that does not exist: refused, nothing changes.
        let bad = VS.replace("{host: reviews}", "{host: nowhere}");
        let e = store
            .apply(parse_resources("bad.yaml", &bad).unwrap(), false)
            .unwrap_err();
        assert!(
            e.to_string().contains(
                "bad.yaml: VirtualService default/reviews: spec.http[0].route[0].destination.host"
            ),
            "{e}"
        );
        assert_eq!(store.current().version, v1);
        // A restart serves the same set, at the same version.
        drop(store);
        let store =
            ConfigStore::open(parse_resources("m.yaml", MESH).unwrap(), Some(kept)).unwrap();
        assert_eq!(store.current().version, v1);
        let key = parse_resources("vs.yaml", VS).unwrap()[0].key();
        store.delete(vec![key.clone()]).unwrap();
        assert_eq!(store.current().version, v0);
        assert!(matches!(
            store.delete(vec![key]),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn a_large_view_is_cut_into_bounded_parts_in_order() {
        use prost::Message;
        let big = |name: &str, bytes: usize| -> bytes::Bytes {
            v1::Resource {
                kind: "VirtualService".into(),
                name: name.into(),
                spec_json: "x".repeat(bytes),
                ..Default::default()
            }
            .encode_to_vec()
            .into()
        };
        assert_eq!(parts(&[]), vec![0..0]);
        let list: Vec<bytes::Bytes> = (0..100).map(|i| big(&format!("r{i}"), 700)).collect();
        let cut = parts(&list);
        assert!(cut.len() >= 4, "{cut:?}");
        assert_eq!(cut.first().unwrap().start, 0);
        assert_eq!(cut.last().unwrap().end, 100);
        for w in cut.windows(2) {
            assert_eq!(w[0].end, w[1].start, "contiguous, in order");
        }
        for p in &cut {
            let size: usize = list[p.clone()].iter().map(|r| r.len()).sum();
            assert!(size <= PART_BYTES, "{p:?}: {size}");
        }
        // One resource larger than a part travels alone.
        let list = vec![big("a", 10), big("huge", 3 * PART_BYTES), big("b", 10)];
        assert_eq!(parts(&list), vec![0..1, 1..2, 2..3]);
    }
}
