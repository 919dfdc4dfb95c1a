//! Test images assembled from this machine's Debian packages as OCI layouts under
//! `target/images/`: the busybox image, and a Redis server image (busybox plus Debian's
//! `redis-server` and `redis-benchmark` with the shared libraries they load).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{output, target_dir};

/// The busybox image (from Debian's busybox-static) at `target/images/busybox`.
pub fn busybox() -> Result<PathBuf> {
    let dir = target_dir().join("images/busybox");
    let layer = busybox_layer()?;
    oci_bake::layout::write_layout(
        &dir,
        "latest",
        &[layer],
        &oci_bake::layout::busybox_config(),
    )?;
    Ok(dir)
}

/// The busybox image for arm64 (Debian's `busybox-static:arm64`, platform `linux/arm64`) at
/// `target/images/busybox-arm64`.
pub fn busybox_arm64() -> Result<PathBuf> {
    let dir = target_dir().join("images/busybox-arm64");
    let busybox = crate::testhost_arm64::ensure_busybox()?;
    // Debian builds both architectures' busybox from one configuration: this machine's lists
    // the applets (the arm64 one cannot run here).
    let applets = output(Command::new("/bin/busybox").arg("--list-full"))
        .context("cannot run /bin/busybox (apt-get install busybox-static)")?;
    let layer = oci_bake::layout::busybox_layer_with(&busybox, &applets)?;
    oci_bake::layout::write_layout_for(
        &dir,
        "latest",
        &[layer],
        &oci_bake::layout::busybox_config(),
        ("linux", "arm64"),
    )?;
    Ok(dir)
}

fn busybox_layer() -> Result<Vec<u8>> {
    oci_bake::layout::busybox_layer(Path::new("/bin/busybox"))
        .context("cannot read /bin/busybox (apt-get install busybox-static)")
}

/// Binaries of the Redis image, from Debian's `redis-server` and `redis-tools`.
const REDIS_BINARIES: &[&str] = &["/usr/bin/redis-server", "/usr/bin/redis-benchmark"];

/// The Redis image at `target/images/redis`: busybox, then a layer with Redis and its
/// libraries; it runs `redis-server` on port 6379 without persistence or protected mode.
pub fn redis() -> Result<PathBuf> {
    let dir = target_dir().join("images/redis");
    let mut files = BTreeSet::new();
    for bin in REDIS_BINARIES {
        if !Path::new(bin).is_file() {
            bail!("{bin} is missing (apt-get install redis-server redis-tools)");
        }
        files.insert(PathBuf::from(bin));
        files.extend(shared_libraries(Path::new(bin))?);
    }
    let layer = files_layer(&files)?;
    let config = oci_bake::manifest::ContainerConfig {
        cmd: Some(
            [
                "redis-server",
                "--port",
                "6379",
                "--bind",
                "0.0.0.0",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .map(String::from)
            .to_vec(),
        ),
        exposed_ports: Some([("6379/tcp".to_string(), serde_json::json!({}))].into()),
        ..oci_bake::layout::busybox_config()
    };
    oci_bake::layout::write_layout(&dir, "latest", &[busybox_layer()?, layer], &config)?;
    Ok(dir)
}

/// The shared objects `binary` loads, as `ldd` resolves them (the dynamic loader included).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(binary))?;
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// A layer with `files` (symlinks followed) at their paths, and every parent directory.
fn files_layer(files: &BTreeSet<PathBuf>) -> Result<Vec<u8>> {
    let mut dirs = BTreeSet::new();
    for f in files {
        let mut p = f.parent();
        while let Some(d) = p.filter(|d| *d != Path::new("/")) {
            dirs.insert(d.to_path_buf());
            p = d.parent();
        }
    }
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    };
    for d in &dirs {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, rel(d), &[][..])?;
    }
    for f in files {
        let data = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let mut h = header(tar::EntryType::Regular, 0o755, data.len() as u64);
        b.append_data(&mut h, rel(f), &data[..])?;
    }
    Ok(b.into_inner()?)
}

fn rel(p: &Path) -> &Path {
    p.strip_prefix("/").unwrap_or(p)
}
