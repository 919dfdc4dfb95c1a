//! `cargo xtask initramfs`: packs `guest-init` (static, musl) as `/init`, Debian's
//! `busybox-static` with its applet links, and `/dev/console` into a newc archive.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use guest_init::newc::Writer;

use crate::util::{cargo, installed_initramfs, output, run, step, target_dir, write_atomic};

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

/// Builds the archive; installs it where the CLI looks for it; returns its path.
pub fn build() -> Result<PathBuf> {
    let bins = guest_binaries()?;
    let init =
        std::fs::read(bins.join("guest-init")).context("cannot read the guest-init binary")?;
    let blkbench =
        std::fs::read(bins.join("sm-blkbench")).context("cannot read the sm-blkbench binary")?;
    let netbench =
        std::fs::read(bins.join("sm-netbench")).context("cannot read the sm-netbench binary")?;
    let busybox = std::fs::read(BUSYBOX)
        .with_context(|| format!("cannot read {BUSYBOX} (apt-get install busybox-static)"))?;
    let applets = output(Command::new(BUSYBOX).arg("--list-full"))?;

    let mut w = Writer::new(Vec::new());
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc",
        "root", "var", "mnt",
    ] {
        w.directory(dir, if dir == "tmp" { 0o1777 } else { 0o755 })?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.char_device("dev/null", 0o666, 1, 3)?;
    w.file("init", 0o755, &init)?;
    w.file("bin/busybox", 0o755, &busybox)?;
    w.file("usr/bin/sm-blkbench", 0o755, &blkbench)?;
    w.file("usr/bin/sm-netbench", 0o755, &netbench)?;
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
    let archive = w.finish()?;

    let dest = installed_initramfs();
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
