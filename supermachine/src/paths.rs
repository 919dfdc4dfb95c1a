//! Where supermachine keeps its files (see `docs/ARCHITECTURE.md`).

use std::path::PathBuf;

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// `$XDG_CACHE_HOME/supermachine` or `~/.cache/supermachine`: rebuildable artifacts.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache"))
        .join("supermachine")
}

/// The names `cargo xtask kernel`/`initramfs` install this host's guest kernel and initramfs
/// under (`--arch aarch64` builds install the arm64 ones beside the x86-64 ones).
#[cfg(target_arch = "aarch64")]
const GUEST_FILES: (&str, &str) = ("Image-aarch64", "initramfs-aarch64.cpio");
#[cfg(not(target_arch = "aarch64"))]
const GUEST_FILES: (&str, &str) = ("vmlinux", "initramfs.cpio");

/// The guest kernel `cargo xtask kernel` installed (`$SUPERMACHINE_KERNEL` overrides).
pub fn default_kernel() -> PathBuf {
    std::env::var_os("SUPERMACHINE_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("guest").join(GUEST_FILES.0))
}

/// The initramfs `cargo xtask initramfs` installed (`$SUPERMACHINE_INITRAMFS` overrides).
pub fn default_initramfs() -> PathBuf {
    std::env::var_os("SUPERMACHINE_INITRAMFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("guest").join(GUEST_FILES.1))
}
