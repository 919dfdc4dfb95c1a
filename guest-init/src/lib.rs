//! # guest-init
//!
//! The guest side of supermachine: `guest-init`, the static binary that runs as PID 1 in every
//! guest (see `main.rs`), and this small library with what host and guest share:
//!
//! - [`InitConfig`]: what init runs and how, written by the host as JSON at [`CONFIG_PATH`];
//! - [`newc`]: a writer for the `newc` cpio archives the kernel unpacks as the initramfs, so the
//!   host can hand a VM its configuration as a tiny archive appended to the shared base image.
//!
//! Does not own: anything about VMs or devices; the exit-status port number is the only
//! platform fact it knows ([`EXIT_STATUS_PORT`]), and `vmm-core` keeps the same value.
//!
//! ```
//! // The per-VM part of the initramfs: appended to the base archive holding `/init`.
//! let config = guest_init::InitConfig {
//!     argv: vec!["/bin/echo".into(), "hello".into()],
//!     ..Default::default()
//! };
//! let archive = config.to_initramfs();
//! assert!(archive.starts_with(b"070701")); // newc
//! ```
#![deny(missing_docs)]

pub mod newc;

use serde::{Deserialize, Serialize};

/// Where init finds its configuration inside the guest.
pub const CONFIG_PATH: &str = "/etc/supermachine/init.json";

/// The x86 I/O port a 32-bit write to which powers the guest off with that exit status.
pub const EXIT_STATUS_PORT: u16 = 0x00f4;

/// On arm64 (no port I/O): the guest physical address of the VMM's exit-status register
/// (`vmm-core`'s arm64 layout keeps the same value), written through `/dev/mem`.
pub const EXIT_STATUS_ADDR_AARCH64: u64 = 0x4000_1000;

/// Exit status when the command could not be found (as a shell and Docker report it).
pub const EXIT_NOT_FOUND: i32 = 127;
/// Exit status when the command exists but cannot be executed.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
/// Exit status when init itself failed before running the command.
pub const EXIT_INIT_FAILED: i32 = 125;

/// What init runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// The command and its arguments; empty means an interactive `/bin/sh`.
    pub argv: Vec<String>,
    /// Environment variables, `NAME=value`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Host wall-clock time at boot, seconds since the epoch, so the guest's clock is right.
    #[serde(default)]
    pub clock_seconds: Option<i64>,
    /// Print init's own progress lines on the console.
    #[serde(default)]
    pub verbose: bool,
    /// Run the command as a container in an image's root filesystem (else in the initramfs).
    #[serde(default)]
    pub container: Option<ContainerConfig>,
}

/// How to run a container workload: the image's root filesystem, identity and stdio.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerConfig {
    /// The block device holding the image's read-only root filesystem.
    pub rootfs_device: String,
    /// Its filesystem type (`squashfs`).
    pub rootfs_type: String,
    /// `user`, `uid`, `user:group` or `uid:gid` (empty: root), resolved in the image.
    #[serde(default)]
    pub user: String,
    /// The guest's host name.
    pub hostname: String,
    /// Give the workload a terminal (the stdout console) instead of pipes.
    #[serde(default)]
    pub tty: bool,
    /// Connect the host's stdin to the workload's.
    #[serde(default)]
    pub interactive: bool,
    /// The host terminal's size (rows, columns) for the workload's terminal, with `tty`.
    #[serde(default)]
    pub tty_size: Option<(u16, u16)>,
    /// Console carrying the workload's stdout (and stdin).
    pub stdout_device: String,
    /// Console carrying the workload's stderr.
    pub stderr_device: String,
    /// Console carrying control messages from the host ([`ControlMessage`]).
    pub control_device: String,
    /// Volumes to mount in the container before the workload starts.
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Set up everything, say [`HELD`] on the control console, and start the workload only on
    /// [`ControlMessage::Start`] (a bake snapshots the VM while it waits: `-e` given at restore
    /// then reaches the workload).
    #[serde(default)]
    pub hold_before_start: bool,
    /// The guest's network interface, if it has one (besides `lo`).
    #[serde(default)]
    pub network: Option<NetworkConfig>,
}

/// How init configures the guest's network interface (static: the host's NAT or TAP setup
/// decided the addresses; no DHCP client is needed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The interface (`eth0`).
    pub interface: String,
    /// Its IPv4 address.
    pub address: std::net::Ipv4Addr,
    /// The prefix length of its subnet.
    pub prefix_len: u8,
    /// The default gateway.
    pub gateway: std::net::Ipv4Addr,
    /// The DNS server written to `/etc/resolv.conf`.
    pub dns: std::net::Ipv4Addr,
    /// The link MTU.
    pub mtu: u16,
}

/// A block volume mounted in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// The block device (`/dev/vdb`, …).
    pub device: String,
    /// Where it appears in the container (absolute).
    pub target: String,
    /// Its filesystem (`ext4`).
    pub fstype: String,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// What init writes on the control console once the workload's consoles are set up (raw
/// mode): host input sent earlier could be echoed or mangled by the terminal layer.
pub const GUEST_READY: &str = "ready\n";

/// What init writes on the control console once it applied a [`ControlMessage::Restored`];
/// a failure is [`CATCH_UP_FAILED`] followed by the reason and a newline.
pub const CAUGHT_UP: &str = "caught-up\n";
/// See [`CAUGHT_UP`].
pub const CATCH_UP_FAILED: &str = "catch-up-failed ";
/// What init writes on the control console when it holds the workload until
/// [`ControlMessage::Start`] ([`ContainerConfig::hold_before_start`]).
pub const HELD: &str = "held\n";

/// Messages the host sends on the control console, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// Deliver signal N to the workload's process group.
    Signal(i32),
    /// The host's stdin ended: close the workload's.
    StdinEof,
    /// The host terminal's size changed: (rows, columns) for the workload's terminal.
    Resize(u16, u16),
    /// The VM was just restored from a snapshot: catch up (clock, entropy, host name, env),
    /// then answer [`CAUGHT_UP`]. Sent before the vCPUs run, so it costs no connection.
    Restored(agent_protocol::RestoredInfo),
    /// Start the held workload with these `KEY=value` entries added to its environment.
    Start(Vec<String>),
}

impl ControlMessage {
    /// The line for the control console (with its newline).
    pub fn encode(&self) -> String {
        match self {
            ControlMessage::Signal(n) => format!("signal {n}\n"),
            ControlMessage::StdinEof => "stdin-eof\n".into(),
            ControlMessage::Resize(rows, cols) => format!("resize {rows} {cols}\n"),
            // JSON escapes newlines: one line whatever the env holds.
            ControlMessage::Restored(info) => format!(
                "restored {}\n",
                serde_json::to_string(info).unwrap_or_default()
            ),
            ControlMessage::Start(env) => {
                format!("start {}\n", serde_json::to_string(env).unwrap_or_default())
            }
        }
    }

    /// Parses one line (without its newline); unknown lines are `None`.
    pub fn decode(line: &str) -> Option<ControlMessage> {
        match line.trim().split_once(' ') {
            Some(("signal", n)) => n
                .parse()
                .ok()
                .filter(|n| (1..=64).contains(n))
                .map(ControlMessage::Signal),
            Some(("resize", size)) => {
                let (rows, cols) = size.split_once(' ')?;
                Some(ControlMessage::Resize(
                    rows.parse().ok()?,
                    cols.parse().ok()?,
                ))
            }
            Some(("restored", json)) => serde_json::from_str(json)
                .ok()
                .map(ControlMessage::Restored),
            Some(("start", json)) => serde_json::from_str(json).ok().map(ControlMessage::Start),
            None if line.trim() == "stdin-eof" => Some(ControlMessage::StdinEof),
            _ => None,
        }
    }
}

impl InitConfig {
    /// Serializes the config for [`CONFIG_PATH`].
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses a config file's contents.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// A newc archive holding this config at [`CONFIG_PATH`], ready to append to an initramfs.
    pub fn to_initramfs(&self) -> Vec<u8> {
        let mut w = newc::Writer::new(Vec::new());
        let result = (|| {
            w.directory("etc", 0o755)?;
            w.directory("etc/supermachine", 0o755)?;
            w.file("etc/supermachine/init.json", 0o644, &self.to_json())?;
            w.finish()
        })();
        // Writing into a Vec cannot fail.
        result.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_rejects_unknown_fields() {
        let c = InitConfig {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo 'a b'; exit 3".into()],
            env: vec!["A=1".into()],
            workdir: Some("/tmp".into()),
            clock_seconds: Some(1_800_000_000),
            verbose: true,
            container: None,
        };
        assert_eq!(InitConfig::from_json(&c.to_json()).unwrap(), c);
        assert!(InitConfig::from_json(br#"{"argv":[],"bogus":1}"#).is_err());
        assert!(InitConfig::from_json(b"not json").is_err());
    }

    #[test]
    fn control_messages_round_trip_and_reject_garbage() {
        for m in [
            ControlMessage::Signal(15),
            ControlMessage::StdinEof,
            ControlMessage::Resize(50, 132),
            ControlMessage::Restored(agent_protocol::RestoredInfo {
                unix_time_ns: 1_795_000_000_123_456_789,
                entropy: (0..64).collect(),
                env: vec!["A=two\nlines".into(), "B= spaced ".into()],
                hostname: Some("vm-1".into()),
            }),
            ControlMessage::Start(vec!["TENANT=a\nb".into()]),
            ControlMessage::Start(Vec::new()),
        ] {
            let line = m.encode();
            // One line, whatever the env holds.
            assert_eq!(line.matches('\n').count(), 1, "{line}");
            assert_eq!(ControlMessage::decode(&line), Some(m));
        }
        for bad in [
            "",
            "signal",
            "signal 0",
            "signal 999",
            "signal x",
            "reboot",
            "stdin-eof now",
            "resize",
            "resize 24",
            "resize 24 x",
            "resize -1 80",
            "resize 24 80 1",
            "restored",
            "restored {",
            "restored {\"unix_time_ns\": -1}",
            "restored {\"surprise\": 1}",
            "start",
            "start [1]",
            "start {}",
        ] {
            assert_eq!(ControlMessage::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn config_archive_contains_the_file() {
        let c = InitConfig {
            argv: vec!["true".into()],
            ..Default::default()
        };
        let a = c.to_initramfs();
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("etc/supermachine/init.json"));
        assert!(text.contains("TRAILER!!!"));
    }
}
