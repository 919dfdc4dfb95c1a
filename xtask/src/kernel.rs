//! `cargo xtask kernel`: builds the guest kernel from Debian's `linux-source-6.1` with our
//! committed config fragment, cached under `~/.cache/supermachine/kernel/<key>/` where the key
//! hashes the source package version and the fragment. A build happens only when the key
//! changes; the object tree is kept, so a config change rebuilds incrementally.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util::{
    cache_dir, copy_atomic, installed_kernel, nproc, output, run, sha256_hex, step, workspace_root,
};

const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// Bump when the build recipe changes in a way the fragment does not show.
const RECIPE_VERSION: &str = "1";

pub fn fragment_path() -> PathBuf {
    workspace_root().join("xtask/kernel/microvm-x86_64.config")
}

fn source_version() -> Result<String> {
    Ok(
        output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))
            .context("linux-source-6.1 is not installed (cargo xtask deps installs it)")?
            .trim()
            .to_string(),
    )
}

/// The cache key of the kernel the current fragment produces.
pub fn cache_key() -> Result<String> {
    let fragment = std::fs::read(fragment_path())?;
    let version = source_version()?;
    Ok(sha256_hex(&[RECIPE_VERSION.as_bytes(), version.as_bytes(), &fragment])[..16].to_string())
}

/// Builds (if needed) and installs the guest kernel; returns its path.
pub fn build() -> Result<PathBuf> {
    let key = cache_key()?;
    let out_dir = cache_dir().join("kernel").join(&key);
    let vmlinux = out_dir.join("vmlinux");
    if vmlinux.is_file() {
        eprintln!("kernel: cached build {key} is up to date");
    } else {
        let started = std::time::Instant::now();
        compile(&out_dir)?;
        eprintln!(
            "kernel: built {key} in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    let installed = installed_kernel();
    if std::fs::read(&installed).ok().as_deref() != Some(&std::fs::read(&vmlinux)?[..]) {
        copy_atomic(&vmlinux, &installed)?;
    }
    eprintln!("kernel: {}", installed.display());
    Ok(installed)
}

fn compile(out_dir: &Path) -> Result<()> {
    let version = source_version()?;
    let work = cache_dir().join("kernel");
    let src = work.join(format!("src-{version}"));
    let obj = work.join("obj");
    if !src.join("Makefile").is_file() {
        step(&format!("kernel: unpacking {SOURCE_TARBALL}"));
        let tmp = work.join(format!(".src-unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        run(Command::new("tar")
            .args(["-xf", SOURCE_TARBALL, "--strip-components=1", "-C"])
            .arg(&tmp))?;
        let _ = std::fs::remove_dir_all(&src);
        std::fs::rename(&tmp, &src)?;
    }
    std::fs::create_dir_all(&obj)?;
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.arg("-C").arg(&src).arg(format!("O={}", obj.display()));
        c.args(args);
        c
    };
    step("kernel: configuring (allnoconfig + xtask/kernel/microvm-x86_64.config)");
    run(make(&["-s", "allnoconfig"]).stdout(Stdio::null()))?;
    run(Command::new(src.join("scripts/kconfig/merge_config.sh"))
        .current_dir(&obj)
        .args(["-m", "-O"])
        .arg(&obj)
        .arg(obj.join(".config"))
        .arg(fragment_path())
        .stdout(Stdio::null()))?;
    run(make(&["-s", "olddefconfig"]).stdout(Stdio::null()))?;
    verify_config(&obj.join(".config"))?;

    step(&format!(
        "kernel: compiling with {} jobs (about 4 minutes on 2 cores)",
        nproc()
    ));
    let mut child = make(&[&format!("-j{}", nproc()), "vmlinux"])
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start make")?;
    let mut compiled = 0usize;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim_start().starts_with("CC") {
                compiled += 1;
                if compiled.is_multiple_of(100) {
                    eprintln!("kernel: {compiled} files compiled");
                }
            } else if line.contains("LD") && line.contains("vmlinux") {
                eprintln!("kernel: linking");
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("kernel build failed ({status}); see the compiler output above");
    }
    copy_atomic(&obj.join("vmlinux"), &out_dir.join("vmlinux"))?;
    copy_atomic(&obj.join(".config"), &out_dir.join("config"))?;
    Ok(())
}

/// Every `CONFIG_X=y` and `# CONFIG_X is not set` in the fragment must survive olddefconfig;
/// a silently dropped option is a guest that lacks a feature we think it has.
fn verify_config(config: &Path) -> Result<()> {
    let fragment = std::fs::read_to_string(fragment_path())?;
    let config = std::fs::read_to_string(config)?;
    let lines: std::collections::HashSet<&str> = config.lines().collect();
    let mut dropped = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if line.starts_with("CONFIG_") {
            if !lines.contains(line) {
                dropped.push(line.to_string());
            }
        } else if let Some(name) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            if config.lines().any(|l| l.starts_with(&format!("{name}="))) {
                dropped.push(line.to_string());
            }
        }
    }
    if !dropped.is_empty() {
        bail!(
            "kernel config: these fragment lines did not survive olddefconfig (a dependency is missing):\n  {}",
            dropped.join("\n  ")
        );
    }
    Ok(())
}
