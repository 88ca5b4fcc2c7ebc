//! A real etcd cluster on loopback, for the coordinator's etcd store: Debian's `etcd`
//! (installed by `cargo xtask setup`), one process per member, each with its own data
//! folder and ports picked free a moment before.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{Proc, free_loopback_addr, http_get};

/// The etcd binary: `$PAGEMESH_ETCD`, or `etcd` on the path.
fn etcd() -> String {
    std::env::var("PAGEMESH_ETCD").unwrap_or_else(|_| "etcd".to_owned())
}

/// A running etcd cluster; its members are killed when it is dropped.
pub struct EtcdCluster {
    /// The members, in order (`etcd1`, `etcd2`, …).
    pub members: Vec<Proc>,
    /// Their client URLs, `http://127.0.0.1:PORT`, in the same order.
    pub urls: Vec<String>,
}

impl EtcdCluster {
    /// Starts `n` members in `dir` and waits until each says it is healthy.
    pub fn start(dir: &Path, n: usize) -> anyhow::Result<Self> {
        let clients = (0..n)
            .map(|_| free_loopback_addr().map(|a| format!("http://{a}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let peers = (0..n)
            .map(|_| free_loopback_addr().map(|a| format!("http://{a}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("etcd{}={p}", i + 1))
            .collect();
        let token = format!("pagemesh-{}", std::process::id());
        let mut members = Vec::new();
        for i in 0..n {
            let name = format!("etcd{}", i + 1);
            let data = dir.join(format!("{name}.data"));
            let proc = Proc::spawn(
                &name,
                dir,
                Command::new(etcd())
                    .args(["--name", &name])
                    .arg("--data-dir")
                    .arg(&data)
                    .args(["--listen-client-urls", &clients[i]])
                    .args(["--advertise-client-urls", &clients[i]])
                    .args(["--listen-peer-urls", &peers[i]])
                    .args(["--initial-advertise-peer-urls", &peers[i]])
                    .args(["--initial-cluster", &initial.join(",")])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--initial-cluster-token", &token])
                    // Quicker elections on loopback than the WAN-friendly defaults.
                    .args(["--heartbeat-interval", "50", "--election-timeout", "500"]),
            )
            .with_context(|| {
                format!("cannot start {name}: is etcd installed (cargo xtask setup)?")
            })?;
            members.push(proc);
        }
        let cluster = EtcdCluster {
            members,
            urls: clients,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, url) in cluster.urls.iter().enumerate() {
            loop {
                if http_get(&format!("{url}/health")).is_ok_and(|h| h.contains("true")) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "etcd member {} at {url} is not healthy within 30 s; its log:\n{}",
                        i + 1,
                        cluster.members[i].log_tail()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(cluster)
    }

    /// The client URLs as `--etcd-endpoints` takes them.
    pub fn endpoints(&self) -> String {
        self.urls.join(",")
    }
}
