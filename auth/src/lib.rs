//! The cluster key: one secret shared by a cluster's nodes, its coordinator and its console.
//!
//! | item | what it is |
//! |---|---|
//! | [`Keyring`] | the key file: the current key and, while a key is being rotated, the others still accepted |
//! | [`Nonce`], [`Transcript`], [`Side`] | the page protocol's handshake: what each side proves it knows the key over |
//! | [`Keyring::coordinator_token`] | the bearer token the coordinator's API takes, derived from the key |
//!
//! # The handshake's proofs
//!
//! Both sides of a page connection pick a fresh random [`Nonce`]; each then sends
//! `HMAC-SHA256(key, label ‖ transcript)`, where the transcript binds both node ids, the
//! client's session, the cluster name and both nonces, and the label differs per side (so a
//! proof cannot be reflected back at its sender). The client proves first; the server
//! answers with its own proof only once the client's was right, with the key that matched.
//! A recorded handshake is useless: the other side's nonce is new on every connection.
//!
//! # The key file
//!
//! One key per line (blank lines and lines starting with `#` are skipped), each at least
//! [`MIN_KEY_LEN`] bytes of text, e.g. `openssl rand -hex 32`. The first is the key this node
//! proves with; every key in the file is accepted from peers. To rotate: add the new key as a
//! second line everywhere, restart, move it first everywhere, restart, drop the old line
//! (docs/security.md). The file must not be readable by group or others.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Fewest bytes a key may have (32: the 256 bits HMAC-SHA256 can use).
pub const MIN_KEY_LEN: usize = 32;
/// Bytes of a [`Nonce`].
pub const NONCE_LEN: usize = 32;
/// Bytes of a handshake proof (an HMAC-SHA256 tag).
pub const PROOF_LEN: usize = 32;

/// Labels of the two sides' proofs and of the coordinator token: distinct, so that no tag
/// computed for one purpose is valid for another.
const CLIENT_LABEL: &[u8] = b"pagemesh page handshake v1: client\0";
const SERVER_LABEL: &[u8] = b"pagemesh page handshake v1: server\0";
const TOKEN_LABEL: &[u8] = b"pagemesh coordinator token v1\0";
const FINGERPRINT_LABEL: &[u8] = b"pagemesh key fingerprint v1\0";

/// Errors loading a key file or making a nonce.
#[derive(thiserror::Error, Debug)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("cannot read the cluster key file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Group or others may read the file.
    #[error(
        "the cluster key file {path} may be read by group or others (mode {mode:03o}); \
         make it private: chmod 600 {path}"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file holds no key.
    #[error(
        "the cluster key file {path} holds no key; write one with e.g. `openssl rand -hex 32 > {path}`"
    )]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A key is too short.
    #[error(
        "key on line {line} of {path} has {len} bytes; a cluster key needs at least 32 \
         (e.g. `openssl rand -hex 32`)"
    )]
    TooShort {
        /// The file.
        path: PathBuf,
        /// The line (from 1).
        line: usize,
        /// The key's length.
        len: usize,
    },
    /// The operating system gave no random bytes.
    #[error("the operating system's random number generator failed")]
    Random,
}

/// One key, ready to sign with.
#[derive(Clone)]
struct Key {
    hmac: hmac::Key,
    fingerprint: Fingerprint,
}

impl Key {
    fn new(secret: &[u8]) -> Self {
        let hmac = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = hmac::sign(&hmac, FINGERPRINT_LABEL);
        let mut fp = [0u8; 4];
        fp.copy_from_slice(&tag.as_ref()[..4]);
        Key {
            hmac,
            fingerprint: Fingerprint(fp),
        }
    }
}

/// A short, public name of a key (the start of an HMAC of a fixed label): logs say which key
/// a node proves with without revealing it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 4]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// The keys of a cluster key file: the first proves, all are accepted.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys themselves.
        f.debug_struct("Keyring")
            .field("current", &self.fingerprint())
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Keyring {
    /// Reads a key file (see the crate docs); refuses one that group or others may read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let read = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let text = fs::read(path).map_err(read)?;
        Self::parse(&text, path)
    }

    /// The keys of a key file's contents (`path` names it in errors).
    pub fn parse(text: &[u8], path: &Path) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            let line = line.trim_ascii();
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            if line.len() < MIN_KEY_LEN {
                return Err(KeyError::TooShort {
                    path: path.to_owned(),
                    line: i + 1,
                    len: line.len(),
                });
            }
            keys.push(Key::new(line));
        }
        if keys.is_empty() {
            return Err(KeyError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Keyring { keys })
    }

    /// A keyring of one key (tests, and what [`Keyring::generate`] wrote).
    ///
    /// # Panics
    /// If `secret` is shorter than [`MIN_KEY_LEN`].
    pub fn from_secret(secret: &[u8]) -> Self {
        assert!(secret.len() >= MIN_KEY_LEN, "a cluster key needs 32 bytes");
        Keyring {
            keys: vec![Key::new(secret)],
        }
    }

    /// A new random key as a key file's text: 64 hex digits and a newline.
    pub fn generate() -> Result<String, KeyError> {
        let mut raw = [0u8; 32];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| KeyError::Random)?;
        let mut out = hex(&raw);
        out.push('\n');
        Ok(out)
    }

    /// The fingerprint of the key this node proves with.
    pub fn fingerprint(&self) -> Fingerprint {
        self.keys[0].fingerprint
    }

    /// How many keys are accepted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a keyring holds at least one key.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The client's proof over `transcript`, with the current key.
    pub fn client_proof(&self, transcript: &Transcript<'_>) -> [u8; PROOF_LEN] {
        transcript.sign(&self.keys[0].hmac, Side::Client)
    }

    /// The server's side: which key, if any, made the client's `proof`. Every key is tried
    /// (constant-time comparisons); the index goes to [`Keyring::server_proof`].
    pub fn check_client(&self, transcript: &Transcript<'_>, proof: &[u8]) -> Option<usize> {
        self.keys
            .iter()
            .position(|k| transcript.verify(&k.hmac, Side::Client, proof))
    }

    /// The server's proof over `transcript` with key `index` (the one
    /// [`Keyring::check_client`] matched).
    pub fn server_proof(&self, index: usize, transcript: &Transcript<'_>) -> [u8; PROOF_LEN] {
        let key = self.keys.get(index).unwrap_or(&self.keys[0]);
        transcript.sign(&key.hmac, Side::Server)
    }

    /// The client's side: whether the server's `proof` was made with the current key (the
    /// one the client proved with).
    pub fn check_server(&self, transcript: &Transcript<'_>, proof: &[u8]) -> bool {
        transcript.verify(&self.keys[0].hmac, Side::Server, proof)
    }

    /// The bearer token for the coordinator's API: 64 hex digits, an HMAC of a fixed label
    /// with the current key. It does not reveal the key; anyone who sees it can call the
    /// coordinator, so send it over TLS or loopback only.
    pub fn coordinator_token(&self) -> String {
        hex(hmac::sign(&self.keys[0].hmac, TOKEN_LABEL).as_ref())
    }

    /// Whether `token` is the coordinator token of any key of this keyring (constant-time).
    pub fn accepts_token(&self, token: &str) -> bool {
        let Some(tag) = unhex(token) else {
            return false;
        };
        self.keys
            .iter()
            .any(|k| hmac::verify(&k.hmac, TOKEN_LABEL, &tag).is_ok())
    }
}

/// Which side of the handshake a proof is from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The node that dialled (a compute node).
    Client,
    /// The page server.
    Server,
}

/// A random value used once, for one handshake.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce(pub [u8; NONCE_LEN]);

impl Nonce {
    /// A fresh nonce from the operating system's random number generator.
    pub fn fresh() -> Result<Self, KeyError> {
        let mut n = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut n)
            .map_err(|_| KeyError::Random)?;
        Ok(Nonce(n))
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce({})", hex(&self.0[..4]))
    }
}

/// Everything a handshake's proofs are bound to.
#[derive(Clone, Copy, Debug)]
pub struct Transcript<'a> {
    /// The client's node id.
    pub client: u64,
    /// The server's node id.
    pub server: u64,
    /// The client's session id.
    pub session: u64,
    /// The cluster name the client gave.
    pub cluster: &'a [u8],
    /// The client's nonce.
    pub client_nonce: &'a Nonce,
    /// The server's nonce.
    pub server_nonce: &'a Nonce,
}

impl Transcript<'_> {
    /// The bytes a proof signs: the side's label, then every field, fixed-width, with the
    /// cluster name's length before it so that no two transcripts run together. One
    /// allocation per handshake, never on the fault path.
    fn message(&self, side: Side) -> Vec<u8> {
        let label = match side {
            Side::Client => CLIENT_LABEL,
            Side::Server => SERVER_LABEL,
        };
        let mut m = Vec::with_capacity(label.len() + 32 + self.cluster.len() + 2 * NONCE_LEN);
        m.extend_from_slice(label);
        m.extend_from_slice(&self.client.to_le_bytes());
        m.extend_from_slice(&self.server.to_le_bytes());
        m.extend_from_slice(&self.session.to_le_bytes());
        m.extend_from_slice(&(self.cluster.len() as u64).to_le_bytes());
        m.extend_from_slice(self.cluster);
        m.extend_from_slice(&self.client_nonce.0);
        m.extend_from_slice(&self.server_nonce.0);
        m
    }

    fn sign(&self, key: &hmac::Key, side: Side) -> [u8; PROOF_LEN] {
        let tag = hmac::sign(key, &self.message(side));
        let mut out = [0u8; PROOF_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `proof` is this side's tag, compared in constant time.
    fn verify(&self, key: &hmac::Key, side: Side, proof: &[u8]) -> bool {
        hmac::verify(key, &self.message(side), proof).is_ok()
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const A: &[u8] = b"0123456789abcdef0123456789abcdef";
    const B: &[u8] = b"fedcba9876543210fedcba9876543210";

    fn transcript<'a>(cn: &'a Nonce, sn: &'a Nonce) -> Transcript<'a> {
        Transcript {
            client: 1,
            server: 2,
            session: 77,
            cluster: b"lab",
            client_nonce: cn,
            server_nonce: sn,
        }
    }

    #[test]
    fn proofs_verify_with_the_same_key_only() {
        let (cn, sn) = (Nonce::fresh().unwrap(), Nonce::fresh().unwrap());
        assert_ne!(cn, sn, "nonces are fresh");
        let t = transcript(&cn, &sn);
        let a = Keyring::from_secret(A);
        let b = Keyring::from_secret(B);
        let proof = a.client_proof(&t);
        assert_eq!(a.check_client(&t, &proof), Some(0));
        assert_eq!(b.check_client(&t, &proof), None);
        // A server proof is not a client proof (no reflection), and binds every field.
        let server = a.server_proof(0, &t);
        assert!(a.check_server(&t, &server));
        assert_eq!(a.check_client(&t, &server), None);
        assert!(!b.check_server(&t, &server));
        let other = Nonce::fresh().unwrap();
        for changed in [
            Transcript { client: 9, ..t },
            Transcript { server: 9, ..t },
            Transcript { session: 9, ..t },
            Transcript {
                cluster: b"la",
                ..t
            },
            Transcript {
                client_nonce: &other,
                ..t
            },
            Transcript {
                server_nonce: &other,
                ..t
            },
        ] {
            assert_eq!(a.check_client(&changed, &proof), None, "{changed:?}");
        }
        assert_eq!(a.check_client(&t, &proof[..31]), None);
    }

    #[test]
    fn a_rotating_keyring_accepts_both_and_proves_with_the_first() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("pagemesh-auth-test-{}", std::process::id()));
        let text = [B, b"\n# the old key, still accepted\n\n", A, b"\n"].concat();
        fs::write(&path, &text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keyring::load(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let ring = Keyring::load(&path).unwrap();
        fs::remove_file(&path).unwrap();
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.fingerprint(), Keyring::from_secret(B).fingerprint());
        let (cn, sn) = (Nonce::fresh().unwrap(), Nonce::fresh().unwrap());
        let t = transcript(&cn, &sn);
        let old = Keyring::from_secret(A);
        let index = ring.check_client(&t, &old.client_proof(&t)).unwrap();
        assert_eq!(index, 1);
        assert!(old.check_server(&t, &ring.server_proof(index, &t)));
        assert!(ring.accepts_token(&old.coordinator_token()));
        assert!(ring.accepts_token(&ring.coordinator_token()));
        assert!(!old.accepts_token(&ring.coordinator_token()));
        assert!(!ring.accepts_token("zz"));
        assert!(!ring.accepts_token(""));
        assert!(
            !format!("{ring:?}").contains("0123"),
            "Debug hides the keys"
        );
    }

    #[test]
    fn bad_key_files_say_what_to_do() {
        let p = Path::new("/k");
        assert!(matches!(
            Keyring::parse(b"\n# none\n", p),
            Err(KeyError::Empty { .. })
        ));
        let e = Keyring::parse(b"short\n", p).unwrap_err();
        assert!(
            matches!(
                e,
                KeyError::TooShort {
                    line: 1,
                    len: 5,
                    ..
                }
            ),
            "{e}"
        );
        let generated = Keyring::generate().unwrap();
        assert_eq!(generated.len(), 65);
        assert_ne!(generated, Keyring::generate().unwrap());
        Keyring::parse(generated.as_bytes(), p).unwrap();
        assert!(matches!(
            Keyring::load(Path::new("/nonexistent/key")),
            Err(KeyError::Read { .. })
        ));
    }
}
