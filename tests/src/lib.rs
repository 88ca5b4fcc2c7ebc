//! A harness that starts real pagemesh processes on loopback: a coordinator, memory nodes
//! and compute-node runs. Used by the end-to-end tests and by `cargo xtask run/bench`.
//!
//! Every process writes stdout and stderr to files in a run folder; processes announce their
//! addresses on stdout, which the harness waits for. Dropping a [`Proc`] kills it.
//! A compute node's `--json` summary is read back as a [`RunSummary`] ([`read_summary`]).
//! [`proxy`] is a TCP proxy to put between a compute node and a memory node; it cuts their
//! connections in the middle of replies; [`netns`] puts a node behind a real link that a test
//! cuts; [`soak`] keeps a cluster under load for a while and watches its processes.

pub mod etcd;
pub mod netns;
pub mod proxy;
pub mod soak;

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pagemesh_api::summary::RunSummary;

/// Where the binaries are.
#[derive(Clone, Debug)]
pub struct Bins {
    /// `pagemesh-node`.
    pub node: PathBuf,
    /// `pagemesh-coordinator`.
    pub coordinator: PathBuf,
}

impl Bins {
    /// Binaries in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            node: dir.join("pagemesh-node"),
            coordinator: dir.join("pagemesh-coordinator"),
        }
    }

    /// The binaries next to the running test executable (`target/<profile>/`), or in
    /// `$PAGEMESH_BIN_DIR`. Fails with advice when they have not been built.
    pub fn for_tests() -> anyhow::Result<Self> {
        let dir = match std::env::var_os("PAGEMESH_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let exe = std::env::current_exe()?;
                // target/<profile>/deps/<test> -> target/<profile>
                exe.parent()
                    .and_then(Path::parent)
                    .context("test executable has no parent directory")?
                    .to_path_buf()
            }
        };
        let bins = Self::in_dir(&dir);
        for b in [&bins.node, &bins.coordinator] {
            if !b.exists() {
                bail!(
                    "{} is not built; run `cargo build --workspace --bins` first \
                     (cargo xtask test does)",
                    b.display()
                );
            }
        }
        Ok(bins)
    }
}

/// A child process with its output in files; killed when dropped.
pub struct Proc {
    /// Short name (`coordinator`, `node1`).
    pub name: String,
    child: Option<Child>,
    /// File holding its stdout.
    pub stdout: PathBuf,
    /// File holding its stderr.
    pub stderr: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout/stderr going to `<dir>/<name>.out` and `.log`.
    pub fn spawn(name: &str, dir: &Path, cmd: &mut Command) -> anyhow::Result<Self> {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.log"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?)
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            stdout,
            stderr,
        })
    }

    /// OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits until stdout has a line containing `needle`; returns that line.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.stdout).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "{} exited ({status}) before printing '{needle}'; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not print '{needle}' within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin endpoint's URL (`http://host:port`), once the node has announced it.
    pub fn admin_url(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let line = self.wait_for_line(" admin on ", timeout)?;
        Ok(line
            .split(" admin on ")
            .nth(1)
            .context("no address in the admin announcement")?
            .trim()
            .to_owned())
    }

    /// The last lines of its stderr.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Its stdout so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Exit status, if it has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("{} was already reaped", self.name),
        }
    }

    /// Waits for it to exit, killing it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("{} did not exit within {timeout:?}; killed it", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            let pid = i32::try_from(c.id()).unwrap_or(0);
            if pid > 0 {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(pid, signal) };
            }
        }
    }

    /// SIGTERM, then SIGKILL after 5 s; returns the exit status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(5))
    }

    /// Kills it at once.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.try_wait() {
            self.kill();
        }
    }
}

/// A running coordinator.
pub struct Coordinator {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Coordinator {
    /// Starts a coordinator on an ephemeral loopback port.
    pub fn start(bins: &Bins, dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(bins, dir, &[])
    }

    /// Starts a coordinator on an ephemeral loopback port, with `args` added (such as
    /// `--cluster-key-file FILE`).
    pub fn start_with(bins: &Bins, dir: &Path, args: &[&std::ffi::OsStr]) -> anyhow::Result<Self> {
        Self::start_on(bins, dir, "127.0.0.1:0", args)
    }

    /// Starts a coordinator listening on `listen` (`0.0.0.0:0`: every address, for nodes in
    /// a [`netns::Netns`]), with `args` added; [`Coordinator::url`] is then
    /// `http://0.0.0.0:PORT`, which nodes on this host reach.
    pub fn start_on(
        bins: &Bins,
        dir: &Path,
        listen: &str,
        args: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Self> {
        Self::start_named("coordinator", bins, dir, listen, args)
    }

    /// [`Coordinator::start_on`] with its files named `name` (`coordinator2.log`): for a
    /// second coordinator of one cluster.
    pub fn start_named(
        name: &str,
        bins: &Bins,
        dir: &Path,
        listen: &str,
        args: &[&std::ffi::OsStr],
    ) -> anyhow::Result<Self> {
        let mut proc = Proc::spawn(
            name,
            dir,
            Command::new(&bins.coordinator)
                .args(["--listen", listen])
                .args(args),
        )?;
        let line = proc.wait_for_line("listening on ", Duration::from_secs(20))?;
        let url = line
            .split("listening on ")
            .nth(1)
            .context("no address in the coordinator's announcement")?
            .trim()
            .to_owned();
        Ok(Self { proc, url })
    }
}

/// A running memory node.
pub struct MemoryNode {
    /// The process.
    pub proc: Proc,
    /// Node id.
    pub id: u32,
    /// Its page server address.
    pub addr: String,
    /// Its admin endpoint, `http://host:port`.
    pub admin: String,
}

impl MemoryNode {
    /// Starts memory node `id` offering `capacity` (e.g. `512MiB`).
    pub fn start(
        bins: &Bins,
        dir: &Path,
        coordinator: &str,
        id: u32,
        capacity: &str,
    ) -> anyhow::Result<Self> {
        Self::start_at(bins, dir, coordinator, id, capacity, "127.0.0.1:0", None)
    }

    /// Starts memory node `id` listening on `listen` and registering `advertise`, when given,
    /// as the address peers use (`--advertise`; [`MemoryNode::addr`] is then that address).
    pub fn start_at(
        bins: &Bins,
        dir: &Path,
        coordinator: &str,
        id: u32,
        capacity: &str,
        listen: &str,
        advertise: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::start_with(bins, dir, coordinator, id, capacity, listen, advertise, &[])
    }

    /// [`MemoryNode::start_at`] with `args` added (`--tls-cert ...`).
    #[allow(clippy::too_many_arguments, reason = "each is one flag of the node")]
    pub fn start_with(
        bins: &Bins,
        dir: &Path,
        coordinator: &str,
        id: u32,
        capacity: &str,
        listen: &str,
        advertise: Option<&str>,
        args: &[String],
    ) -> anyhow::Result<Self> {
        Self::spawn(
            Command::new(&bins.node),
            dir,
            coordinator,
            id,
            capacity,
            listen,
            advertise,
            args,
        )
    }

    /// Starts memory node `id` inside `netns`, listening on its address there and reaching
    /// the coordinator at `coordinator` (an address of the host's end of the link).
    pub fn start_in(
        netns: &crate::netns::Netns,
        bins: &Bins,
        dir: &Path,
        coordinator: &str,
        id: u32,
        capacity: &str,
        args: &[String],
    ) -> anyhow::Result<Self> {
        let listen = format!("{}:0", netns.ns_ip);
        let cmd = netns.command(&bins.node);
        Self::spawn(cmd, dir, coordinator, id, capacity, &listen, None, args)
    }

    #[allow(clippy::too_many_arguments, reason = "each is one flag of the node")]
    fn spawn(
        mut cmd: Command,
        dir: &Path,
        coordinator: &str,
        id: u32,
        capacity: &str,
        listen: &str,
        advertise: Option<&str>,
        args: &[String],
    ) -> anyhow::Result<Self> {
        cmd.args(args);
        cmd.args(["--role", "memory", "--listen", listen])
            .args(["--id", &id.to_string(), "--coordinator", coordinator])
            .args(["--capacity", capacity])
            // Images (`--image`, a Linux guest's boot image) are loaded from the run folder.
            .arg("--image-dir")
            .arg(dir);
        if let Some(a) = advertise {
            cmd.args(["--advertise", a]);
        }
        let mut proc = Proc::spawn(&format!("node{id}"), dir, &mut cmd)?;
        let line = proc.wait_for_line("serving pages on ", Duration::from_secs(30))?;
        let addr = line
            .split("serving pages on ")
            .nth(1)
            .context("no address in the node's announcement")?
            .trim()
            .to_owned();
        let admin = proc.admin_url(Duration::from_secs(5))?;
        Ok(Self {
            proc,
            id,
            addr,
            admin,
        })
    }
}

/// A coordinator and memory nodes, in a run folder.
pub struct Cluster {
    /// Run folder with every process's output.
    pub dir: PathBuf,
    /// The binaries.
    pub bins: Bins,
    /// The coordinator.
    pub coordinator: Coordinator,
    /// The memory nodes.
    pub memory: Vec<MemoryNode>,
    runs: u32,
}

impl Cluster {
    /// Starts a coordinator and memory nodes `ids`, each offering `capacity`.
    pub fn start(bins: Bins, dir: PathBuf, ids: &[u32], capacity: &str) -> anyhow::Result<Self> {
        Self::start_with(bins, dir, ids, capacity, &[])
    }

    /// [`Cluster::start`] with `memory_args` added to every memory node's command line.
    pub fn start_with(
        bins: Bins,
        dir: PathBuf,
        ids: &[u32],
        capacity: &str,
        memory_args: &[String],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let coordinator = Coordinator::start(&bins, &dir)?;
        let memory = ids
            .iter()
            .map(|&id| {
                MemoryNode::start_with(
                    &bins,
                    &dir,
                    &coordinator.url,
                    id,
                    capacity,
                    "127.0.0.1:0",
                    None,
                    memory_args,
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            dir,
            bins,
            coordinator,
            memory,
            runs: 0,
        })
    }

    /// A cluster of processes started by hand (a coordinator on another address, a memory
    /// node in a [`netns::Netns`]).
    pub fn from_parts(
        bins: Bins,
        dir: PathBuf,
        coordinator: Coordinator,
        memory: Vec<MemoryNode>,
    ) -> Self {
        Self {
            dir,
            bins,
            coordinator,
            memory,
            runs: 0,
        }
    }

    /// Stops the memory nodes, then the coordinator (SIGTERM, then a wait).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        for m in &mut self.memory {
            m.proc.stop()?;
        }
        self.coordinator.proc.stop()?;
        Ok(())
    }

    /// Starts a compute node (id 0) with `args` added, not waiting for it.
    pub fn spawn_compute(&mut self, args: &[&str]) -> anyhow::Result<(Proc, PathBuf)> {
        self.runs += 1;
        let name = format!("compute-run{}", self.runs);
        let json = self.dir.join(format!("{name}.json"));
        let proc = Proc::spawn(
            &name,
            &self.dir,
            Command::new(&self.bins.node)
                .args([
                    "--role",
                    "compute",
                    "--id",
                    "0",
                    "--listen",
                    "127.0.0.1:0",
                    "--replace",
                ])
                .args(["--coordinator", &self.coordinator.url])
                .arg("--json")
                .arg(&json)
                // Where a Linux guest's boot image goes, for the memory nodes to load.
                .arg("--image-dir")
                .arg(&self.dir)
                .args(args),
        )?;
        Ok((proc, json))
    }

    /// Starts a compute node with `--hold` and `args`, and waits until its guest has finished
    /// (its summary is written; the node stays up). Returns the node, its admin URL and the
    /// summary.
    pub fn run_compute_held(
        &mut self,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<(Proc, String, RunSummary)> {
        let mut a = args.to_vec();
        a.push("--hold");
        let (mut proc, json) = self.spawn_compute(&a)?;
        let admin = proc.admin_url(Duration::from_secs(60))?;
        let deadline = Instant::now() + timeout;
        let summary = loop {
            if let Some(s) = read_summary(&json)? {
                break s;
            }
            if let Some(status) = proc.try_wait()? {
                bail!(
                    "{} exited ({status}) before finishing its guest:\n{}",
                    proc.name,
                    proc.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!("{} did not finish its guest within {timeout:?}", proc.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok((proc, admin, summary))
    }

    /// Runs a compute node to completion and returns its exit status and run summary; an
    /// error, with the node's log, when it wrote none.
    pub fn run_compute(
        &mut self,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<(ExitStatus, RunSummary, Proc)> {
        let (mut proc, json) = self.spawn_compute(args)?;
        let status = proc.wait(timeout)?;
        match read_summary(&json)? {
            Some(summary) => Ok((status, summary, proc)),
            None => bail!(
                "{} exited ({status}) without writing its summary:\n{}",
                proc.name,
                proc.log_tail()
            ),
        }
    }
}

/// The run summary a compute node wrote with `--json path`: `None` while there is none or it
/// is still being written (a partial read); an error when it is whole but not a summary.
pub fn read_summary(path: &Path) -> anyhow::Result<Option<RunSummary>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    match serde_json::from_str(&text) {
        Ok(summary) => Ok(Some(summary)),
        Err(e) if e.is_eof() => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{} is not a run summary", path.display())),
    }
}

/// `GET url` as text; an error for non-2xx answers.
pub fn http_get(url: &str) -> anyhow::Result<String> {
    let mut r = ureq::get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    Ok(r.body_mut().read_to_string()?)
}

/// `GET url` as JSON.
pub fn http_json(url: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&http_get(url)?)?)
}

/// The node ids `GET /nodes` of the coordinator at `url` lists, in its order, with the
/// listing itself (for a failure's message).
pub fn node_ids(url: &str) -> anyhow::Result<(Vec<u64>, serde_json::Value)> {
    let nodes = http_json(&format!("{url}/nodes"))?;
    let ids = nodes
        .as_array()
        .context("GET /nodes is not a list")?
        .iter()
        .filter_map(|n| n["node_id"].as_u64())
        .collect();
    Ok((ids, nodes))
}

/// A loopback address whose port was free a moment ago, for a process that must be told its
/// address before it starts (a memory node behind a [`proxy::CuttingProxy`]). The port is
/// released on return, so another process could take it first; the kernel hands out ephemeral
/// ports at random, which makes that unlikely enough for tests.
pub fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A fresh folder under the system temp dir for one test's processes.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pagemesh-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir is writable");
    dir
}

/// A cluster CA and node certificates for `--tls-cert/--tls-key/--tls-ca`, made with rcgen
/// (ECDSA P-256), as PEM files in a folder.
pub mod pki {
    use std::path::{Path, PathBuf};

    use anyhow::Context;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    /// A CA whose key signs node certificates.
    pub struct Ca {
        issuer: Issuer<'static, KeyPair>,
        /// The CA certificate, PEM (the `--tls-ca` file).
        pub cert: PathBuf,
    }

    /// One node's files.
    pub struct NodeTls {
        /// `--tls-cert`.
        pub cert: PathBuf,
        /// `--tls-key`.
        pub key: PathBuf,
        /// `--tls-ca`.
        pub ca: PathBuf,
    }

    impl NodeTls {
        /// The three flags with their files.
        pub fn args(&self) -> Vec<String> {
            let s = |p: &Path| p.display().to_string();
            vec![
                "--tls-cert".into(),
                s(&self.cert),
                "--tls-key".into(),
                s(&self.key),
                "--tls-ca".into(),
                s(&self.ca),
            ]
        }
    }

    fn write(path: &Path, text: &str) -> anyhow::Result<()> {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        // Keys must not be readable by others; certificates may be.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(())
    }

    impl Ca {
        /// A new CA named `name`, its certificate written to `dir/<name>.pem`.
        pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params.self_signed(&key)?;
            let path = dir.join(format!("{name}.pem"));
            write(&path, &cert.pem())?;
            Ok(Ca {
                issuer: Issuer::new(params, key),
                cert: path,
            })
        }

        /// A certificate for node `name`, valid for `localhost` and 127.0.0.1 as a server and
        /// as a client, signed by this CA, trusting `trust` (this CA unless given).
        pub fn node(
            &self,
            dir: &Path,
            name: &str,
            trust: Option<&Path>,
        ) -> anyhow::Result<NodeTls> {
            let key = KeyPair::generate()?;
            let mut params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &self.issuer)?;
            let files = NodeTls {
                cert: dir.join(format!("{name}.crt")),
                key: dir.join(format!("{name}.key")),
                ca: trust.unwrap_or(&self.cert).to_path_buf(),
            };
            write(&files.cert, &cert.pem())?;
            write(&files.key, &key.serialize_pem())?;
            Ok(files)
        }
    }
}
