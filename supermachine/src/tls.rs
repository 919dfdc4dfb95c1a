//! TLS termination on published ports: the host accepts TLS with `rustls` and forwards the
//! plaintext to the guest port, so certificates and keys never enter the guest.
//!
//! [`TlsTermination`] is loaded and checked up front (the key matches the certificate, neither
//! is encrypted or unreadable, the certificate is valid now), so a bad file fails the start,
//! never the first connection. [`terminate`] serves one accepted connection.
//!
//! ALPN: the host offers the protocols it was given (default `http/1.1`) and the guest port then
//! speaks that protocol in plaintext; offer `h2` only for a guest that serves HTTP/2 without TLS
//! (h2c with prior knowledge).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};
use sha2::{Digest, Sha256};

/// The protocols offered with ALPN when none are given.
pub const DEFAULT_ALPN: &[&str] = &["http/1.1"];

/// How long a client has to finish its handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Why a certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// No `CERTIFICATE` block in the certificate file.
    #[error("{}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)", .0.display())]
    NoCertificate(PathBuf),
    /// A PEM file that does not parse.
    #[error("{}: not valid PEM: {why}", path.display())]
    NotPem {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A certificate that is not valid X.509.
    #[error("{}: not a valid X.509 certificate: {why}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A key protected by a passphrase.
    #[error("{}: the private key is encrypted; give it unencrypted (openssl pkey -in KEY -out PLAIN.pem)", .0.display())]
    EncryptedKey(PathBuf),
    /// No private key block.
    #[error("{}: no PEM private key in it (expected -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)", .0.display())]
    NoKey(PathBuf),
    /// A key `rustls` cannot sign with.
    #[error("{}: unusable private key: {why}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The key is not the certificate's.
    #[error("the private key {} does not match the certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The certificate's validity ended.
    #[error("{}: the certificate expired on {not_after}", path.display())]
    Expired {
        /// The file.
        path: PathBuf,
        /// Its notAfter.
        not_after: String,
    },
    /// The certificate's validity has not begun.
    #[error("{}: the certificate is not valid before {not_before}", path.display())]
    NotYetValid {
        /// The file.
        path: PathBuf,
        /// Its notBefore.
        not_before: String,
    },
    /// An ALPN protocol name that is empty or longer than 255 bytes.
    #[error("invalid ALPN protocol {0:?} (1 to 255 bytes, e.g. http/1.1 or h2)")]
    Alpn(String),
    /// Making a self-signed certificate failed.
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(String),
    /// `rustls` refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A checked certificate and key, ready to terminate TLS on any number of ports.
#[derive(Clone)]
pub struct TlsTermination {
    config: Arc<ServerConfig>,
    fingerprint: String,
    generated_pem: Option<String>,
}

impl std::fmt::Debug for TlsTermination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTermination")
            .field("fingerprint", &self.fingerprint)
            .field("self_signed", &self.generated_pem.is_some())
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

/// SHA-256 of a DER certificate as colon-separated upper-case hex (as `openssl x509
/// -fingerprint -sha256` prints it).
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Refuses a certificate outside its validity period at `now`.
fn check_validity(path: &Path, der: &[u8], now: SystemTime) -> Result<(), TlsError> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| TlsError::BadCertificate {
        path: path.into(),
        why: e.to_string(),
    })?;
    let validity = &cert.tbs_certificate.validity;
    if now > validity.not_after.to_system_time() {
        return Err(TlsError::Expired {
            path: path.into(),
            not_after: validity.not_after.to_string(),
        });
    }
    if now < validity.not_before.to_system_time() {
        return Err(TlsError::NotYetValid {
            path: path.into(),
            not_before: validity.not_before.to_string(),
        });
    }
    Ok(())
}

impl TlsTermination {
    /// Loads a PEM certificate chain (end-entity first) and its PEM private key (PKCS#8, PKCS#1
    /// or SEC1), and checks them as [`TlsTermination::from_pem`] does.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Self::from_pem(&read(cert)?, cert, &read(key)?, key)
    }

    /// Checks a PEM certificate chain and key (the paths only name them in errors): both parse,
    /// the key is not encrypted and is the certificate's, and every certificate in the chain is
    /// valid now. Offers [`DEFAULT_ALPN`].
    pub fn from_pem(
        cert_pem: &[u8],
        cert_path: &Path,
        key_pem: &[u8],
        key_path: &Path,
    ) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::NotPem {
                path: cert_path.into(),
                why: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate(cert_path.into()));
        }
        let now = SystemTime::now();
        for der in &chain {
            check_validity(cert_path, der, now)?;
        }
        let key_text = String::from_utf8_lossy(key_pem);
        if key_text.contains("ENCRYPTED PRIVATE KEY") || key_text.contains("Proc-Type: 4,ENCRYPTED")
        {
            return Err(TlsError::EncryptedKey(key_path.into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey(key_path.into()),
            e => TlsError::NotPem {
                path: key_path.into(),
                why: e.to_string(),
            },
        })?;
        let fingerprint = fingerprint(&chain[0]);
        let config = server_config(chain, key, cert_path, key_path)?;
        Ok(TlsTermination {
            config: Arc::new(config),
            fingerprint,
            generated_pem: None,
        })
    }

    /// A fresh self-signed certificate for `localhost`, `127.0.0.1` and `::1` (ECDSA P-256),
    /// valid from now for 30 days.
    pub fn self_signed_localhost() -> Result<Self, TlsError> {
        let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(generate)?;
        let mut params = rcgen::CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .map_err(generate)?;
        let now = time_now();
        // A minute back: clocks of clients on this host may lag a little.
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(30);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost (supermachine)");
        let cert = params.self_signed(&key).map_err(generate)?;
        let der = cert.der().clone();
        let fingerprint = fingerprint(&der);
        let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let name = Path::new("(generated)");
        let config = server_config(vec![der], key_der, name, name)?;
        Ok(TlsTermination {
            config: Arc::new(config),
            fingerprint,
            generated_pem: Some(cert.pem()),
        })
    }

    /// Offers these protocols with ALPN instead of [`DEFAULT_ALPN`], most preferred first (an
    /// empty list offers none).
    pub fn with_alpn<S: AsRef<str>>(mut self, protocols: &[S]) -> Result<Self, TlsError> {
        let mut alpn = Vec::new();
        for p in protocols {
            let p = p.as_ref();
            if p.is_empty() || p.len() > 255 {
                return Err(TlsError::Alpn(p.into()));
            }
            alpn.push(p.as_bytes().to_vec());
        }
        Arc::make_mut(&mut self.config).alpn_protocols = alpn;
        Ok(self)
    }

    /// SHA-256 fingerprint of the end-entity certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The certificate in PEM when it was generated here ([`Self::self_signed_localhost`]), for
    /// clients to trust.
    pub fn generated_certificate_pem(&self) -> Option<&str> {
        self.generated_pem.as_deref()
    }

    /// The `rustls` configuration connections are served with.
    pub fn server_config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// Serves one accepted client with this certificate ([`terminate`]).
    pub fn serve(
        &self,
        tcp: TcpStream,
        guest: impl FnOnce() -> Result<UnixStream, String>,
    ) -> Result<(), TlsSessionError> {
        terminate(tcp, &self.config, guest)
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: cert_path.into(),
                    key: key_path.into(),
                }
            }
            e => TlsError::BadKey {
                path: key_path.into(),
                why: e.to_string(),
            },
        })?;
    config.alpn_protocols = DEFAULT_ALPN.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

/// Why a terminated connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum TlsSessionError {
    /// The client's TLS was bad (sent an alert back) or it went away mid-handshake.
    #[error("TLS handshake: {0}")]
    Handshake(io::Error),
    /// Connecting to the guest port failed.
    #[error("{0}")]
    Guest(String),
}

/// The connection state both directions share. Lock order: `conn`, then `to_client`; whoever
/// holds `to_client` never waits for `conn`, and records reach the client in the order they
/// were made.
struct Shared {
    conn: Mutex<ServerConnection>,
    to_client: Mutex<TcpStream>,
}

impl Shared {
    fn conn(&self) -> std::sync::MutexGuard<'_, ServerConnection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends what `conn` has queued (records, alerts), releasing `conn` before the socket write
    /// so the other direction is not held up by a slow client.
    fn flush(&self, mut conn: std::sync::MutexGuard<'_, ServerConnection>) -> io::Result<()> {
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        if out.is_empty() {
            return Ok(());
        }
        let mut tcp = self.to_client.lock().unwrap_or_else(|e| e.into_inner());
        drop(conn);
        tcp.write_all(&out)
    }
}

/// Moves the plaintext `conn` has decrypted into `into`; true once the client sent
/// `close_notify`.
fn drain_plaintext(conn: &mut ServerConnection, into: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match conn.reader().read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(n) => into.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Serves one accepted client: the TLS handshake (a client that is not speaking TLS gets an
/// alert), then `guest()` for the plaintext stream to the guest port, then both directions
/// until each side has closed (half-closes are passed on; the client's `close_notify` ends its
/// direction, the guest's end of stream sends `close_notify`).
pub fn terminate(
    mut tcp: TcpStream,
    config: &Arc<ServerConfig>,
    guest: impl FnOnce() -> Result<UnixStream, String>,
) -> Result<(), TlsSessionError> {
    let mut conn = ServerConnection::new(config.clone())
        .map_err(|e| TlsSessionError::Handshake(io::Error::other(e)))?;
    let handshake = (|| {
        tcp.set_read_timeout(Some(HANDSHAKE_LIMIT))?;
        tcp.set_write_timeout(Some(HANDSHAKE_LIMIT))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        tcp.set_read_timeout(None)?;
        tcp.set_write_timeout(None)
    })();
    if let Err(e) = handshake {
        let _ = tcp.shutdown(Shutdown::Both);
        return Err(TlsSessionError::Handshake(e));
    }
    let guest = match guest() {
        Ok(g) => g,
        Err(e) => {
            // Tell the client this is the end rather than leaving it to time out.
            conn.send_close_notify();
            let _ = conn.write_tls(&mut tcp);
            let _ = tcp.shutdown(Shutdown::Both);
            return Err(TlsSessionError::Guest(e));
        }
    };
    // After the handshake every guest read is encrypted and sent at once: nothing piles up.
    conn.set_buffer_limit(None);
    let (Ok(tcp_write), Ok(guest_read)) = (tcp.try_clone(), guest.try_clone()) else {
        return Ok(());
    };
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        to_client: Mutex::new(tcp_write),
    });
    let down = {
        let shared = shared.clone();
        let tcp = tcp.try_clone();
        // Out of threads: this connection is dropped, nothing panics.
        match std::thread::Builder::new()
            .spawn(move || guest_to_client(&shared, guest_read, tcp.ok()))
        {
            Ok(down) => down,
            Err(_) => return Ok(()),
        }
    };
    client_to_guest(&shared, &mut tcp, &guest);
    let _ = down.join();
    Ok(())
}

fn client_to_guest(shared: &Shared, tcp: &mut TcpStream, mut guest: &UnixStream) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut plain = Vec::new();
    // Application data can arrive with the client's last handshake message.
    let mut pending = 0;
    let ok = loop {
        let mut conn = shared.conn();
        let mut closed = false;
        let mut failed = false;
        let mut records = &buf[..pending];
        while !records.is_empty() {
            if conn.read_tls(&mut records).is_err() {
                failed = true;
                break;
            }
            if conn.process_new_packets().is_err() {
                // The alert goes out with the flush below.
                failed = true;
                break;
            }
            match drain_plaintext(&mut conn, &mut plain) {
                Ok(c) => closed |= c,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        pending = 0;
        if let Ok(c) = drain_plaintext(&mut conn, &mut plain) {
            closed |= c;
        }
        let flushed = shared.flush(conn);
        if failed || flushed.is_err() {
            break false;
        }
        if !plain.is_empty() {
            if guest.write_all(&plain).is_err() {
                break false;
            }
            plain.clear();
        }
        if closed {
            break true;
        }
        match tcp.read(&mut buf) {
            // End of stream without close_notify: passed on as the end all the same (HTTP
            // clients often do this; truncation matters to the client, not to us).
            Ok(0) => break true,
            Ok(n) => pending = n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break false,
        }
    };
    if ok {
        let _ = guest.shutdown(Shutdown::Write);
    } else {
        // A broken session: end both sides so the other direction stops too.
        let _ = guest.shutdown(Shutdown::Both);
        let _ = tcp.shutdown(Shutdown::Both);
    }
}

fn guest_to_client(shared: &Shared, mut guest: UnixStream, tcp: Option<TcpStream>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match guest.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let mut conn = shared.conn();
        if n == 0 {
            conn.send_close_notify();
            let _ = shared.flush(conn);
            if let Some(tcp) = &tcp {
                let _ = tcp.shutdown(Shutdown::Write);
            }
            return;
        }
        let written = conn.writer().write_all(&buf[..n]);
        if written.is_err() || shared.flush(conn).is_err() {
            let _ = guest.shutdown(Shutdown::Both);
            if let Some(tcp) = &tcp {
                let _ = tcp.shutdown(Shutdown::Both);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn good() -> (String, String) {
        let now = time_now();
        cert_with(now - time::Duration::days(1), now + time::Duration::days(1))
    }

    fn load(cert: &str, key: &str) -> Result<TlsTermination, TlsError> {
        TlsTermination::from_pem(
            cert.as_bytes(),
            Path::new("c.pem"),
            key.as_bytes(),
            Path::new("k.pem"),
        )
    }

    #[test]
    fn a_matching_valid_pair_loads_and_names_its_fingerprint() {
        let (cert, key) = good();
        let t = load(&cert, &key).unwrap();
        assert_eq!(t.fingerprint().len(), 32 * 3 - 1);
        assert_eq!(t.server_config().alpn_protocols, vec![b"http/1.1".to_vec()]);
        let t = t.with_alpn(&["h2", "http/1.1"]).unwrap();
        assert_eq!(t.server_config().alpn_protocols.len(), 2);
        assert!(matches!(t.with_alpn(&[""]).unwrap_err(), TlsError::Alpn(_)));
    }

    #[test]
    fn another_certificates_key_is_refused_as_a_mismatch() {
        let (cert, _) = good();
        let (_, other_key) = good();
        let e = load(&cert, &other_key).unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        assert!(e.to_string().contains("does not match"), "{e}");
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_are_refused() {
        let now = time_now();
        let day = time::Duration::days(1);
        let (cert, key) = cert_with(now - day * 10, now - day);
        let e = load(&cert, &key).unwrap_err();
        assert!(matches!(e, TlsError::Expired { .. }), "{e}");
        assert!(e.to_string().contains("expired on"), "{e}");
        let (cert, key) = cert_with(now + day, now + day * 10);
        let e = load(&cert, &key).unwrap_err();
        assert!(matches!(e, TlsError::NotYetValid { .. }), "{e}");
    }

    #[test]
    fn encrypted_missing_and_garbage_keys_and_certificates_are_clear_errors() {
        let (cert, key) = good();
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(matches!(
            load(&cert, encrypted).unwrap_err(),
            TlsError::EncryptedKey(_)
        ));
        assert!(matches!(load(&cert, "").unwrap_err(), TlsError::NoKey(_)));
        assert!(matches!(
            load(&cert, &cert).unwrap_err(),
            TlsError::NoKey(_)
        ));
        assert!(matches!(
            load("", &key).unwrap_err(),
            TlsError::NoCertificate(_)
        ));
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            load(garbage, &key).unwrap_err(),
            TlsError::BadCertificate { .. }
        ));
        let e = TlsTermination::from_pem_files(Path::new("/nonexistent/c.pem"), Path::new("k"))
            .unwrap_err();
        assert!(
            e.to_string().contains("cannot read /nonexistent/c.pem"),
            "{e}"
        );
    }

    #[test]
    fn a_generated_certificate_is_for_localhost_and_loads_back() {
        let t = TlsTermination::self_signed_localhost().unwrap();
        let pem = t.generated_certificate_pem().unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(fingerprint(&der), t.fingerprint());
        check_validity(Path::new("g"), &der, SystemTime::now()).unwrap();
    }

    /// A plaintext HTTP client on the TLS port gets an alert and the end of the stream, and the
    /// guest is never dialled.
    #[test]
    fn a_plain_http_client_gets_an_alert_not_a_hang() {
        let t = TlsTermination::self_signed_localhost().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            terminate(tcp, t.server_config(), || Err("must not dial".into()))
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        assert_eq!(got.first(), Some(&0x15), "an alert record: {got:?}");
        let r = server.join().unwrap();
        assert!(matches!(r, Err(TlsSessionError::Handshake(_))), "{r:?}");
    }

    fn client_for(pem: &str, alpn: &[&str]) -> rustls::ClientConnection {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap()
    }

    /// The protocol a client offering h2 and http/1.1 ends up with.
    fn negotiated(t: TlsTermination) -> Option<Vec<u8>> {
        let pem = t.generated_certificate_pem().unwrap().to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            // The "guest" closes once the client's side has ended, as a server does.
            let (guest_side, mut guest) = UnixStream::pair().unwrap();
            std::thread::spawn(move || io::copy(&mut guest, &mut io::sink()));
            let _ = terminate(tcp, t.server_config(), || Ok(guest_side));
        });
        let mut conn = client_for(&pem, &["h2", "http/1.1"]);
        let mut tcp = TcpStream::connect(addr).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).unwrap();
        }
        let got = conn.alpn_protocol().map(<[u8]>::to_vec);
        drop(tcp);
        server.join().unwrap();
        got
    }

    #[test]
    fn alpn_offers_http1_by_default_and_h2_when_asked() {
        let t = TlsTermination::self_signed_localhost().unwrap();
        assert_eq!(negotiated(t.clone()), Some(b"http/1.1".to_vec()));
        let t = t.with_alpn(&["h2", "http/1.1"]).unwrap();
        assert_eq!(negotiated(t), Some(b"h2".to_vec()));
    }

    /// Over a real handshake: bytes both ways byte-exact, half-close passed on each way.
    #[test]
    fn plaintext_reaches_the_guest_side_and_back_byte_exact() {
        let t = TlsTermination::self_signed_localhost().unwrap();
        let pem = t.generated_certificate_pem().unwrap().to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (guest_side, mut echo) = UnixStream::pair().unwrap();
        // The "guest": reads everything, then answers with it reversed, then closes.
        let guest = std::thread::spawn(move || {
            let mut all = Vec::new();
            echo.read_to_end(&mut all).unwrap();
            all.reverse();
            echo.write_all(&all).unwrap();
        });
        let config = t.server_config().clone();
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            terminate(tcp, &config, || Ok(guest_side))
        });

        let mut conn = client_for(&pem, &[]);
        let mut tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let sent: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
        {
            let mut s = rustls::Stream::new(&mut conn, &mut tcp);
            s.write_all(&sent).unwrap();
        }
        conn.send_close_notify();
        while conn.wants_write() {
            conn.write_tls(&mut tcp).unwrap();
        }
        let mut back = Vec::new();
        let mut s = rustls::Stream::new(&mut conn, &mut tcp);
        s.read_to_end(&mut back).unwrap();
        let mut want = sent;
        want.reverse();
        assert!(
            back == want,
            "{} bytes back, {} expected",
            back.len(),
            want.len()
        );
        guest.join().unwrap();
        server.join().unwrap().unwrap();
    }
}
