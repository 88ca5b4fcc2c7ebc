//! `pagemesh-coordinator`: parses the command line, opens the store, and serves
//! [`pagemesh_coordinator::app`] until Ctrl-C or SIGTERM.

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

use pagemesh_auth::Keyring;
use pagemesh_coordinator::otlp::{self, OtlpConfig};
use pagemesh_coordinator::{AppState, EmbeddedStore, EtcdStore, Leases, Store};

/// The pagemesh coordinator: keeps the clusters, the node endpoints and the VMs, decides which
/// memory node holds each page of a VM, and serves all of it as JSON over HTTP.
///
/// Once listening it prints `pagemesh-coordinator listening on http://ADDR` on stdout. Logs go
/// to stderr. Ctrl-C or SIGTERM stops it after the requests in flight.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Address to serve the HTTP API on, as host:port. Port 0 picks a free port; the line
    /// printed at start shows which.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    listen: String,

    /// Keep the state in this JSON file, so that it survives a restart: loaded at start
    /// (created if missing), rewritten atomically after every change. Without it, the state
    /// lives in memory only.
    #[arg(long, value_name = "FILE", conflicts_with = "etcd_endpoints")]
    state: Option<PathBuf>,

    /// Where the state lives: `embedded` (this process, with --state for a file), or `etcd`
    /// (an etcd cluster, --etcd-endpoints, shared by every coordinator given the same one:
    /// several coordinators then serve one cluster, and any of them can fail).
    #[arg(long, value_enum, default_value_t = StoreKind::Embedded)]
    store: StoreKind,

    /// The etcd cluster's client URLs, comma-separated (`http://10.0.0.1:2379,…`); with
    /// --store etcd.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,

    /// The key prefix of this cluster's state in etcd (the registry is `PREFIX/registry`).
    #[arg(long, value_name = "PREFIX", default_value = "/pagemesh")]
    etcd_prefix: String,

    /// What to log on stderr: a level (error, warn, info, debug, trace) or tracing filter
    /// directives such as `info,pagemesh_coordinator=debug`.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log_level: String,

    /// Export metrics over OTLP/HTTP (protobuf) to this collector URL (`/v1/metrics` is
    /// appended), or `off` [default: $OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, used as is, or
    /// $OTEL_EXPORTER_OTLP_ENDPOINT; unset: no export].
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,

    /// Seconds between OTLP exports [default: $OTEL_METRIC_EXPORT_INTERVAL ms, or 10].
    #[arg(long, value_name = "SECS")]
    otlp_interval: Option<f64>,

    /// The cluster's key file, the one its nodes are given (chmod 600). Every route but
    /// `GET /healthz` and `GET /openapi.json` then requires `Authorization: Bearer TOKEN`, where
    /// TOKEN is derived from a key of the file (`--print-token` shows it). Without it the
    /// coordinator warns and answers anyone who reaches it (docs/security.md).
    #[arg(long, value_name = "FILE", env = "PAGEMESH_CLUSTER_KEY_FILE")]
    cluster_key_file: Option<PathBuf>,

    /// Print the bearer token of --cluster-key-file's first key on stdout and exit, for
    /// clients such as curl: `curl -H "Authorization: Bearer $(pagemesh-coordinator
    /// --cluster-key-file FILE --print-token)" ...`.
    #[arg(long, requires = "cluster_key_file")]
    print_token: bool,

    /// Seconds a node's lease lasts. Nodes renew it every third of that; a node that has
    /// not renewed it in time is down: `GET /endpoints` leaves it out, `GET /nodes` shows it
    /// with `"up": false`, and no new VM places pages on it, until it renews or registers
    /// again.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = positive_secs)]
    lease_secs: f64,

    /// Seconds a node stays listed after its lease ran out; then it is forgotten, as if it
    /// had left (a crashed node does not stay listed forever).
    #[arg(long, value_name = "SECS", default_value_t = 600.0, value_parser = positive_secs)]
    forget_after_secs: f64,
}

/// Where the coordinator keeps its state.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum StoreKind {
    /// In this process (and --state's file).
    Embedded,
    /// In an etcd cluster.
    Etcd,
}

/// A positive number of seconds, at most a day.
fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds in (0, 86400]")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pagemesh-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let keyring = cli
        .cluster_key_file
        .as_deref()
        .map(Keyring::load)
        .transpose()?;
    if cli.print_token {
        let keyring = keyring.expect("clap requires --cluster-key-file with --print-token");
        println!("{}", keyring.coordinator_token());
        return Ok(());
    }
    // The parse error's message already ends with its source, so it is not chained.
    let filter = EnvFilter::try_new(&cli.log_level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level {:?}: {e}", cli.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let otlp_config =
        OtlpConfig::resolve(cli.otlp_endpoint.as_deref(), cli.otlp_interval, |key| {
            std::env::var(key).ok()
        })?;
    let leases = Leases {
        ttl: Duration::from_secs_f64(cli.lease_secs),
        forget_after: Duration::from_secs_f64(cli.forget_after_secs),
    };
    if cli.store == StoreKind::Etcd && cli.etcd_endpoints.is_empty() {
        anyhow::bail!("--store etcd needs --etcd-endpoints URLS (the etcd cluster's client URLs)");
    }
    if cli.store == StoreKind::Embedded && !cli.etcd_endpoints.is_empty() {
        anyhow::bail!("--etcd-endpoints is for --store etcd; add it, or drop --etcd-endpoints");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.store {
        StoreKind::Embedded => {
            let store = match &cli.state {
                Some(path) => EmbeddedStore::open(path)?,
                None => EmbeddedStore::in_memory(),
            };
            let where_ = store.path().map_or_else(
                || "in memory (no --state)".to_owned(),
                |p| format!("state file {}", p.display()),
            );
            runtime.block_on(serve(
                &cli.listen,
                store,
                &where_,
                keyring,
                otlp_config,
                leases,
            ))
        }
        StoreKind::Etcd => runtime.block_on(async {
            let store = EtcdStore::connect(&cli.etcd_endpoints, &cli.etcd_prefix).await?;
            let where_ = format!(
                "etcd at {} (key {})",
                cli.etcd_endpoints.join(","),
                store.key()
            );
            serve(&cli.listen, store, &where_, keyring, otlp_config, leases).await
        }),
    }
}

async fn serve(
    listen: &str,
    store: impl Store + 'static,
    where_: &str,
    keyring: Option<Keyring>,
    otlp_config: Option<OtlpConfig>,
    leases: Leases,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    tracing::info!(%addr, state = where_, "serving");
    // Scripts and tests wait for this line, so it must not sit in a buffer.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "pagemesh-coordinator listening on http://{addr}")
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")?;
    drop(stdout);

    let shutdown = shutdown_signal()?;
    let mut state = AppState::new(store).with_leases(leases);
    tracing::info!(
        "node leases last {:?}; nodes down for {:?} are forgotten",
        leases.ttl,
        leases.forget_after
    );
    match keyring {
        Some(keyring) => {
            tracing::info!(
                "the API requires the cluster's bearer token (key {}, {} accepted)",
                keyring.fingerprint(),
                keyring.len()
            );
            state = state.with_keyring(keyring);
        }
        None => tracing::warn!(
            "NO CLUSTER KEY: anyone who can reach {addr} can register nodes, define VMs and read \
             where every page server listens; give the coordinator --cluster-key-file (fine \
             only for a loopback demo; see docs/security.md)"
        ),
    }
    let exporter = match otlp_config {
        Some(c) => Some(otlp::start(c, &state, &addr.to_string())?),
        None => None,
    };
    let served = pagemesh_coordinator::serve(listener, state, shutdown).await;
    // The last export is a blocking POST: off the runtime's workers.
    let _ = tokio::task::spawn_blocking(move || drop(exporter)).await;
    served.context("serving failed")?;
    tracing::info!("shut down");
    Ok(())
}

/// Completes at the first Ctrl-C (SIGINT) or SIGTERM. The handlers are installed before it
/// returns, so a signal that arrives before the server starts is not lost.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "shutting down");
    })
}
