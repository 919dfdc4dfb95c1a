//! Who is on the other end of a Unix socket: host-side endpoints (the vsock device's socket,
//! the VMM's control socket) serve only the user that runs the VMM.
//!
//! The socket files already live in 0700 directories with mode 0600; checking the peer's
//! credentials as well means a socket that leaks out of that directory (a bind mount, a
//! descriptor passed on, a directory made too open later) still serves nobody else.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The effective uid of the process on the other end of a connected Unix socket, as the
/// kernel recorded it at `connect` (`SO_PEERCRED`).
pub fn peer_uid(socket: &impl AsRawFd) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a valid ucred.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// This process's effective uid: the one user its sockets serve.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Whether the peer of `socket` is `uid` (false when it cannot be told).
pub fn peer_is(socket: &impl AsRawFd, uid: u32) -> bool {
    peer_uid(socket).is_ok_and(|peer| peer == uid)
}

/// Makes a freshly bound socket file readable and writable by its owner only.
pub fn make_private(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process_user() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_uid(&a).unwrap(), own_uid());
        assert!(peer_is(&a, own_uid()));
        assert!(!peer_is(&a, own_uid().wrapping_add(1)));
    }

    #[test]
    fn a_descriptor_that_is_not_a_socket_has_no_peer() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(peer_uid(&f).is_err());
        assert!(!peer_is(&f, own_uid()));
    }
}
