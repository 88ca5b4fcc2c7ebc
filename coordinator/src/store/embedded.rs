//! The embedded store: the registry in memory, optionally mirrored to a JSON file.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use pagemesh_api::{
    Cluster, CreateCluster, CreateVm, NodeId, NodeInfo, RegisterEndpoint, RepairReport, Vm, VmId,
};

use super::{Store, StoreError};
use crate::registry::{Lease, Registry, RegistryError, Stored};

/// The registry in memory, behind a mutex; with a state file, every change is written to it
/// before it takes effect, and the file is loaded at start.
#[derive(Debug, Default)]
pub struct EmbeddedStore {
    registry: Mutex<Registry>,
    file: Option<PathBuf>,
}

impl EmbeddedStore {
    /// A store that forgets everything when the process ends.
    pub fn in_memory() -> Self {
        EmbeddedStore::default()
    }

    /// A store kept in the JSON file `path`: loaded from it when it exists, created empty
    /// otherwise (so that an unwritable path fails now, not at the first registration).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        let registry = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let empty = Registry::default();
                write_atomically(&path, &empty)?;
                empty
            }
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        Ok(EmbeddedStore {
            registry: Mutex::new(registry),
            file: Some(path),
        })
    }

    /// The state file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Changes are made to a copy that replaces the registry only once complete (see
        // `update`), so a panic while the lock was held cannot have left it half-changed.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Registry) -> Result<T, RegistryError>,
    ) -> Result<T, StoreError> {
        Ok(f(&self.lock())?)
    }

    /// Applies `change` to a copy of the registry, writes the copy to the state file, and only
    /// then makes it current: a refused request or a failed write changes nothing. The lock is
    /// held across the write so that the file sees changes in the order memory does.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut Registry) -> Result<T, RegistryError>,
    ) -> Result<T, StoreError> {
        let mut current = self.lock();
        let mut next = current.clone();
        let out = change(&mut next)?;
        if let Some(path) = &self.file {
            write_atomically(path, &next)?;
        }
        *current = next;
        Ok(out)
    }
}

impl Store for EmbeddedStore {
    fn create_cluster(&self, req: CreateCluster) -> Result<Stored<Cluster>, StoreError> {
        self.update(|r| r.create_cluster(req))
    }

    fn cluster(&self, name: &str) -> Result<Cluster, StoreError> {
        self.read(|r| r.cluster(name).cloned())
    }

    fn register_endpoint(
        &self,
        id: NodeId,
        req: RegisterEndpoint,
        lease: Lease,
    ) -> Result<Stored<NodeInfo>, StoreError> {
        self.update(|r| r.register(id, req, lease))
    }

    fn renew_lease(&self, id: NodeId, address: &str, lease: Lease) -> Result<NodeInfo, StoreError> {
        // Not written to the state file: a lease is about this process's clock, and a
        // restarted coordinator lets each node renew (or register) again.
        let mut r = self.lock();
        Ok(r.renew(id, address, lease)?)
    }

    fn forget_down(&self, now_ms: u64, after_ms: u64) -> Result<Vec<NodeInfo>, StoreError> {
        if !self.read(|r| Ok(r.any_down_for(now_ms, after_ms)))? {
            return Ok(Vec::new());
        }
        self.update(|r| Ok(r.forget_down(now_ms, after_ms)))
    }

    fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        self.read(|r| Ok(r.nodes().cloned().collect()))
    }

    fn node(&self, id: NodeId) -> Result<NodeInfo, StoreError> {
        self.read(|r| r.node(id).cloned())
    }

    fn deregister(&self, id: NodeId, address: Option<&str>) -> Result<NodeInfo, StoreError> {
        self.update(|r| r.deregister(id, address))
    }

    fn create_vm(
        &self,
        req: CreateVm,
        key: Option<&str>,
        now_ms: u64,
    ) -> Result<Stored<Vm>, StoreError> {
        self.update(|r| r.create_vm(req, key, now_ms))
    }

    fn vm(&self, id: VmId) -> Result<Vm, StoreError> {
        self.read(|r| r.vm(id).cloned())
    }

    fn vms(&self) -> Result<Vec<Vm>, StoreError> {
        self.read(|r| Ok(r.vms().cloned().collect()))
    }

    fn delete_vm(&self, id: VmId) -> Result<Vm, StoreError> {
        self.update(|r| r.delete_vm(id))
    }

    fn retire(&self, node: NodeId) -> Result<Vec<Vm>, StoreError> {
        self.update(|r| Ok(r.retire(node)))
    }

    fn report_repair(&self, id: VmId, report: RepairReport) -> Result<Vm, StoreError> {
        self.update(|r| r.report_repair(id, report))
    }
}

/// Replaces `path` with `registry` so that a crash leaves either the old file or the new one:
/// write a temporary file beside it, flush it to disk, rename it over `path`, flush the
/// directory.
fn write_atomically(path: &Path, registry: &Registry) -> Result<(), StoreError> {
    let write_err = |source| StoreError::Write {
        path: path.to_owned(),
        source,
    };
    // Serializing plain data with string keys cannot fail.
    let mut json = serde_json::to_vec_pretty(registry).map_err(|e| write_err(e.into()))?;
    json.push(b'\n');
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        // Best effort: do not leave a stray temporary file; the error that matters is `written`.
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(write_err)
}

#[cfg(test)]
mod tests {
    use pagemesh_api::{Role, TransportKind};

    use super::*;
    use crate::tests::temp_state;

    fn memory_node(address: &str) -> RegisterEndpoint {
        RegisterEndpoint {
            admin: None,
            transport: TransportKind::Tcp,
            address: address.to_owned(),
            role: Role::Memory,
            capacity_bytes: 1 << 20,
            cluster: None,
            replace: false,
            rdma: None,
        }
    }

    fn at(now_ms: u64) -> Lease {
        Lease {
            now_ms,
            ttl_ms: 10_000,
        }
    }

    #[test]
    fn creates_a_missing_file_and_reloads_changes() {
        let path = temp_state("reload");
        let store = EmbeddedStore::open(&path).unwrap();
        assert!(path.exists());
        assert_eq!(store.path(), Some(path.as_path()));
        store
            .register_endpoint(1, memory_node("h:1"), at(7))
            .unwrap();
        drop(store);

        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.node(1).unwrap().registered_at_ms, 7);
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        assert!(!Path::new(&tmp).exists());
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn refused_and_failed_changes_change_nothing() {
        let path = temp_state("refused");
        let store = EmbeddedStore::open(&path).unwrap();
        store
            .register_endpoint(1, memory_node("h:1"), at(1))
            .unwrap();
        let before = fs::read(&path).unwrap();
        let conflict = store.register_endpoint(1, memory_node("h:2"), at(2));
        assert!(matches!(
            conflict,
            Err(StoreError::Refused(RegistryError::EndpointConflict { .. }))
        ));
        assert_eq!(fs::read(&path).unwrap(), before);

        // A directory in place of the file makes the rename fail.
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        let failed = store.register_endpoint(2, memory_node("h:2"), at(3));
        assert!(
            matches!(failed, Err(StoreError::Write { .. })),
            "{failed:?}"
        );
        assert!(matches!(
            store.node(2),
            Err(StoreError::Refused(RegistryError::UnknownNode(2)))
        ));
        fs::remove_dir(&path).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let path = temp_state("corrupt");
        for bad in ["", "{", r#"{"format":1}"#, "[]"] {
            fs::write(&path, bad).unwrap();
            let err = EmbeddedStore::open(&path).unwrap_err();
            assert!(
                matches!(err, StoreError::Corrupt { .. }),
                "{bad:?}: {err:?}"
            );
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        }
        fs::remove_file(&path).unwrap();
    }
}
