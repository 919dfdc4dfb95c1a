//! A Linux TAP device as a [`NetBackend`]: the guest's frames come out of a host network
//! interface, and what the host sends through that interface reaches the guest.
//!
//! Creating a TAP device needs `CAP_NET_ADMIN`; attaching to an existing persistent one
//! (`ip tuntap add mode tap user $USER name tap0`) needs only to be its owner. Configuring the
//! interface (addresses, bringing it up, bridging) is left to the host.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::NetBackend;

/// The TUN/TAP clone device.
pub const TUN_PATH: &str = "/dev/net/tun";
/// Longest interface name (`IFNAMSIZ` less its NUL).
pub const MAX_NAME_LEN: usize = 15;

/// `struct ifreq` as TUNSETIFF uses it: the name, then the flags in the union (40 bytes, the
/// size of `struct ifreq` on 64-bit Linux; more than enough on 32-bit).
#[repr(C)]
struct IfReq {
    name: [u8; MAX_NAME_LEN + 1],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Why a TAP device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("tap device name {0:?} is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong(String),
    /// The name holds a character interface names cannot have.
    #[error("tap device name {0:?} is not a valid interface name (no '/', ':', whitespace or NUL; not \".\" or \"..\")")]
    InvalidName(String),
    /// The kernel has no TUN/TAP support loaded, or the device node is missing.
    #[error("{TUN_PATH} is missing: the kernel needs the tun module (modprobe tun)")]
    NoTunDevice(#[source] io::Error),
    /// Opening the clone device or attaching to the interface was refused.
    #[error(
        "cannot open tap device {name:?}: needs CAP_NET_ADMIN or a TAP device owned by this user"
    )]
    PermissionDenied {
        /// The interface name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The TAP device exists and another process has it open.
    #[error("tap device {name:?} is busy: another process has it open")]
    Busy {
        /// The interface name.
        name: String,
    },
    /// An interface of that name exists but is not a TAP device.
    #[error("{name:?} is an existing interface that is not a TAP device")]
    NotATap {
        /// The interface name.
        name: String,
    },
    /// The clone device could not be opened for another reason.
    #[error("cannot open {TUN_PATH}: {0}")]
    Open(#[source] io::Error),
    /// Attaching to the interface failed for another reason.
    #[error("cannot attach to tap device {name:?}: {source}")]
    Attach {
        /// The interface name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// An open TAP device (frames without packet information or virtio headers), non-blocking.
/// A device this process created disappears when the `Tap` is dropped; a persistent one stays.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the TAP device `name`, creating it if it does not exist. An empty name, or one
    /// with `%d`, lets the kernel pick the name (see [`name`](Self::name)).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.len() > MAX_NAME_LEN {
            return Err(TapError::NameTooLong(name.to_owned()));
        }
        if name == "."
            || name == ".."
            || name
                .bytes()
                .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace())
        {
            return Err(TapError::InvalidName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TapError::NoTunDevice(e),
                Some(libc::EACCES | libc::EPERM) => TapError::PermissionDenied {
                    name: name.to_owned(),
                    source: e,
                },
                _ => TapError::Open(e),
            })?;
        let mut req = IfReq {
            name: [0; MAX_NAME_LEN + 1],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is a live, exclusively
        // borrowed buffer at least that large, and `file` is the clone device just opened.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            let name = name.to_owned();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied { name, source: e },
                Some(libc::EBUSY) => TapError::Busy { name },
                Some(libc::EINVAL) => TapError::NotATap { name },
                _ => TapError::Attach { name, source: e },
            });
        }
        // The kernel wrote back the name it used (the same, or the one it picked).
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        Ok(Tap { file, name })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) {
        loop {
            match (&self.file).write(frame) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Sent; or dropped (the interface's queue is full, or it is down), like a wire.
                _ => return,
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            match (&self.file).read(buf) {
                Ok(0) => return None,
                Ok(n) => return Some(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Nothing waits (WouldBlock), or the device failed: no frame either way.
                Err(_) => return None,
            }
        }
    }

    fn poll(&mut self) {}

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::MAX_FRAME;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        let e = Tap::open("twenty-byte-name-xyz").unwrap_err();
        assert!(matches!(e, TapError::NameTooLong(_)), "{e:?}");
        assert!(e.to_string().contains("longer than 15 bytes"), "{e}");
        for bad in ["a/b", "a b", "a:b", ".", "..", "a\0b", "tab\t"] {
            let e = Tap::open(bad).unwrap_err();
            assert!(matches!(e, TapError::InvalidName(_)), "{bad:?}: {e:?}");
        }
    }

    /// Creates a TAP device when this process may (root with CAP_NET_ADMIN and /dev/net/tun);
    /// otherwise the error must say why, clearly.
    #[test]
    fn opens_a_tap_device_or_explains_why_not() {
        let name = format!("smtest{}", std::process::id() % 1_000_000);
        let mut tap = match Tap::open(&name) {
            Ok(tap) => tap,
            Err(e @ TapError::PermissionDenied { .. }) => {
                assert!(e.to_string().contains("needs CAP_NET_ADMIN"), "{e}");
                return;
            }
            Err(e @ TapError::NoTunDevice(_)) => {
                assert!(e.to_string().contains("/dev/net/tun is missing"), "{e}");
                return;
            }
            Err(e) => panic!("opening {name}: {e}"),
        };
        assert_eq!(tap.name(), name);
        assert_eq!(tap.event_fd(), Some(tap.file.as_raw_fd()));
        // The interface is down: nothing to read, and a frame sent is dropped quietly.
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(tap.recv(&mut buf), None);
        tap.send(&[0xff; 60]);
        tap.poll();
        // One user at a time.
        let e = Tap::open(&name).unwrap_err();
        assert!(matches!(e, TapError::Busy { .. }), "{e:?}");
        assert!(e.to_string().contains("busy"), "{e}");
        // Not a TAP device.
        let e = Tap::open("lo").unwrap_err();
        assert!(matches!(e, TapError::NotATap { .. }), "{e:?}");
        // The device goes with its last descriptor; the name can be used again.
        drop(tap);
        let again = Tap::open(&name).unwrap();
        assert_eq!(again.name(), name);
    }
}
