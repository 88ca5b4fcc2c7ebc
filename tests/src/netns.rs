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
    /// The namespace's end.
    peer_if: String,
    /// This namespace's address on the link, seen from the host: nodes in it listen here.
    pub ns_ip: String,
    /// The host's address on the link, seen from the namespace.
    pub host_ip: String,
}

/// Runs `ip args`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    ip_program("ip", args)
}

/// Runs `tc args`.
fn tc(args: &[String]) -> anyhow::Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ip_program("tc", &args)
}

/// Runs `program args` (an iproute2 tool), failing with its stderr.
fn ip_program(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (iproute2)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
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
            peer_if: format!("pmn{id}"),
            ns_ip: format!("10.213.{subnet}.2"),
            host_ip: format!("10.213.{subnet}.1"),
        };
        let peer_if = ns.peer_if.clone();
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

    /// Limits the link to `bits_per_s` each way, with a token bucket (`tc … tbf`: this
    /// kernel has no netem) whose burst is two full frames or 20 µs at the rate, whichever
    /// is more, so that every packet waits its turn on the wire: a 4 KiB page takes about
    /// 33 µs at 1 Gbit/s however idle the link was before it.
    pub fn rate_limit(&self, bits_per_s: u64) -> anyhow::Result<()> {
        let burst = (bits_per_s / 8 / 50_000).max(2 * 1514).to_string();
        let rate = format!("{bits_per_s}bit");
        let tbf = |dev: &str| {
            [
                "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst,
                "latency", "50ms",
            ]
            .map(str::to_owned)
        };
        tc(&tbf(&self.host_if))?;
        let mut inside = vec!["netns", "exec", &self.name, "tc"]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        inside.extend(tbf(&self.peer_if));
        let all: Vec<&str> = inside.iter().map(String::as_str).collect();
        ip_program("ip", &all)
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
