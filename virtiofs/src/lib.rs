//! # virtiofs
//!
//! Shares a host directory with a guest as a virtio-fs device (`mount -t virtiofs TAG PATH`).
//! The FUSE requests the guest's driver puts on the queues are served by `fuse-backend-rs`'
//! passthrough filesystem: every inode is an `O_PATH` descriptor opened relative to its parent
//! without following symlinks, so `..`, absolute symlinks and symlink races cannot reach
//! outside the shared directory (a symlink's target is the guest's to resolve, in the guest).
//! A read-only share refuses every modifying request on the host side, whatever the guest's
//! kernel does.
//!
//! Owns: the device model (queues, config space, request dispatch) and the read-only filter.
//!
//! Does not own: the FUSE protocol and filesystem operations (`fuse-backend-rs`), the virtio
//! transport (`devices`), where the guest mounts the share (`guest-init`).
#![deny(missing_docs)]

#[cfg(target_os = "linux")]
mod device;

#[cfg(target_os = "linux")]
pub use device::{Fs, FsError, TAG_LEN};
