//! # stream-relay
//!
//! Relays the bytes of many pairs of connected sockets on one thread with epoll, instead of
//! two blocking threads per pair. Used on both sides of a published port: by the guest agent
//! (vsock stream ↔ the guest server's TCP connection) and by the host (the client's TCP
//! connection ↔ the VM's vsock socket).
//!
//! Why: a request/response over a published port used to wake one thread per direction and per
//! request on each side; with many connections one wake-up of the relay serves every pair that
//! is ready. Context switches are what the published-port path spends most on under nested
//! virtualization (`cargo xtask bench redis`), and they are not free on real hardware either.
//!
//! Each direction is half-closed on its own: an end of stream from one side becomes a
//! `shutdown(SHUT_WR)` of the other once the bytes before it are written. An error on either
//! socket ends the pair (both closed). Dropping the [`Relay`] lets the pairs it holds run to
//! their end, then its thread exits.
//!
//! Does not own: making the connections, TLS, or any protocol inside the streams. Linux only
//! (epoll); other hosts get [`Relay::new`] failing with `Unsupported`.
//!
//! ```no_run
//! use std::net::{TcpListener, TcpStream};
//!
//! # fn main() -> std::io::Result<()> {
//! let relay = stream_relay::Relay::new("relay")?;
//! let listener = TcpListener::bind("127.0.0.1:8080")?;
//! for client in listener.incoming() {
//!     let upstream = TcpStream::connect("127.0.0.1:80")?;
//!     // Both directions move on the relay's thread until each side has closed.
//!     relay.add(client?.into(), upstream.into())?;
//! }
//! # Ok(()) }
//! ```

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::Relay;

#[cfg(not(target_os = "linux"))]
mod other {
    use std::io;
    use std::os::fd::OwnedFd;

    /// A relay thread (epoll: Linux only).
    pub struct Relay(());

    impl Relay {
        /// Not on this platform yet.
        pub fn new(_name: &str) -> io::Result<Relay> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "stream-relay needs Linux (epoll)",
            ))
        }

        /// Not on this platform yet.
        pub fn add(&self, _a: OwnedFd, _b: OwnedFd) -> io::Result<()> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "stream-relay needs Linux (epoll)",
            ))
        }

        /// Not on this platform yet (nothing to evict).
        pub fn evict_idle(&self, _idle_for: std::time::Duration) {}

        /// Not on this platform yet.
        pub fn add_guarded(
            &self,
            _a: OwnedFd,
            _b: OwnedFd,
            _guard: impl Send + 'static,
        ) -> io::Result<()> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "stream-relay needs Linux (epoll)",
            ))
        }
    }
}
#[cfg(not(target_os = "linux"))]
pub use other::Relay;
