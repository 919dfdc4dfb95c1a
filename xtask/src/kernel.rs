//! `cargo xtask kernel [--arch aarch64]`: builds the guest kernel from Debian's
//! `linux-source-6.1` with our committed config fragment (`xtask/kernel/microvm-ARCH.config`),
//! cached under `~/.cache/supermachine/kernel/<key>/` where the key hashes the source package
//! version, the fragment and (for arm64) the architecture. A build happens only when the key
//! changes; the object tree is kept per architecture, so a config change rebuilds
//! incrementally. The arm64 kernel is cross-built with Debian's `gcc-aarch64-linux-gnu`.

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

/// The architecture a guest kernel is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `vmlinux` (ELF with a PVH note), built natively.
    X86_64,
    /// `Image` (the arm64 boot protocol's), cross-built.
    Aarch64,
}

impl Arch {
    /// From `--arch`.
    pub fn parse(name: &str) -> Result<Arch> {
        match name {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            other => bail!("unknown architecture {other:?} (x86_64 or aarch64)"),
        }
    }

    fn fragment(self) -> PathBuf {
        workspace_root().join(match self {
            Arch::X86_64 => "xtask/kernel/microvm-x86_64.config",
            Arch::Aarch64 => "xtask/kernel/microvm-aarch64.config",
        })
    }

    /// What `make` needs besides the target.
    fn make_vars(self) -> &'static [&'static str] {
        match self {
            Arch::X86_64 => &[],
            Arch::Aarch64 => &["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"],
        }
    }

    /// The make target, and the file it produces in the object tree.
    fn image(self) -> (&'static str, &'static str) {
        match self {
            Arch::X86_64 => ("vmlinux", "vmlinux"),
            Arch::Aarch64 => ("Image", "arch/arm64/boot/Image"),
        }
    }

    /// Where the built kernel is installed for the VMM.
    pub fn installed(self) -> PathBuf {
        match self {
            Arch::X86_64 => installed_kernel(),
            Arch::Aarch64 => crate::util::guest_dir().join("Image-aarch64"),
        }
    }
}

fn source_version() -> Result<String> {
    Ok(
        output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))
            .context("linux-source-6.1 is not installed (cargo xtask deps installs it; apt-get install linux-source-6.1)")?
            .trim()
            .to_string(),
    )
}

/// The cache key of the kernel the current fragment produces (for x86-64 the same as before
/// there was a second architecture, so existing caches stay valid).
pub fn cache_key(arch: Arch) -> Result<String> {
    let fragment = std::fs::read(arch.fragment())?;
    let version = source_version()?;
    let mut parts: Vec<&[u8]> = vec![RECIPE_VERSION.as_bytes(), version.as_bytes(), &fragment];
    if arch == Arch::Aarch64 {
        parts.push(b"aarch64");
    }
    Ok(sha256_hex(&parts)[..16].to_string())
}

/// Builds (if needed) and installs the x86-64 guest kernel; returns its path.
pub fn build() -> Result<PathBuf> {
    build_for(Arch::X86_64)
}

/// Builds (if needed) and installs the guest kernel for `arch`; returns its path.
pub fn build_for(arch: Arch) -> Result<PathBuf> {
    // The source package and the build tools, on a fresh machine (a no-op once installed).
    crate::deps::ensure()?;
    if arch == Arch::Aarch64 && !crate::util::have_command("aarch64-linux-gnu-gcc") {
        step("kernel: installing the arm64 cross compiler (gcc-aarch64-linux-gnu)");
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "gcc-aarch64-linux-gnu"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let key = cache_key(arch)?;
    let out_dir = cache_dir().join("kernel").join(&key);
    let name = arch.image().0;
    let built = out_dir.join(name);
    if built.is_file() {
        eprintln!("kernel: cached build {key} is up to date");
    } else {
        let started = std::time::Instant::now();
        compile(arch, &out_dir)?;
        eprintln!(
            "kernel: built {key} in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    let installed = arch.installed();
    if std::fs::read(&installed).ok().as_deref() != Some(&std::fs::read(&built)?[..]) {
        copy_atomic(&built, &installed)?;
    }
    eprintln!("kernel: {}", installed.display());
    Ok(installed)
}

fn compile(arch: Arch, out_dir: &Path) -> Result<()> {
    let version = source_version()?;
    let work = cache_dir().join("kernel");
    let src = work.join(format!("src-{version}"));
    let obj = work.join(match arch {
        Arch::X86_64 => "obj",
        Arch::Aarch64 => "obj-aarch64",
    });
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
        c.args(arch.make_vars());
        c.args(args);
        c
    };
    let fragment = arch.fragment();
    step(&format!(
        "kernel: configuring (allnoconfig + {})",
        fragment.display()
    ));
    run(make(&["-s", "allnoconfig"]).stdout(Stdio::null()))?;
    let mut merge = Command::new(src.join("scripts/kconfig/merge_config.sh"));
    if arch == Arch::Aarch64 {
        merge.env("ARCH", "arm64");
        merge.env("CROSS_COMPILE", "aarch64-linux-gnu-");
    }
    run(merge
        .current_dir(&obj)
        .args(["-m", "-O"])
        .arg(&obj)
        .arg(obj.join(".config"))
        .arg(&fragment)
        .stdout(Stdio::null()))?;
    run(make(&["-s", "olddefconfig"]).stdout(Stdio::null()))?;
    verify_config(&fragment, &obj.join(".config"))?;

    step(&format!(
        "kernel: compiling {} with {} jobs (about 4 minutes on 2 cores)",
        arch.image().0,
        nproc()
    ));
    let mut child = make(&[&format!("-j{}", nproc()), arch.image().0])
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
    copy_atomic(&obj.join(arch.image().1), &out_dir.join(arch.image().0))?;
    copy_atomic(&obj.join(".config"), &out_dir.join("config"))?;
    Ok(())
}

/// Every `CONFIG_X=y` and `# CONFIG_X is not set` in the fragment must survive olddefconfig;
/// a silently dropped option is a guest that lacks a feature we think it has.
fn verify_config(fragment: &Path, config: &Path) -> Result<()> {
    let fragment = std::fs::read_to_string(fragment)?;
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
