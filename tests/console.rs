//! The live console against a real cluster, driven as a person would: `pagemesh-console`
//! runs inside tmux, keys go in with `send-keys`, the screen comes back with `capture-pane`.
//!
//! A coordinator, memory nodes 1 and 2 and a compute node that holds after its guest
//! finished (so its figures stay readable); the console must show the three nodes up with a
//! non-zero remote-miss ratio, draw the guest's memory in the Heat view, show a killed node
//! as down and the compute node, stopped, as having left the cluster (it deregisters), quit
//! on `q` with status 0 and hand the terminal back as it found it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pagemesh_tests::{Bins, Cluster, test_dir};

const SCREEN: Duration = Duration::from_secs(60);

/// A tmux server of our own (its socket in the test folder), killed when dropped.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// Starts a detached 160×48 session running `sh`.
    fn start(dir: &Path) -> Self {
        let tmux = Self {
            socket: dir.join("tmux.sock"),
        };
        let out = tmux.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            "160",
            "-y",
            "48",
            "-s",
            "console",
            "sh",
        ]);
        assert!(
            out.status.success(),
            "tmux new-session failed (is tmux installed?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            // -u: the panes speak UTF-8 whatever the locale of the test.
            .arg("-u")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .env("TERM", "xterm-256color")
            .env("LANG", "C.UTF-8")
            .output()
            .expect("tmux runs")
    }

    /// Types `text` literally, then Enter if asked.
    fn type_text(&self, text: &str, enter: bool) {
        assert!(
            self.run(&["send-keys", "-t", "console", "-l", text])
                .status
                .success()
        );
        if enter {
            self.key("Enter");
        }
    }

    /// Presses a key by tmux name (`Tab`, `Escape`, `q`).
    fn key(&self, key: &str) {
        assert!(
            self.run(&["send-keys", "-t", "console", key])
                .status
                .success()
        );
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "console"]).stdout)
            .into_owned()
    }

    /// Waits until `check` accepts the screen; returns it, or panics with the last screen.
    fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + SCREEN;
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            if Instant::now() > deadline {
                panic!("the console did not show {what} within {SCREEN:?}; the screen:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn display(&self, format: &str) -> String {
        let out = self.run(&["display-message", "-p", "-t", "console", format]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The Cluster view's row of `node`, split on blanks (border characters removed).
fn row(screen: &str, node: u32) -> Option<Vec<String>> {
    screen.lines().find_map(|line| {
        let cells: Vec<String> = line
            .trim_matches(|c: char| c == '│' || c.is_whitespace())
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let is_row = cells.first().is_some_and(|c| *c == node.to_string())
            && cells
                .get(1)
                .is_some_and(|r| ["compute", "memory", "both"].contains(&r.as_str()));
        is_row.then_some(cells)
    })
}

/// The compute node's remote-miss ratio as shown (the first percentage of its row).
fn remote_miss(screen: &str) -> Option<f64> {
    row(screen, 0)?
        .iter()
        .find_map(|c| c.strip_suffix('%')?.parse().ok())
}

/// Glyphs of the heat grid: rows look like `   16M │••••1111`.
fn heat_glyphs(screen: &str) -> usize {
    screen
        .lines()
        .filter_map(|l| l.split_once(" │"))
        .filter(|(label, _)| {
            let label = label.trim_start_matches('│').trim();
            !label.is_empty()
                && label
                    .trim_end_matches(['K', 'M', 'G', 'T'])
                    .parse::<f64>()
                    .is_ok()
        })
        .map(|(_, grid)| {
            grid.chars()
                .filter(|c| c.is_ascii_alphanumeric() || ['•', '·', '#'].contains(c))
                .count()
        })
        .sum()
}

#[test]
fn console_shows_a_live_cluster_and_restores_the_terminal() {
    let bins = Bins::for_tests().expect("binaries are built");
    let console = bins.node.with_file_name("pagemesh-console");
    assert!(
        console.exists(),
        "{} is not built; run `cargo build --workspace --bins` first",
        console.display()
    );
    let dir = test_dir("console");
    let mut c = Cluster::start(bins, dir.clone(), &[1, 2], "512MiB").expect("cluster starts");
    // A 64 MiB guest on two memory nodes (contiguous halves), touching its first 16 MiB and
    // then holding: the rest stays on the memory nodes, so the heat map shows both owners.
    let (mut compute, _json) = c
        .spawn_compute(&[
            "--mem",
            "64MiB",
            "--placement",
            "ranges",
            "--workload",
            "seq",
            "--range",
            "0:16MiB",
            "--hold",
        ])
        .expect("compute node starts");
    compute
        .wait_for_line(" admin on ", Duration::from_secs(60))
        .expect("the compute node serves its admin endpoint");

    let tmux = Tmux::start(&dir);
    let quoted = |p: &Path| format!("'{}'", p.display());
    tmux.type_text(
        &format!(
            "stty -g > {before}; {console} --coordinator {url}; echo $? > {status}; \
             stty -g > {after}",
            before = quoted(&dir.join("stty.before")),
            console = quoted(&console),
            url = c.coordinator.url,
            status = quoted(&dir.join("status")),
            after = quoted(&dir.join("stty.after")),
        ),
        true,
    );

    // Cluster view: three nodes up, faults going remote.
    let screen = tmux.wait_for("three nodes up and a remote-miss ratio", |s| {
        let up = |id| row(s, id).is_some_and(|r| r.get(2).is_some_and(|st| st == "up"));
        up(0) && up(1) && up(2) && remote_miss(s).is_some_and(|r| r > 0.0)
    });
    assert_eq!(row(&screen, 0).expect("row")[1], "compute", "{screen}");
    assert_eq!(row(&screen, 1).expect("row")[1], "memory", "{screen}");
    assert!(screen.contains("1 Cluster"), "{screen}");

    // Heat view: the guest's memory as cells, both memory nodes among the owners.
    tmux.key("2");
    let screen = tmux.wait_for("the heat map", |s| {
        s.contains("Heat · node 0") && heat_glyphs(s) >= 64
    });
    assert!(screen.contains('1') && screen.contains('2'), "{screen}");
    tmux.key("-");
    tmux.wait_for("the heat map zoomed out", |s| heat_glyphs(s) > 0);
    tmux.key("+");

    // Latency, help, log.
    tmux.key("3");
    tmux.wait_for("the latency view", |s| s.contains("Fault service time"));
    tmux.key("?");
    tmux.wait_for("the help", |s| s.contains("Help"));
    // Wait for Escape to take effect before the next key: an Escape byte followed at once
    // by "4" reads as Alt-4, which is neither (this flaked in CI).
    tmux.key("Escape");
    tmux.wait_for("the help closed", |s| !s.contains("Help ·"));
    tmux.key("4");
    tmux.wait_for("the log", |s| s.contains("node 0 joined"));

    // A node that goes away is shown as down, and the console goes on. The compute node's
    // run must be over first: it asks every memory node of its VM what it holds afterwards.
    compute
        .wait_for_line("  result: ", Duration::from_secs(120))
        .expect("the guest's run finishes");
    c.memory[1].proc.kill();
    tmux.key("1");
    tmux.wait_for("node 2 down", |s| {
        row(s, 2).is_some_and(|r| r.get(2).is_some_and(|st| st == "down"))
    });

    // A node whose work is over leaves the cluster: it is logged as such, not as down, and
    // the coordinator no longer lists it (the killed node 2 it still does).
    let status = compute.stop().expect("compute node stops");
    assert!(status.success(), "{status}: {}", compute.log_tail());
    let screen = tmux.wait_for("node 0 left", |s| {
        row(s, 0).is_some_and(|r| r.get(2).is_some_and(|st| st == "left"))
            && s.contains("node 0 left the cluster")
    });
    assert!(!screen.contains("node 0 is down"), "{screen}");
    let (ids, nodes) =
        pagemesh_tests::node_ids(&c.coordinator.url).expect("the coordinator lists its nodes");
    assert_eq!(ids, [1, 2], "{nodes:#}");

    // A resize is followed.
    assert!(
        tmux.run(&["resize-window", "-t", "console", "-x", "100", "-y", "30"])
            .status
            .success()
    );
    tmux.wait_for("the cluster view at 100 columns", |s| {
        s.lines()
            .any(|l| l.starts_with("┌ Nodes") && l.chars().count() == 100)
    });

    // q quits with status 0 and the terminal is as before: cooked mode, main screen.
    tmux.key("q");
    let status_file = dir.join("status");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join("stty.after").exists() {
        assert!(
            Instant::now() < deadline,
            "the console did not exit on q; the screen:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    let status = std::fs::read_to_string(&status_file).expect("exit status written");
    assert_eq!(
        status.trim(),
        "0",
        "exit status; screen:\n{}",
        tmux.screen()
    );
    let before = std::fs::read_to_string(dir.join("stty.before")).expect("stty before");
    let after = std::fs::read_to_string(dir.join("stty.after")).expect("stty after");
    assert_eq!(before, after, "terminal modes restored");
    assert_eq!(
        tmux.display("#{alternate_on}"),
        "0",
        "left the alternate screen"
    );
    let screen = tmux.screen();
    assert!(
        !screen.contains("1 Cluster"),
        "the console's screen is gone:\n{screen}"
    );
    let last = screen.lines().rev().find(|l| !l.trim().is_empty());
    assert!(
        last.is_some_and(|l| l.trim_end().ends_with(['#', '$'])),
        "the shell's prompt is back:\n{screen}"
    );
}
