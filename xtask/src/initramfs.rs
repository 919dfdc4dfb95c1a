//! `cargo xtask initramfs`: packs `guest-init` (static, musl) as `/init`, Debian's
//! `busybox-static` with its applet links, and `/dev/console` into a newc archive;
//! `--arch aarch64` packs the same for arm64 (cross-built, installed as
//! `initramfs-aarch64.cpio`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use guest_init::newc::Writer;

use crate::kernel::Arch;
use crate::util::{cargo, installed_initramfs_for, output, run, step, target_dir, write_atomic};

const MUSL: &str = "x86_64-unknown-linux-musl";
const BUSYBOX: &str = "/bin/busybox";

/// Builds the guest binaries (static, musl): `guest-init` and the `sm-blkbench` and
/// `sm-netbench` tools.
pub fn guest_binaries() -> Result<PathBuf> {
    step("initramfs: building guest-init, sm-blkbench and sm-netbench (static, musl)");
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "guest-init",
        "--bins",
        "--target",
        MUSL,
    ]))?;
    Ok(target_dir().join(MUSL).join("release"))
}

/// Builds the x86-64 archive; installs it where the CLI looks for it; returns its path.
pub fn build() -> Result<PathBuf> {
    build_for(Arch::X86_64)
}

/// Builds the archive for `arch` (arm64: guest-init cross-built for
/// `aarch64-unknown-linux-musl`, Debian's arm64 `busybox-static`); installs it where the CLI
/// of that architecture looks for it; returns its path.
pub fn build_for(arch: Arch) -> Result<PathBuf> {
    let (bins, busybox) = match arch {
        Arch::X86_64 => (guest_binaries()?, PathBuf::from(BUSYBOX)),
        Arch::Aarch64 => (
            crate::testhost_arm64::guest_binaries()?,
            crate::testhost_arm64::ensure_busybox()?,
        ),
    };
    let read = |name: &str| {
        std::fs::read(bins.join(name)).with_context(|| format!("cannot read the {name} binary"))
    };
    let busybox_bytes = std::fs::read(&busybox).with_context(|| {
        format!(
            "cannot read {} (apt-get install busybox-static)",
            busybox.display()
        )
    })?;
    // The applet list of this machine's busybox: Debian builds both architectures' from one
    // configuration, and an arm64 busybox cannot run here to list its own.
    if !Path::new(BUSYBOX).is_file() {
        bail!("{BUSYBOX} is missing (apt-get install busybox-static)");
    }
    let applets = output(Command::new(BUSYBOX).arg("--list-full"))?;
    let archive = archive(
        &read("guest-init")?,
        &read("sm-blkbench")?,
        &read("sm-netbench")?,
        &busybox_bytes,
        &applets,
    )?;

    let dest = installed_initramfs_for(arch);
    if std::fs::read(&dest).ok().as_deref() != Some(&archive[..]) {
        write_atomic(&dest, &archive)?;
    }
    eprintln!(
        "initramfs: {} ({} KiB)",
        dest.display(),
        archive.len() / 1024
    );
    Ok(dest)
}

/// The newc archive: `init`, busybox with its applet links, the benchmark tools, `/dev`'s
/// console and null, and a minimal `/etc/passwd` and `/etc/group`.
fn archive(
    init: &[u8],
    blkbench: &[u8],
    netbench: &[u8],
    busybox: &[u8],
    applets: &str,
) -> Result<Vec<u8>> {
    let mut w = Writer::new(Vec::new());
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc",
        "root", "var", "mnt",
    ] {
        w.directory(dir, if dir == "tmp" { 0o1777 } else { 0o755 })?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.char_device("dev/null", 0o666, 1, 3)?;
    w.file("init", 0o755, init)?;
    w.file("bin/busybox", 0o755, busybox)?;
    w.file("usr/bin/sm-blkbench", 0o755, blkbench)?;
    w.file("usr/bin/sm-netbench", 0o755, netbench)?;
    for applet in applets.lines().map(str::trim) {
        let name = applet.trim_start_matches('/');
        if name.is_empty() || name == "bin/busybox" || name == "init" || name == "linuxrc" {
            continue;
        }
        w.symlink(name, "/bin/busybox")?;
    }
    w.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    w.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    Ok(w.finish()?)
}
