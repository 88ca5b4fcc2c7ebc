//! The etcd store: the registry in an etcd cluster, shared by every coordinator that uses
//! it (`pagemesh-coordinator --store etcd --etcd-endpoints URLS`).
//!
//! The whole registry is one JSON value under one key (`{prefix}/registry`). A change
//! reads it with its `mod_revision`, applies the same [`Registry`] operation the embedded
//! store does to a copy, and writes the copy back in a transaction that succeeds only if the
//! key's `mod_revision` is still the one read: compare-and-swap, so that two coordinators
//! changing the cluster at once never lose one of the changes; the loser reads again and
//! retries. Every rule of the registry (conflicting registrations, placement, idempotency
//! keys) is thereby kept across coordinators without being written twice.
//!
//! Reads are served from a copy kept current by a watch on the key: each coordinator sees
//! the others' changes as etcd delivers them (milliseconds on a LAN), and its own at once
//! (a successful write updates the copy). Until the watch runs, or after it broke, reads go
//! to etcd.
//!
//! Lease renewals are written too (unlike the embedded store's): a node may renew through
//! any coordinator, and all of them must see it up. One value for everything suits a
//! cluster of tens of nodes and VMs (etcd takes values up to 1.5 MiB by default); a larger
//! one would want a key per record.
//!
//! [`Store`] is synchronous (the embedded store answers from memory), so each call here
//! runs its etcd requests on the coordinator's runtime through
//! [`tokio::task::block_in_place`], which needs the multi-threaded runtime the coordinator
//! runs on. Making the trait async (boxed futures) would remove that.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, Txn, TxnOp};
use pagemesh_api::{
    Cluster, CreateCluster, CreateVm, NodeId, NodeInfo, RegisterEndpoint, RepairReport, Vm, VmId,
};

use super::{Store, StoreError};
use crate::registry::{Lease, Registry, RegistryError, Stored};

/// Compare-and-swap attempts before a change gives up (each lost one means another
/// coordinator's change went in).
const CAS_ATTEMPTS: u32 = 32;
/// Longest wait for one etcd request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request is tried again while etcd cannot answer it (a member died, a leader
/// is being elected).
const RETRY_FOR: Duration = Duration::from_secs(5);

/// The registry in etcd; see the module docs.
pub struct EtcdStore {
    client: Client,
    key: String,
    endpoints: String,
    runtime: tokio::runtime::Handle,
    /// The registry and its `mod_revision`, as the watch (or this store's last write) saw it;
    /// `None` while no watch runs.
    copy: Arc<Mutex<Option<(i64, Registry)>>>,
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port` each) and keeps the
    /// registry under `prefix`; starts the watch on the current runtime.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let listed = endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|source| StoreError::Etcd {
                endpoints: listed.clone(),
                what: "cannot connect",
                source,
            })?;
        let store = EtcdStore {
            client,
            key: format!("{}/registry", prefix.trim_end_matches('/')),
            endpoints: listed,
            runtime: tokio::runtime::Handle::current(),
            copy: Arc::default(),
        };
        // Fails now, not at the first request, when etcd cannot be reached or the value
        // there is not a registry.
        store.fetch().await?;
        tokio::spawn(watch(
            store.client.clone(),
            store.key.clone(),
            store.copy.clone(),
        ));
        Ok(store)
    }

    /// The key the registry lives under.
    pub fn key(&self) -> &str {
        &self.key
    }

    fn failed(&self, what: &'static str) -> impl FnOnce(etcd_client::Error) -> StoreError + '_ {
        move |source| StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            what,
            source,
        }
    }

    /// The registry in etcd now and its `mod_revision` (0 and an empty registry when the
    /// key is not there yet).
    async fn fetch(&self) -> Result<(i64, Registry), StoreError> {
        let answer = retrying(|| {
            let mut client = self.client.clone();
            let key = self.key.clone();
            async move { client.get(key, None).await }
        })
        .await
        .map_err(self.failed("cannot read the registry"))?;
        match answer.kvs().first() {
            None => Ok((0, Registry::default())),
            Some(kv) => {
                let registry = serde_json::from_slice(kv.value()).map_err(|source| {
                    StoreError::CorruptEtcd {
                        key: self.key.clone(),
                        source,
                    }
                })?;
                Ok((kv.mod_revision(), registry))
            }
        }
    }

    /// Runs `f` on the runtime from this synchronous call (see the module docs).
    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        tokio::task::block_in_place(|| self.runtime.block_on(f))
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Registry) -> Result<T, RegistryError>,
    ) -> Result<T, StoreError> {
        {
            let copy = self.copy.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, registry)) = copy.as_ref() {
                return Ok(f(registry)?);
            }
        }
        let (_, registry) = self.block(self.fetch())?;
        Ok(f(&registry)?)
    }

    /// Applies `change` to the registry in etcd by compare-and-swap (see the module docs).
    /// A refused change writes nothing.
    fn update<T>(
        &self,
        mut change: impl FnMut(&mut Registry) -> Result<T, RegistryError>,
    ) -> Result<T, StoreError> {
        self.block(async {
            for _ in 0..CAS_ATTEMPTS {
                let (revision, mut registry) = self.fetch().await?;
                let out = change(&mut registry)?;
                // Plain data with string keys: serializing cannot fail.
                let json = serde_json::to_vec(&registry).expect("the registry serializes");
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        self.key.as_str(),
                        CompareOp::Equal,
                        revision,
                    )])
                    .and_then([TxnOp::put(self.key.as_str(), json, None)]);
                // Safe to repeat: a lost answer to a transaction that went in makes the
                // next try's comparison fail, and the change is read and applied again.
                let answer = retrying(|| {
                    let mut client = self.client.clone();
                    let txn = txn.clone();
                    async move { client.txn(txn).await }
                })
                .await
                .map_err(self.failed("cannot write the registry"))?;
                if answer.succeeded() {
                    if let Some(h) = answer.header() {
                        let mut copy = self.copy.lock().unwrap_or_else(PoisonError::into_inner);
                        if copy.as_ref().is_some_and(|(r, _)| *r < h.revision()) {
                            *copy = Some((h.revision(), registry));
                        }
                    }
                    return Ok(out);
                }
                tracing::debug!("another coordinator changed the registry first; again");
            }
            Err(StoreError::Contended {
                attempts: CAS_ATTEMPTS,
            })
        })
    }
}

/// Tries `op` until it answers, for up to [`RETRY_FOR`]: a member that died fails the
/// requests sent to it until the client's channel stops choosing it, and the others answer.
async fn retrying<T, F: Future<Output = Result<T, etcd_client::Error>>>(
    mut op: impl FnMut() -> F,
) -> Result<T, etcd_client::Error> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() < RETRY_FOR && transient(&e) => {
                tracing::debug!("etcd request failed ({e}); again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether another try may answer: the connection, not the request, failed.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        _ => false,
    }
}

/// Keeps `copy` equal to the registry under `key`: loads it, then follows the key's
/// changes; on any failure forgets the copy (reads go to etcd) and starts again.
async fn watch(client: Client, key: String, copy: Arc<Mutex<Option<(i64, Registry)>>>) {
    let forget = || *copy.lock().unwrap_or_else(PoisonError::into_inner) = None;
    loop {
        let mut c = client.clone();
        let started = async {
            let answer = c.get(key.as_str(), None).await?;
            let (revision, registry) = match answer.kvs().first() {
                Some(kv) => match serde_json::from_slice::<Registry>(kv.value()) {
                    Ok(r) => (kv.mod_revision(), r),
                    Err(e) => return Err(etcd_client::Error::WatchError(e.to_string())),
                },
                None => (0, Registry::default()),
            };
            let after = answer.header().map_or(revision, |h| h.revision());
            let stream = c
                .watch(
                    key.as_str(),
                    Some(etcd_client::WatchOptions::new().with_start_revision(after + 1)),
                )
                .await?;
            *copy.lock().unwrap_or_else(PoisonError::into_inner) = Some((revision, registry));
            Ok::<_, etcd_client::Error>(stream)
        }
        .await;
        let mut stream = match started {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("cannot watch the registry in etcd ({e}); reading it each time");
                forget();
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(answer)) => {
                    for event in answer.events() {
                        let Some(kv) = event.kv() else { continue };
                        if event.event_type() != EventType::Put {
                            forget();
                            continue;
                        }
                        match serde_json::from_slice::<Registry>(kv.value()) {
                            Ok(r) => {
                                let mut copy = copy.lock().unwrap_or_else(PoisonError::into_inner);
                                if copy
                                    .as_ref()
                                    .is_none_or(|(rev, _)| *rev < kv.mod_revision())
                                {
                                    *copy = Some((kv.mod_revision(), r));
                                }
                            }
                            Err(e) => {
                                tracing::warn!("the registry in etcd is not valid: {e}");
                                forget();
                            }
                        }
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::debug!("the watch on the registry in etcd ended; starting again");
                    forget();
                    break;
                }
            }
        }
    }
}

impl Store for EtcdStore {
    fn create_cluster(&self, req: CreateCluster) -> Result<Stored<Cluster>, StoreError> {
        self.update(|r| r.create_cluster(req.clone()))
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
        self.update(|r| r.register(id, req.clone(), lease))
    }

    fn renew_lease(&self, id: NodeId, address: &str, lease: Lease) -> Result<NodeInfo, StoreError> {
        self.update(|r| r.renew(id, address, lease))
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
        self.update(|r| r.create_vm(req.clone(), key, now_ms))
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
        // Read first: a lease watch on every coordinator asks this of every down node.
        if !self.read(|r| Ok(r.would_retire(node)))? {
            return Ok(Vec::new());
        }
        self.update(|r| Ok(r.retire(node)))
    }

    fn report_repair(&self, id: VmId, report: RepairReport) -> Result<Vm, StoreError> {
        self.update(|r| r.report_repair(id, report))
    }
}
