//! `pagemesh-console`: parses the command line and hands over to the library.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pagemesh_console::{Options, once, run_terminal};

const KEYS: &str = "\
Views:
  1 Cluster   every node: role, state (up/down/left), pages held, faults/s, pages served/s,
              remote-miss ratio (share of faults served by another node), fault p50/p99
  2 Heat      the guest's memory as a grid; a glyph per region names the node holding its
              pages (• resident on the compute node, · never written), the colour shows how
              much of it faulted, red where it is faulting now
  3 Latency   fault service time (user space) beside vCPU stall and page install (eBPF, when
              the node runs its probes), transfer time per peer, faults/s over time
  4 Log       nodes joining and leaving, guests starting and finishing, errors

Keys:
  Tab, Shift-Tab, 1-4   switch views
  Up, Down              select a node (Cluster); scroll (Heat, Log); PgUp, PgDn, Home, End
  Left, Right           show another node's guest (Heat, Latency)
  +, -                  zoom the heat map in, out
  ?                     help;  q or Ctrl-C quits and restores the terminal

Nodes are found through the coordinator's GET /nodes (each node's admin address, as given
by its --admin flag) and their GET /stats is polled in background threads. A node that
stops answering is shown as down; one that the coordinator no longer lists (a node
deregisters when its work is done) as left.

Examples:
  pagemesh-console --coordinator http://127.0.0.1:7070
  pagemesh-console --coordinator http://127.0.0.1:7070 --once";

/// pagemesh-console: watch a pagemesh cluster live in the terminal.
///
/// Shows which parts of a guest's memory are hot and which node holds them, how often faults
/// go remote and how long they take, refreshed several times a second.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_long_help = KEYS)]
struct Cli {
    /// Coordinator URL, e.g. http://127.0.0.1:7070, or several comma-separated (coordinators
    /// sharing an etcd store): each request goes to the first that answers.
    #[arg(long, value_name = "URLS", env = "PAGEMESH_COORDINATOR")]
    coordinator: String,

    /// Print one plain-text snapshot of the Cluster view and exit (for scripts; no terminal
    /// needed). Exits 1 when the coordinator cannot be reached.
    #[arg(long)]
    once: bool,

    /// Milliseconds between two polls of a node's /stats (4 a second or more: at most 250).
    #[arg(long, value_name = "MS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(20..=250))]
    interval: u64,

    /// Regions of guest memory to ask each node's heat map for, for a finer map to zoom
    /// into (the node's default is 1024).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    heat_cells: Option<u32>,

    /// Seconds to wait for one HTTP answer before calling a node down.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    timeout: f64,

    /// The cluster's key file (chmod 600), for a coordinator that has one: the console sends
    /// the bearer token derived from its first key.
    #[arg(long, value_name = "FILE", env = "PAGEMESH_CLUSTER_KEY_FILE")]
    cluster_key_file: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(timeout) = Duration::try_from_secs_f64(cli.timeout)
        .ok()
        .filter(|t| !t.is_zero())
    else {
        eprintln!("pagemesh-console: --timeout must be a positive number of seconds");
        return ExitCode::from(2);
    };
    let token = match cli
        .cluster_key_file
        .as_deref()
        .map(pagemesh_auth::Keyring::load)
    {
        None => None,
        Some(Ok(keyring)) => Some(keyring.coordinator_token()),
        Some(Err(err)) => {
            eprintln!("pagemesh-console: {}", pagemesh_api::error_chain(&err));
            return ExitCode::FAILURE;
        }
    };
    let options = Options {
        token,
        interval: Duration::from_millis(cli.interval),
        timeout,
        heat_cells: cli.heat_cells.and_then(|n| usize::try_from(n).ok()),
        ..Options::new(&cli.coordinator)
    };
    let result = if cli.once {
        once(&options).map(|text| print!("{text}"))
    } else {
        run_terminal(&options)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pagemesh-console: {}", pagemesh_api::error_chain(&err));
            ExitCode::FAILURE
        }
    }
}
