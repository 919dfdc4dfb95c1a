//! `cargo xtask bench pull`: pulling a multi-layer image of 100+ MiB from a registry on
//! loopback (Debian's `docker-registry`): cold (empty store: download, verify, unpack, build the
//! root filesystem) and warm (cached), next to `skopeo copy` of the same image to an OCI layout.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::util::{self, cargo, step, target_dir};

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic, partly compressible content, like real binaries and data.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(16) {
            out.extend_from_slice(b"the quick brown fox jumps over the lazy dog 0123456789\n");
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// A layout with `layers` gzip layers of about `layer_mib` MiB each, many files per layer.
fn build_image(dir: &Path, layers: usize, layer_mib: usize) -> Result<()> {
    if dir.join("index.json").is_file() {
        return Ok(());
    }
    step(&format!("bench pull: building a {layers}-layer test image"));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    let put = |bytes: &[u8]| -> Result<(String, usize)> {
        let h = sha(bytes);
        std::fs::write(dir.join("blobs/sha256").join(&h), bytes)?;
        Ok((format!("sha256:{h}"), bytes.len()))
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in 0..layers {
        let mut b = tar::Builder::new(Vec::new());
        let files = 200;
        for f in 0..files {
            let data = content((l * 1000 + f) as u64, layer_mib * (1 << 20) / files);
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, format!("layer{l}/dir{}/file{f}", f % 10), &data[..])?;
        }
        let raw = b.into_inner()?;
        diff_ids.push(format!("sha256:{}", sha(&raw)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw)?;
        descs.push(put(&gz.finish()?)?);
    }
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]}, "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let (cd, cs) = put(&serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs.iter().map(|(d, s)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}))
            .collect::<Vec<_>>()});
    let (md, ms) = put(&serde_json::to_vec(&manifest)?)?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

struct Registry(Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_registry(dir: &Path) -> Result<(Registry, u16)> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        ),
    )?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start docker-registry (cargo xtask deps installs it)")?;
    let reg = Registry(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the registry did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((reg, port))
}

fn timed(cmd: &mut Command) -> Result<f64> {
    let started = Instant::now();
    let out = cmd.stdin(Stdio::null()).output()?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            util::describe(cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(secs)
}

pub fn bench(runs: usize, layers: usize, layer_mib: usize) -> Result<()> {
    crate::deps::ensure()?;
    util::run(cargo().args([
        "build",
        "--release",
        "-p",
        "supermachine-cli",
        "--bin",
        "supermachine",
    ]))?;
    let sm = target_dir().join("release/supermachine");
    let image = target_dir().join("bench-image");
    build_image(&image, layers, layer_mib)?;
    let work = target_dir().join(format!("bench-pull-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let (_registry, port) = start_registry(&work)?;
    let remote = format!("127.0.0.1:{port}/bench/img:v1");
    util::run(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", image.display()),
        &format!("docker://{remote}"),
    ]))?;
    let compressed: u64 = std::fs::read_dir(image.join("blobs/sha256"))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    step(&format!("bench pull: {runs} runs each"));
    let (mut cold, mut warm, mut sk_cold, mut sk_warm) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let home = work.join(format!("home{run}"));
        let pull = || {
            let mut c = Command::new(&sm);
            c.args(["pull", "-q", &remote])
                .env("SUPERMACHINE_HOME", &home);
            c
        };
        cold.push(timed(&mut pull())?);
        warm.push(timed(&mut pull())?);
        let dest = work.join(format!("skopeo{run}"));
        let copy = || {
            let mut c = Command::new("skopeo");
            c.args([
                "--insecure-policy",
                "copy",
                "-q",
                "--src-tls-verify=false",
                &format!("docker://{remote}"),
                &format!("oci:{}:v1", dest.display()),
            ]);
            c
        };
        sk_cold.push(timed(&mut copy())?);
        sk_warm.push(timed(&mut copy())?);
        let _ = std::fs::remove_dir_all(&home);
        let _ = std::fs::remove_dir_all(&dest);
    }
    let _ = std::fs::remove_dir_all(&work);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "\nPull of a {layers}-layer image ({:.0} MiB compressed, {} MiB of files) from a registry on loopback, median of {runs} runs, seconds\n",
        compressed as f64 / (1 << 20) as f64,
        layers * layer_mib
    );
    println!("| tool | cold | warm (cached) |");
    println!("|---|---:|---:|");
    println!(
        "| supermachine pull (download + verify + unpack + squashfs) | {:.2} | {:.3} |",
        med(&mut cold),
        med(&mut warm)
    );
    println!(
        "| skopeo copy to an OCI layout (download only) | {:.2} | {:.3} |",
        med(&mut sk_cold),
        med(&mut sk_warm)
    );
    Ok(())
}
