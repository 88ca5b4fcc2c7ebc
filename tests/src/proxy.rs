//! A TCP proxy that cuts its connections in the middle of a reply, to test how a compute node
//! recovers when a page connection dies while a page is on the wire.
//!
//! A memory node started with `--advertise <proxy address>` is reached only through the
//! proxy. For every connection it accepts, the proxy opens a fresh one to the upstream
//! address and copies bytes both ways. A [`CutPlan`] arms each new connection with a byte
//! offset in the server→client direction: once that stream has carried that many bytes and
//! more are coming, the proxy forwards only the bytes up to the offset and shuts both sockets
//! down (`shutdown(Both)`). The client sees a reply that stops short, then end of stream; the
//! server sees its connection go away. After `max_cuts` cuts, connections pass through.
//!
//! The proxy knows nothing of the page protocol: the caller picks offsets that fall inside a
//! page payload. Threads, std only: one accepts, each connection has one per direction.
//! Errors in those threads are logged to stderr and close the connection.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

/// Where a [`CuttingProxy`] cuts its connections.
#[derive(Clone, Debug, Default)]
pub struct CutPlan {
    /// Server→client bytes a connection forwards before it is cut: a connection opened after
    /// `n` cuts is armed with `reply_bytes[n % reply_bytes.len()]`. Empty: never cut.
    pub reply_bytes: Vec<u64>,
    /// Cuts to make in all; connections opened after that pass through, and an armed
    /// connection that reaches its offset after that is not cut.
    pub max_cuts: u32,
}

impl CutPlan {
    /// The offset a connection opened after `cuts` cuts is armed with, if any.
    fn offset(&self, cuts: u32) -> Option<u64> {
        if cuts >= self.max_cuts || self.reply_bytes.is_empty() {
            return None;
        }
        let i = usize::try_from(cuts).ok()? % self.reply_bytes.len();
        Some(self.reply_bytes[i])
    }
}

/// A running proxy on `127.0.0.1`; dropping it closes its listener and every connection.
pub struct CuttingProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// What the proxy's threads share.
struct Shared {
    plan: CutPlan,
    cuts: AtomicU32,
    stop: AtomicBool,
    /// Both sockets of every open connection, so that `Drop` can shut them down.
    live: Mutex<HashMap<u64, [TcpStream; 2]>>,
    /// `proxy 127.0.0.1:PORT`, to prefix log lines.
    name: String,
}

impl Shared {
    fn live(&self) -> MutexGuard<'_, HashMap<u64, [TcpStream; 2]>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one cut from the budget; false when it is spent.
    fn take_cut(&self) -> bool {
        self.cuts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                (c < self.plan.max_cuts).then_some(c + 1)
            })
            .is_ok()
    }
}

impl CuttingProxy {
    /// Starts a proxy on an ephemeral loopback port that forwards to `upstream` and cuts
    /// connections as `plan` says.
    pub fn start(upstream: SocketAddr, plan: CutPlan) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            plan,
            cuts: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
            name: format!("proxy {addr}"),
        });
        let s = shared.clone();
        let acceptor = thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn(move || accept(&listener, upstream, &s))?;
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u32 {
        self.shared.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor from `accept`; it sees `stop` and returns, closing the listener.
        // Should the connection fail, it is left to end with the process rather than hang here.
        if TcpStream::connect(self.addr).is_ok()
            && let Some(t) = self.acceptor.take()
        {
            let _ = t.join();
        }
        for [client, server] in self.shared.live().drain().map(|(_, s)| s) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}

fn accept(listener: &TcpListener, upstream: SocketAddr, shared: &Arc<Shared>) {
    for (id, client) in (0u64..).zip(listener.incoming()) {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: accept failed: {e}", shared.name);
                // Out of descriptors, say: do not spin on it.
                thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let s = shared.clone();
        if let Err(e) = thread::Builder::new()
            .name(format!("proxy-conn{id}"))
            .spawn(move || relay(id, client, upstream, &s))
        {
            eprintln!(
                "{}: cannot start a thread for connection {id}: {e}",
                shared.name
            );
        }
    }
}

/// Serves one client connection until either side closes or the plan cuts it.
fn relay(id: u64, client: TcpStream, upstream: SocketAddr, shared: &Shared) {
    let server = match TcpStream::connect(upstream) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: cannot reach {upstream}: {e}", shared.name);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    };
    // The page protocol is one small request, one reply: do not let Nagle hold bytes back.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let clones = || -> io::Result<_> {
        Ok((
            client.try_clone()?,
            server.try_clone()?,
            [client.try_clone()?, server.try_clone()?],
        ))
    };
    let (client_rx, server_tx, for_drop) = match clones() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: connection {id}: {e}", shared.name);
            close(&client, &server);
            return;
        }
    };
    shared.live().insert(id, for_drop);
    if shared.stop.load(Ordering::SeqCst) {
        // Accepted just before the proxy was dropped, which may have missed it.
        close(&client, &server);
    }
    // Armed once, when the connection opens, with the offset of the next cut.
    let cut_at = shared.plan.offset(shared.cuts.load(Ordering::SeqCst));
    let name = shared.name.clone();
    let up = thread::Builder::new()
        .name(format!("proxy-up{id}"))
        .spawn(move || pump_up(id, &name, client_rx, server_tx));
    match up {
        Ok(up) => {
            pump_down(id, shared, server, client, cut_at);
            let _ = up.join();
        }
        Err(e) => {
            eprintln!(
                "{}: cannot start a thread for connection {id}: {e}",
                shared.name
            );
            close(&client, &server);
        }
    }
    shared.live().remove(&id);
}

/// Client→server: copies until the client closes (then half-closes the server side) or an
/// error (then closes both).
fn pump_up(id: u64, name: &str, mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if let Err(e) = to.write_all(&buf[..n]) {
                    eprintln!("{name}: connection {id}: writing to the server: {e}");
                    close(&from, &to);
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("{name}: connection {id}: reading from the client: {e}");
                close(&from, &to);
                return;
            }
        }
    }
}

/// Server→client: copies until the server closes (then half-closes the client side) or an
/// error, or until the stream would go past `cut_at` bytes: then forwards exactly `cut_at`
/// bytes in all and closes both sockets, if the plan still has a cut to make.
fn pump_down(
    id: u64,
    shared: &Shared,
    mut from: TcpStream,
    mut to: TcpStream,
    mut cut_at: Option<u64>,
) {
    let name = &shared.name;
    let mut buf = vec![0u8; 64 << 10];
    let mut carried = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("{name}: connection {id}: reading from the server: {e}");
                close(&from, &to);
                return;
            }
        };
        let chunk = &buf[..n];
        if let Some(at) = cut_at
            && carried + chunk.len() as u64 > at
        {
            if shared.take_cut() {
                // Less than `n`: the test above says the chunk reaches past `at`.
                let keep = (at - carried) as usize;
                // An error here is a cut all the same.
                let _ = to.write_all(&chunk[..keep]);
                let _ = to.flush();
                close(&from, &to);
                eprintln!("{name}: connection {id}: cut after {at} reply bytes");
                return;
            }
            // The budget went to other connections meanwhile.
            cut_at = None;
        }
        if let Err(e) = to.write_all(chunk) {
            eprintln!("{name}: connection {id}: writing to the client: {e}");
            close(&from, &to);
            return;
        }
        carried += chunk.len() as u64;
    }
}

/// Shuts both sockets down both ways; the other direction's thread then sees end of stream.
fn close(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const REPLY: usize = 10_000;

    fn reply() -> Vec<u8> {
        (0..REPLY).map(|i| (i % 251) as u8).collect()
    }

    /// An upstream that answers each connection's 4-byte request with [`reply`], like a page
    /// server (a request first, so that the client has sent everything before the cut, and
    /// the cut shows as a clean end of stream rather than a reset).
    fn replier() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut request = [0u8; 4];
                    if s.read_exact(&mut request).is_ok() {
                        // Fails once the proxy has cut the connection.
                        let _ = s.write_all(&reply());
                    }
                });
            }
        });
        addr
    }

    /// One request through the proxy; returns the bytes received before end of stream.
    fn exchange(proxy: &CuttingProxy) -> Vec<u8> {
        let mut s = TcpStream::connect(proxy.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"page").unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    }

    #[test]
    fn cuts_at_the_planned_byte_then_passes_through() {
        let plan = CutPlan {
            reply_bytes: vec![3000, 5000],
            max_cuts: 2,
        };
        let proxy = CuttingProxy::start(replier(), plan).unwrap();
        let full = reply();
        assert_eq!(proxy.cuts(), 0);
        assert_eq!(exchange(&proxy), full[..3000], "first cut at byte 3000");
        assert_eq!(proxy.cuts(), 1);
        assert_eq!(exchange(&proxy), full[..5000], "second cut at byte 5000");
        assert_eq!(proxy.cuts(), 2);
        assert_eq!(exchange(&proxy), full, "past max_cuts: passes through");
        assert_eq!(exchange(&proxy), full);
        assert_eq!(proxy.cuts(), 2);
        let addr = proxy.addr();
        drop(proxy);
        assert!(TcpStream::connect(addr).is_err(), "stopped when dropped");
    }

    #[test]
    fn an_empty_plan_never_cuts() {
        let proxy = CuttingProxy::start(replier(), CutPlan::default()).unwrap();
        assert_eq!(exchange(&proxy), reply());
        assert_eq!(proxy.cuts(), 0);
    }
}
