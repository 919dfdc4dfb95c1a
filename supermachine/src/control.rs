//! The control socket of a VM's process (`control.sock` in its registry directory): requests
//! that only the process running the VM can carry out, such as a snapshot of the live VM
//! (`supermachine snapshot`). One JSON line in, one JSON line out, per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Snapshot the VM into `dir`, then stop it if `stop`, else let it go on.
    Snapshot {
        /// The snapshot directory (replaced atomically).
        dir: PathBuf,
        /// Stop the VM after the snapshot.
        stop: bool,
    },
    /// Send the workload its stop signal; power the VM off after `grace_ms` if it still runs
    /// (at once with 0).
    Stop {
        /// The grace period in milliseconds.
        grace_ms: u64,
    },
    /// Stop the vCPUs until `Unpause` (devices and published ports go on; what arrives waits).
    Pause,
    /// Let a paused VM run again.
    Unpause,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlReply {
    /// Done; the snapshot's directory.
    Snapshot {
        /// Where it is.
        dir: PathBuf,
    },
    /// The stop is under way.
    Stopping,
    /// Done (a pause or unpause).
    Done,
    /// Refused or failed.
    Error {
        /// Why.
        message: String,
    },
}

/// Errors talking to a VM's control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached or the exchange failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The VM's process answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The answer did not parse.
    #[error("control socket {0}: unexpected answer")]
    Protocol(PathBuf),
}

/// Sends `request` to the VM whose control socket is `socket` and waits for the answer (at
/// most `limit`).
pub fn call(
    socket: &Path,
    request: &ControlRequest,
    limit: Duration,
) -> Result<ControlReply, ControlError> {
    let io = |source| ControlError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(io)?;
    s.set_read_timeout(Some(limit)).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(|e| io(std::io::Error::other(e)))?;
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).map_err(io)?;
    match serde_json::from_str(&answer) {
        Ok(ControlReply::Error { message }) => Err(ControlError::Refused(message)),
        Ok(reply) => Ok(reply),
        Err(_) => Err(ControlError::Protocol(socket.to_path_buf())),
    }
}

/// A control socket being served: dropping it stops the server (and drops its handler).
pub struct Server {
    listener: UnixListener,
    closed: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        self.closed.store(true, Ordering::SeqCst);
        // SAFETY: shutdown of a listening socket we hold a descriptor of; on Linux it wakes
        // the server thread's accept() with an error, after which it sees `closed`.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves requests on `socket` from a background thread, one at a time, with `handle`, until
/// the returned [`Server`] is dropped. The socket is 0600 and answers only processes of the
/// user running this one (`SO_PEERCRED`); others are closed without a reply.
pub fn serve(
    socket: &Path,
    handle: impl Fn(ControlRequest) -> ControlReply + Send + 'static,
) -> std::io::Result<Server> {
    serve_only(socket, devices::unix_peer::own_uid(), handle)
}

fn serve_only(
    socket: &Path,
    owner_uid: u32,
    handle: impl Fn(ControlRequest) -> ControlReply + Send + 'static,
) -> std::io::Result<Server> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    devices::unix_peer::make_private(socket)?;
    let closed = Arc::new(AtomicBool::new(false));
    let accepting = listener.try_clone()?;
    let stop = closed.clone();
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            loop {
                let conn = accepting.accept();
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok((conn, _)) = conn else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if !devices::unix_peer::peer_is(&conn, owner_uid) {
                    tracing::warn!("control socket: refused a connection from another user");
                    continue;
                }
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let mut line = String::new();
                let Ok(reader) = conn.try_clone() else {
                    continue;
                };
                // A request is one short line: refuse anything longer.
                if BufReader::new(reader.take(64 << 10))
                    .read_line(&mut line)
                    .is_err()
                {
                    continue;
                }
                let reply = match serde_json::from_str::<ControlRequest>(&line) {
                    Ok(request) => handle(request),
                    Err(e) => ControlReply::Error {
                        message: format!("bad request: {e}"),
                    },
                };
                let mut out = serde_json::to_vec(&reply).unwrap_or_default();
                out.push(b'\n');
                let _ = (&conn).write_all(&out);
            }
        })?;
    Ok(Server {
        listener,
        closed,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reaches_the_handler_and_its_answer_comes_back() {
        let dir = std::env::temp_dir().join(format!("sm-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("control.sock");
        let server = serve(&socket, |req| match req {
            ControlRequest::Snapshot { dir, stop: false } => ControlReply::Snapshot { dir },
            ControlRequest::Snapshot { stop: true, .. } => ControlReply::Error {
                message: "no".into(),
            },
            ControlRequest::Stop { .. } => ControlReply::Stopping,
            ControlRequest::Pause | ControlRequest::Unpause => ControlReply::Done,
        })
        .unwrap();
        let req = ControlRequest::Snapshot {
            dir: "/x".into(),
            stop: false,
        };
        assert_eq!(
            call(&socket, &req, Duration::from_secs(5)).unwrap(),
            ControlReply::Snapshot { dir: "/x".into() }
        );
        let req = ControlRequest::Snapshot {
            dir: "/x".into(),
            stop: true,
        };
        assert!(matches!(
            call(&socket, &req, Duration::from_secs(5)),
            Err(ControlError::Refused(m)) if m == "no"
        ));
        // Garbage gets an error line, not a dead server.
        let mut s = UnixStream::connect(&socket).unwrap();
        s.write_all(b"{garbage\n").unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        assert!(answer.contains("bad request"), "{answer}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Dropping the server stops it.
        drop(server);
        // Served for another user (standing in for us being a stranger): no answer at all.
        let other = devices::unix_peer::own_uid().wrapping_add(1);
        let stop = ControlRequest::Stop { grace_ms: 1 };
        let _server = serve_only(&socket, other, |_| ControlReply::Stopping).unwrap();
        assert!(matches!(
            call(&socket, &stop, Duration::from_secs(5)),
            Err(ControlError::Io { .. } | ControlError::Protocol(_))
        ));
        assert!(call(&socket, &req, Duration::from_secs(5)).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
