//! TLS termination is not in this build (the `tls` feature is off, so neither `rustls` nor
//! the certificate tools are compiled in). The API is the same as with it; every constructor
//! refuses with [`TlsError::NotBuilt`], so no [`TlsTermination`] can exist.

use std::convert::Infallible;
use std::io;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The protocols offered with ALPN when none are given.
pub const DEFAULT_ALPN: &[&str] = &["http/1.1"];

/// Why a certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// This build has no TLS.
    #[error("TLS termination is not in this build (build supermachine with its `tls` feature)")]
    NotBuilt,
}

/// A checked certificate and key; none can be made in this build.
#[derive(Clone, Debug)]
pub struct TlsTermination {
    never: Infallible,
}

impl TlsTermination {
    /// Refuses: no TLS in this build.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let _ = (cert, key);
        Err(TlsError::NotBuilt)
    }

    /// Refuses: no TLS in this build.
    pub fn from_pem(
        cert_pem: &[u8],
        cert_path: &Path,
        key_pem: &[u8],
        key_path: &Path,
    ) -> Result<Self, TlsError> {
        let _ = (cert_pem, cert_path, key_pem, key_path);
        Err(TlsError::NotBuilt)
    }

    /// Refuses: no TLS in this build.
    pub fn self_signed_localhost() -> Result<Self, TlsError> {
        Err(TlsError::NotBuilt)
    }

    /// Never called: no value of this type exists.
    pub fn with_alpn<S: AsRef<str>>(self, protocols: &[S]) -> Result<Self, TlsError> {
        let _ = protocols;
        match self.never {}
    }

    /// Never called: no value of this type exists.
    pub fn fingerprint(&self) -> &str {
        match self.never {}
    }

    /// Never called: no value of this type exists.
    pub fn generated_certificate_pem(&self) -> Option<&str> {
        match self.never {}
    }

    /// Never called: no value of this type exists.
    pub fn serve(
        &self,
        tcp: TcpStream,
        guest: impl FnOnce() -> Result<UnixStream, String>,
    ) -> Result<(), TlsSessionError> {
        let _ = (tcp, guest);
        match self.never {}
    }
}

/// Why a terminated connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum TlsSessionError {
    /// The client's TLS was bad.
    #[error("TLS handshake: {0}")]
    Handshake(io::Error),
    /// Connecting to the guest port failed.
    #[error("{0}")]
    Guest(String),
}
