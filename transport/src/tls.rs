//! TLS for page traffic (`--tls-cert`, `--tls-key`, `--tls-ca`): rustls, TLS 1.3, mutual.
//!
//! Every node has one certificate, signed by the cluster's CA, that it shows both as a
//! server (its page server) and as a client (dialling its peers); each side accepts only a
//! peer whose certificate chains to the CA. A client checks the server's certificate against
//! the host it dialled (the registered address: an IP or a name, which must be among the
//! certificate's subject alternative names). The page protocol's Hello and Auth then run
//! inside the TLS session as without it: the cluster key says who belongs to the cluster,
//! TLS keeps the pages secret on the wire.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring::default_provider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The three files of a node's TLS identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The node's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates peers must chain to (PEM).
    pub ca: PathBuf,
}

/// Why a TLS identity could not be loaded.
#[derive(thiserror::Error, Debug)]
pub enum TlsError {
    /// A file could not be read or holds no PEM item of the kind wanted.
    #[error("cannot read {what} from {}: {why}", path.display())]
    File {
        /// Which file (`--tls-cert`, ...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The reader's or parser's reason.
        why: String,
    },
    /// rustls refused the certificates or the key (a key that does not match the
    /// certificate, an unsupported algorithm, a CA file without a usable certificate).
    #[error("the TLS identity is not usable: {0}")]
    Config(String),
}

/// A node's TLS configuration, as a client and as a server.
#[derive(Clone, Debug)]
pub struct Tls {
    /// Dialling peers.
    pub client: Arc<ClientConfig>,
    /// The page server.
    pub server: Arc<ServerConfig>,
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let failed = |why: String| TlsError::File {
        what,
        path: path.to_owned(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| failed(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(e.to_string()))?;
    if certs.is_empty() {
        return Err(failed("no PEM certificate in it".into()));
    }
    Ok(certs)
}

impl Tls {
    /// Loads `files` and builds both configurations; every problem names its file.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let chain = certs("--tls-cert", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::File {
            what: "--tls-key",
            path: files.key.clone(),
            why: e.to_string(),
        })?;
        let mut roots = RootCertStore::empty();
        for ca in certs("--tls-ca", &files.ca)? {
            roots
                .add(ca)
                .map_err(|e| TlsError::Config(format!("--tls-ca {}: {e}", files.ca.display())))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(default_provider());
        let config = |e: rustls::Error| TlsError::Config(e.to_string());

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(config)?;
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// The rustls error inside `e`, if a TLS failure (rather than the socket) caused it.
pub fn tls_cause(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A TLS stream over a socket, either side.
pub type TlsStream<C> = rustls::StreamOwned<C, std::net::TcpStream>;

/// [`crate::tcp::spin_read`] for a TLS stream: returns plaintext already decrypted, or
/// decrypts what has arrived of the next record, polling the socket for up to `spin`; 0
/// when nothing came in time (the caller's blocking read then waits, and reports an end or
/// an error). The socket is only read when it has bytes, so this never blocks.
pub fn spin_read_tls<C, S>(
    tls: &mut TlsStream<C>,
    buf: &mut [u8],
    spin: std::time::Duration,
) -> usize
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    use std::io::Read;
    if spin.is_zero() || buf.is_empty() {
        return 0;
    }
    let start = std::time::Instant::now();
    loop {
        match tls.conn.reader().read(buf) {
            // Plaintext, or 0 at a clean close (the blocking read sees it too).
            Ok(n) => return n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return 0,
        }
        if socket_has_bytes(&tls.sock) {
            match tls.conn.read_tls(&mut tls.sock) {
                Ok(n) if n > 0 && tls.conn.process_new_packets().is_ok() => continue,
                // The end, an error or a bad record: the blocking read reports it.
                _ => return 0,
            }
        }
        if start.elapsed() >= spin {
            return 0;
        }
        // SAFETY: sched_yield has no preconditions. (Why yield: see `spin_read`.)
        unsafe { libc::sched_yield() };
    }
}

/// Whether `sock` has bytes to read now (or is at its end), without taking them.
fn socket_has_bytes(sock: &std::net::TcpStream) -> bool {
    let fd = std::os::fd::AsRawFd::as_raw_fd(sock);
    let mut byte = 0u8;
    // SAFETY: a non-blocking peek of at most one byte into `byte`, which lives across the
    // call, from a socket the caller owns.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= 0
}

/// Runs the TLS handshake on `tls` to its end (the socket's timeouts bound it).
pub fn handshake<C, S>(tls: &mut TlsStream<C>) -> std::io::Result<()>
where
    C: std::ops::DerefMut + std::ops::Deref<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    // Our last flight (a client's Finished) may still be queued.
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut tls.sock)?;
    }
    Ok(())
}

/// A client connection: plain TCP, or TLS over it.
#[derive(Debug)]
pub(crate) enum Conn {
    Plain(std::net::TcpStream),
    Tls(Box<TlsStream<rustls::ClientConnection>>),
}

impl Conn {
    /// The socket under it (timeouts, shutdown).
    pub(crate) fn socket(&self) -> &std::net::TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.sock,
        }
    }

    /// See [`crate::tcp::spin_read`].
    pub(crate) fn spin_read(&mut self, buf: &mut [u8], spin: std::time::Duration) -> usize {
        match self {
            Conn::Plain(s) => crate::tcp::spin_read(s, buf, spin),
            Conn::Tls(t) => spin_read_tls(t, buf, spin),
        }
    }
}

impl std::io::Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl std::io::Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write_vectored(bufs),
            Conn::Tls(t) => t.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}
