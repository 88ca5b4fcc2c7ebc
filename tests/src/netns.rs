//! A network namespace joined to the test's own by a veth pair, so that a node started in it
//! is reached over a real link that the test can cut (`ip link set … down`) and mend.
//!
//! Root only, like the rest of the suite. Each namespace gets a name and a /30 of its own
//! (`10.213.N.0/30`: the host side `.1`, the namespace side `.2`), made from the process id
//! and a counter, so that tests running at once do not collide. Dropping it deletes the
//! namespace, which deletes the veth pair with it.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

/// Namespaces made by this process so far.
static MADE: AtomicU32 = AtomicU32::new(0);

/// A namespace and the link to it.
pub struct Netns {
    /// The namespace's name (`ip netns exec NAME …`).
    pub name: String,
    /// The host end of the veth pair.
    host_if: String,
    /// This namespace's address on the link, seen from the host: nodes in it listen here.
    pub ns_ip: String,
    /// The host's address on the link, seen from the namespace.
    pub host_ip: String,
}

/// Runs `ip args`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// A new namespace with its link up.
    pub fn create() -> anyhow::Result<Self> {
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 10_000) * 10 + n % 10;
        let subnet = (std::process::id() * 7 + n) % 250 + 1;
        // Interface names have at most 15 bytes. Made before the namespace, so that a
        // failure after it deletes the namespace (Drop).
        let ns = Netns {
            name: format!("pm-test-{id}"),
            host_if: format!("pmh{id}"),
            ns_ip: format!("10.213.{subnet}.2"),
            host_ip: format!("10.213.{subnet}.1"),
        };
        let peer_if = format!("pmn{id}");
        // A stale namespace of an earlier run with this name goes first.
        let _ = ip(&["netns", "del", &ns.name]);
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
            "netns",
            &ns.name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &peer_if])?;
        inside(&["link", "set", &peer_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `program` to run inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Cuts the link: packets to and from the namespace are dropped from now on.
    pub fn cut(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, "down"])
    }

    /// Puts the link back up.
    pub fn mend(&self) -> anyhow::Result<()> {
        ip(&["link", "set", &self.host_if, "up"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
