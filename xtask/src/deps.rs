//! Installs what the build, the tests and the benchmarks need: Debian packages and rustup
//! targets. Idempotent: only what is missing is installed.

use std::process::Command;

use anyhow::{bail, Result};

use crate::util::{have_command, output, run, step};

/// Debian packages and a file each provides (to tell whether it is installed).
const PACKAGES: &[(&str, &str)] = &[
    ("linux-source-6.1", "/usr/src/linux-source-6.1.tar.xz"),
    ("busybox-static", "/bin/busybox"),
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("e2fsprogs", "/sbin/mkfs.ext4"),
    ("build-essential", "/usr/bin/make"),
    ("flex", "/usr/bin/flex"),
    ("bison", "/usr/bin/bison"),
    ("bc", "/usr/bin/bc"),
    ("libelf-dev", "/usr/include/libelf.h"),
    ("libssl-dev", "/usr/include/openssl/ssl.h"),
    ("xz-utils", "/usr/bin/xz"),
    ("docker-registry", "/usr/bin/docker-registry"),
    ("skopeo", "/usr/bin/skopeo"),
    ("apache2-utils", "/usr/bin/htpasswd"),
    ("wrk", "/usr/bin/wrk"),
    ("redis-server", "/usr/bin/redis-server"),
    ("redis-tools", "/usr/bin/redis-benchmark"),
    ("curl", "/usr/bin/curl"),
    ("openssl", "/usr/bin/openssl"),
    // The TAP test's namespace set-up (`ip tuntap`) and the DNS tests' private /etc/hosts.
    ("iproute2", "/usr/bin/ip"),
    ("util-linux", "/usr/bin/unshare"),
];

const RUST_TARGETS: &[&str] = &[
    "x86_64-unknown-linux-musl",
    "aarch64-apple-darwin",
    "x86_64-pc-windows-msvc",
    "aarch64-unknown-linux-gnu",
    // Static arm64 programs for the emulated arm64 host (linked with gcc-aarch64-linux-gnu).
    "aarch64-unknown-linux-musl",
];

pub fn ensure() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, file)| !std::path::Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if !missing.is_empty() {
        if !have_command("apt-get") {
            bail!("missing packages {missing:?} and no apt-get to install them");
        }
        step(&format!(
            "installing Debian packages: {}",
            missing.join(" ")
        ));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    let missing: Vec<&str> = RUST_TARGETS
        .iter()
        .copied()
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if !missing.is_empty() {
        step(&format!("adding rustup targets: {}", missing.join(" ")));
        run(Command::new("rustup")
            .args(["target", "add"])
            .args(&missing))?;
    }
    Ok(())
}
