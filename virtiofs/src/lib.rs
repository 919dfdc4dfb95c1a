//! # virtiofs
//!
//! Shares a host directory with a guest as a virtio-fs device (`mount -t virtiofs TAG PATH`).
//! The FUSE requests the guest's driver puts on the queues are served by `fuse-backend-rs`'
//! passthrough filesystem: every inode is an `O_PATH` descriptor opened relative to its parent
//! without following symlinks, so `..`, absolute symlinks and symlink races cannot reach
//! outside the shared directory (a symlink's target is the guest's to resolve, in the guest).
//! A read-only share refuses every modifying request on the host side, whatever the guest's
//! kernel does; a writable one refuses device nodes and strips setuid/setgid bits unless
//! [`Fs::allow_special_files`] allows them. Requests are copied out of guest memory before they
//! are checked, so the guest cannot change a request between the check and its execution.
//!
//! Owns: the device model (queues, config space, request dispatch), the private copy of each
//! request and the share's policy (read-only, special files).
//!
//! Does not own: the FUSE protocol and filesystem operations (`fuse-backend-rs`), the virtio
//! transport (`devices`), where the guest mounts the share (`guest-init`).
//!
//! ```no_run
//! # #[cfg(target_os = "linux")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A read-only share of ./data under the tag `data`; put it on a virtio-mmio slot
//! // (devices::virtio::MmioTransport) and mount it in the guest with
//! // `mount -t virtiofs data /mnt`.
//! let fs = virtiofs::Fs::new("data", std::path::Path::new("./data"), true)?;
//! let _device: Box<dyn devices::virtio::VirtioDevice> = Box::new(fs);
//! # Ok(()) }
//! # #[cfg(not(target_os = "linux"))] fn main() {}
//! ```
#![deny(missing_docs)]

#[cfg(target_os = "linux")]
mod bounce;
#[cfg(target_os = "linux")]
mod device;
#[cfg(target_os = "linux")]
mod policy;

#[cfg(target_os = "linux")]
pub use device::{Fs, FsError, TAG_LEN};
