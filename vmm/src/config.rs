//! What a machine is made of: the plain configuration a boot or a restore takes.

use std::io::{Read, Write};
use std::path::PathBuf;

use vmm_core::builder::InitramfsPart;
use vmm_core::{VmControl, VmExit};

pub use crate::arch::DEFAULT_CMDLINE;

/// The guest's vsock context id.
pub const GUEST_CID: u64 = 3;

/// The guest network device's MAC address.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A disk given to the guest as a virtio-blk device (`/dev/vda`, `/dev/vdb`, … in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The backing file (its size must be a whole number of 512-byte sectors).
    pub path: PathBuf,
    /// Attach read-only (the guest sees a read-only disk; writes fail with an I/O error).
    pub read_only: bool,
}

impl std::str::FromStr for DiskSpec {
    type Err = String;

    /// `PATH`, `PATH:ro` or `PATH:rw`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, read_only) = match s.rsplit_once(':') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            _ => (s, false),
        };
        if path.is_empty() {
            return Err("empty disk path".into());
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// A host directory shared with the guest through virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// The tag the guest mounts (`mount -t virtiofs TAG PATH`).
    pub tag: String,
    /// The host directory.
    pub dir: PathBuf,
    /// Refuse every change from the guest (on the host side).
    pub read_only: bool,
    /// Let the guest create device nodes and keep setuid/setgid bits on files it creates
    /// (refused and stripped by default: see `virtiofs::Fs::allow_special_files`).
    pub special_files: bool,
}

/// Options after a share's or volume's last `:` — a comma-separated list of `ro`, `rw` and
/// `special` — or `None` when that part is not such a list (then it is part of the path).
pub fn parse_mount_options(options: &str) -> Option<MountOptions> {
    let mut parsed = MountOptions::default();
    for option in options.split(',') {
        match option {
            "ro" => parsed.read_only = true,
            "rw" => parsed.read_only = false,
            "special" => parsed.special_files = true,
            _ => return None,
        }
    }
    Some(parsed)
}

/// What [`parse_mount_options`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// `ro`.
    pub read_only: bool,
    /// `special`: device nodes and setuid/setgid files allowed (directory shares only).
    pub special_files: bool,
}

impl std::str::FromStr for ShareSpec {
    type Err = String;

    /// `DIR:TAG`, then optionally `:` and options (`ro`, `rw`, `special`, comma-separated).
    fn from_str(s: &str) -> Result<Self, String> {
        let (rest, options) = match s
            .rsplit_once(':')
            .and_then(|(r, o)| Some((r, parse_mount_options(o)?)))
        {
            Some((r, o)) if r.contains(':') => (r, o),
            _ => (s, MountOptions::default()),
        };
        let (dir, tag) = rest
            .rsplit_once(':')
            .filter(|(d, t)| !d.is_empty() && !t.is_empty())
            .ok_or_else(|| format!("expected DIR:TAG[:ro|rw][,special], got {s:?}"))?;
        Ok(ShareSpec {
            tag: tag.to_string(),
            dir: PathBuf::from(dir),
            read_only: options.read_only,
            special_files: options.special_files,
        })
    }
}

/// A virtio console: where guest output goes; host input arrives through the handle the
/// `on_ready` callback receives.
pub struct ConsoleSpec {
    /// Where the guest's writes go.
    pub output: Box<dyn Write + Send>,
    /// Called with the console's input handle once the device exists.
    pub on_ready: Option<Box<dyn FnOnce(devices::virtio::console::ConsoleInput) + Send>>,
}

/// A virtio-net device: its host side and the link MTU it advertises.
pub struct NetSpec {
    /// Where the guest's frames go and the host's come from (a NAT, a TAP device).
    pub backend: Box<dyn devices::virtio::net::NetBackend>,
    /// The MTU the device advertises (what the host side expects).
    pub mtu: u16,
}

/// What to boot: a kernel, its initramfs and command line, memory, vCPUs and devices. The
/// virtio devices take MMIO slots in this order: disks, consoles, vsock, network, shares.
pub struct MachineConfig {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The initramfs, as newc archives concatenated in guest memory (the first file is the
    /// base the snapshot's identity records).
    pub initramfs: Vec<InitramfsPart>,
    /// Kernel parameters, appended to [`DEFAULT_CMDLINE`].
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// Where the serial console's output goes.
    pub console: Box<dyn Write + Send>,
    /// Forward this reader (usually stdin) to the serial console's input.
    pub console_input: Option<Box<dyn Read + Send>>,
    /// Disks, in guest order.
    pub disks: Vec<DiskSpec>,
    /// Single-port virtio consoles (`/dev/hvc0`, `/dev/hvc1`, … in order).
    pub consoles: Vec<ConsoleSpec>,
    /// A control handle the caller keeps to stop the VM from outside (default: a fresh one).
    pub control: Option<VmControl>,
    /// A virtio-vsock device (guest CID [`GUEST_CID`]) whose host side is this Unix socket
    /// (`CONNECT <port>` to reach a guest port; guest connections to host port P land on
    /// `<socket>_P`).
    pub vsock: Option<PathBuf>,
    /// A virtio-net device (MAC [`GUEST_MAC`]).
    pub net: Option<NetSpec>,
    /// Host directories shared through virtio-fs.
    pub shares: Vec<ShareSpec>,
    /// Take a snapshot when the guest prints a marker on its serial console, then stop the VM.
    pub snapshot: Option<crate::snapshot::SnapshotRequest>,
    /// Called with the VM's [`Snapshotter`](crate::snapshot::Snapshotter) once it is built,
    /// before it runs.
    pub on_started: Option<Box<dyn FnOnce(crate::snapshot::Snapshotter) + Send>>,
}

/// How a boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootOutcome {
    /// Why the VM stopped.
    pub exit: VmExit,
}

impl BootOutcome {
    /// The guest command's exit status, if init reported one.
    pub fn status(&self) -> Option<i32> {
        match self.exit {
            VmExit::PowerOff(status) => status,
            _ => None,
        }
    }
}

/// What to restore.
pub struct RestoreOptions {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// The kernel the snapshot must have been taken with (checked without reading it).
    pub kernel: Option<PathBuf>,
    /// The initramfs the snapshot must have been taken with.
    pub initramfs: Option<PathBuf>,
    /// Where the guest console goes.
    pub console: Box<dyn Write + Send>,
    /// Forward this reader (usually stdin) to the guest console's input.
    pub console_input: Option<Box<dyn Read + Send>>,
    /// A control handle the caller keeps (default: a fresh one).
    pub control: Option<VmControl>,
    /// The snapshot's virtio consoles, in order: where their output goes now.
    pub consoles: Vec<ConsoleSpec>,
    /// The host socket for the snapshot's vsock device (required if it has one).
    pub vsock: Option<PathBuf>,
    /// The host side for the snapshot's network device (required if it has one).
    pub net: Option<NetSpec>,
    /// Called with the restored VM's snapshotter before it runs.
    pub on_started: Option<Box<dyn FnOnce(crate::snapshot::Snapshotter) + Send>>,
    /// The disk files the snapshot may open.
    pub disks: RestoreDisks,
}

/// The disk files a restore may open. A snapshot's state names its disks by path, and a
/// crafted state must not get the VMM to open any file its user can (read-write, at that):
/// each disk must be one given for this restore, or a file in one of the read-only
/// directories (the image store's root filesystems), attached read-only.
#[derive(Debug, Clone, Default)]
pub struct RestoreDisks {
    /// Disks given for this restore (`boot --disk`); a snapshot's disk may be attached at most
    /// as writable as given here.
    pub given: Vec<DiskSpec>,
    /// Directories whose files may be attached read-only.
    pub read_only_dirs: Vec<PathBuf>,
}

impl RestoreDisks {
    /// Why the disk `path` (attached `read_only` or not) may not be opened, if it may not.
    pub fn refuses(&self, path: &std::path::Path, read_only: bool) -> Option<String> {
        let Ok(real) = path.canonicalize() else {
            return Some(format!("its disk {} does not exist", path.display()));
        };
        let given = self
            .given
            .iter()
            .any(|d| d.path.canonicalize().is_ok_and(|p| p == real) && (read_only || !d.read_only));
        let in_read_only_dir = read_only
            && self
                .read_only_dirs
                .iter()
                .filter_map(|d| d.canonicalize().ok())
                .any(|d| real.parent() == Some(d.as_path()));
        (!given && !in_read_only_dir).then(|| {
            format!(
                "it names the disk {}{}, which this restore was not given (restore it with that \
                 disk given, e.g. `boot --restore DIR --disk {}`)",
                path.display(),
                if read_only { " (read-only)" } else { "" },
                path.display()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_options_parse_and_default_closed() {
        let s: ShareSpec = "/srv/a:tag".parse().unwrap();
        assert_eq!(
            (s.tag.as_str(), s.read_only, s.special_files),
            ("tag", false, false)
        );
        let s: ShareSpec = "/srv/a:tag:ro".parse().unwrap();
        assert!(s.read_only && !s.special_files);
        let s: ShareSpec = "/srv/a:tag:rw,special".parse().unwrap();
        assert!(!s.read_only && s.special_files);
        // A last part that is not an option list is the tag (directories may hold ':').
        let s: ShareSpec = "/srv/a:b:bogus".parse().unwrap();
        assert_eq!(
            (s.dir.to_str(), s.tag.as_str()),
            (Some("/srv/a:b"), "bogus")
        );
        assert!(!s.special_files && !s.read_only);
        assert!("nodir".parse::<ShareSpec>().is_err());
    }

    #[test]
    fn a_restore_opens_only_given_disks_and_read_only_store_files() {
        let base = std::env::temp_dir().join(format!("sm-restore-disks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let store = base.join("rootfs");
        std::fs::create_dir_all(store.join("nested")).unwrap();
        for f in [
            "rootfs/a.squashfs",
            "rootfs/nested/b.squashfs",
            "given.img",
            "other.img",
        ] {
            std::fs::write(base.join(f), b"").unwrap();
        }
        std::os::unix::fs::symlink(base.join("other.img"), store.join("link.squashfs")).unwrap();
        let allowed = RestoreDisks {
            given: vec![DiskSpec {
                path: base.join("given.img"),
                read_only: false,
            }],
            read_only_dirs: vec![store.clone()],
        };
        let ok = |p: &str, ro: bool| allowed.refuses(&base.join(p), ro).is_none();
        assert!(ok("rootfs/a.squashfs", true));
        assert!(!ok("rootfs/a.squashfs", false), "a store file writable");
        assert!(!ok("rootfs/nested/b.squashfs", true), "below the directory");
        assert!(
            !ok("rootfs/link.squashfs", true),
            "a link out of the directory"
        );
        assert!(!ok("rootfs/../other.img", true));
        assert!(ok("given.img", false));
        assert!(ok("given.img", true));
        assert!(!ok("other.img", true));
        assert!(allowed
            .refuses(std::path::Path::new("/etc/passwd"), false)
            .is_some());
        assert!(allowed.refuses(&base.join("missing.img"), true).is_some());
        // Given read-only: never attached writable.
        let read_only = RestoreDisks {
            given: vec![DiskSpec {
                path: base.join("given.img"),
                read_only: true,
            }],
            read_only_dirs: Vec::new(),
        };
        assert!(read_only.refuses(&base.join("given.img"), true).is_none());
        let why = read_only.refuses(&base.join("given.img"), false).unwrap();
        assert!(why.contains("given.img") && why.contains("--disk"), "{why}");
        std::fs::remove_dir_all(base).unwrap();
    }
}
