//! The supermachine CLI on arm64, in the emulated arm64 host: `cargo xtask run --arch aarch64`
//! (the arm64 busybox image) and the CLI checks of `cargo xtask arm64-check` (run with its
//! streams and exit code, vCPUs, a detached VM with a published port and `exec`, bake and
//! restore, clones that differ, an x86 kernel refused).
//!
//! Everything is cross-built here (static, `aarch64-unknown-linux-musl`, linked and C parts
//! compiled by `gcc-aarch64-linux-gnu`) and runs there over the shared directories.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::kernel::Arch;
use crate::testhost::Options;
use crate::util::{run, step, target_dir, write_atomic};

const MUSL: &str = "aarch64-unknown-linux-musl";

/// What the arm64 CLI needs: the kernel, the initramfs, the busybox image and the CLI itself.
struct Prepared {
    kernel: PathBuf,
    initramfs: PathBuf,
    image: PathBuf,
    cli: PathBuf,
}

fn prepare() -> Result<Prepared> {
    let kernel = crate::kernel::build_for(Arch::Aarch64)?;
    let initramfs = crate::initramfs::build_for(Arch::Aarch64)?;
    let image = crate::images::busybox_arm64()?;
    step("arm64: building the supermachine CLI for aarch64-unknown-linux-musl");
    run(crate::util::cargo()
        .args(["build", "--release", "-p", "supermachine-cli", "--bin"])
        .arg("supermachine")
        .args(["--target", MUSL])
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        // ring and zstd compile C for the target.
        .env("CC_aarch64_unknown_linux_musl", "aarch64-linux-gnu-gcc")
        .env("AR_aarch64_unknown_linux_musl", "aarch64-linux-gnu-ar"))?;
    let cli = target_dir().join(MUSL).join("release").join("supermachine");
    Ok(Prepared {
        kernel,
        initramfs,
        image,
        cli,
    })
}

/// The environment every arm64 command runs with: a private home, store and registry under the
/// emulated host's fresh `/tmp`, and the arm64 guest files.
fn prelude(p: &Prepared) -> String {
    format!(
        "export HOME=/tmp/sm-home XDG_RUNTIME_DIR=/tmp/sm-run\n\
         export SUPERMACHINE_KERNEL={} SUPERMACHINE_INITRAMFS={}\n\
         mkdir -p \"$HOME\"; mkdir -m 700 -p \"$XDG_RUNTIME_DIR\"\n\
         SM={}\nIMG=oci:{}:latest\n",
        p.kernel.display(),
        p.initramfs.display(),
        p.cli.display(),
        p.image.display(),
    )
}

fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// `cargo xtask run --arch aarch64 [RUN-FLAGS] -- COMMAND…`: the arm64 busybox image run by the
/// arm64 CLI in the emulated arm64 host; returns the run's exit status.
pub fn run_image(flags: &[String], command: &[String]) -> Result<i32> {
    let p = prepare()?;
    let words = |ws: &[String]| ws.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ");
    let script = format!(
        "{}\"$SM\" run {} \"$IMG\" {}\n",
        prelude(&p),
        words(flags),
        words(command)
    );
    let path = target_dir().join("arm64-run.sh");
    write_atomic(&path, script.as_bytes())?;
    crate::testhost_arm64::run_command(
        &["sh".into(), path.to_string_lossy().into_owned()],
        &options(),
    )
}

fn options() -> Options {
    Options {
        cpus: 2,
        memory_mib: 2048,
        ..Default::default()
    }
}

/// The checks, as a busybox shell script: each prints `arm64-cli ok: WHAT` or
/// `arm64-cli FAIL: WHAT`.
const CHECKS: &str = r#"
fails=0
check() { what=$1; shift; if "$@"; then echo "arm64-cli ok: $what"; else echo "arm64-cli FAIL: $what"; fails=$((fails+1)); fi; }
not() { ! "$@"; }

# run: the command's stdout and stderr apart, its exit code.
"$SM" run "$IMG" -- sh -c 'uname -m; echo to-stderr >&2; exit 5' >/tmp/out 2>/tmp/err; rc=$?
check "run: exit code 5 (got $rc)" [ "$rc" = 5 ]
check "run: stdout" grep -qx aarch64 /tmp/out
check "run: stderr" grep -qx to-stderr /tmp/err
check "run: stderr kept out of stdout" not grep -q to-stderr /tmp/out

# vCPUs.
n=$("$SM" run --cpus 2 "$IMG" -- nproc 2>/dev/null)
check "run --cpus 2: the guest sees 2 (got $n)" [ "$n" = 2 ]

# A shared directory (virtio-fs) both ways, and the default user-mode network's address.
mkdir -p /tmp/share; echo from-host > /tmp/share/in
"$SM" run -v /tmp/share:/mnt "$IMG" -- sh -c 'cat /mnt/in; echo from-guest > /mnt/out' >/tmp/out 2>&1
check "-v: the guest reads the host's file" grep -qx from-host /tmp/out
check "-v: the host reads the guest's file" grep -qx from-guest /tmp/share/out
"$SM" run "$IMG" -- ip -4 addr show eth0 >/tmp/out 2>&1
check "the default network: eth0 is 10.0.2.15" grep -q 'inet 10.0.2.15/24' /tmp/out

# A detached server behind a published port; exec into it.
SERVER='mkdir -p /www && echo served > /www/index.html && exec httpd -f -p 8080 -h /www'
serve() {
  "$SM" run -d --name "$1" -p "127.0.0.1:$2:8080" "$IMG" sh -c "$SERVER" >/dev/null
  i=0; rm -f /tmp/page
  while [ $i -lt 60 ] && ! wget -q -O /tmp/page "http://127.0.0.1:$2/" 2>/dev/null; do
    sleep 1; i=$((i+1))
  done
  check "$3: the published port serves" grep -qx served /tmp/page
  "$SM" exec "$1" sh -c 'exit 6'; rc=$?
  check "$3: exec exit code 6 (got $rc)" [ "$rc" = 6 ]
  check "$3: exec output" [ "$("$SM" exec "$1" uname -m)" = aarch64 ]
}
serve web 18080 "run -d"
filtered() {
  for s in /proc/[0-9]*/status; do
    grep -q '^Name:.*supermachine' "$s" && grep -q '^Seccomp:[[:space:]]*2' "$s" && return 0
  done
  return 1
}
check "the detached VMM runs under its system-call filter" filtered
"$SM" stop web >/dev/null

# Bake the server (ready once it answers; the ready command leaves a mark in the snapshot),
# then two restored clones: each serves, has the mark, and draws its own random bytes.
"$SM" bake --ready-cmd 'wget -q -O /dev/null http://127.0.0.1:8080/ && echo from-bake > /dev/shm/baked' \
  "$IMG" sh -c "$SERVER" >/dev/null 2>/tmp/err; rc=$?
check "bake (status $rc: $(tail -1 /tmp/err))" [ "$rc" = 0 ]
serve clone1 18081 "restored clone 1"
serve clone2 18082 "restored clone 2"
for c in clone1 clone2; do
  check "$c: restored from the bake, not booted" [ "$("$SM" exec $c cat /dev/shm/baked)" = from-bake ]
done
a=$("$SM" exec clone1 od -An -tx1 -N16 /dev/urandom); b=$("$SM" exec clone2 od -An -tx1 -N16 /dev/urandom)
check "the clones differ in entropy ($a / $b)" [ -n "$a" -a "$a" != "$b" ]
"$SM" stop clone1 clone2 >/dev/null

# An x86 kernel is refused by name.
SUPERMACHINE_KERNEL=/bin/busybox "$SM" run "$IMG" -- true 2>/tmp/err; rc=$?
check "a non-arm64 kernel is refused (status $rc: $(tail -1 /tmp/err))" grep -q 'not an arm64 kernel Image' /tmp/err

echo "arm64-cli failures: $fails"
"#;

/// Runs the CLI checks in the emulated arm64 host; fails with the checks that failed.
pub fn check_cli() -> Result<()> {
    let p = prepare()?;
    step(
        "arm64: the supermachine CLI in the emulated arm64 host (run, -d -p + exec, bake, restore)",
    );
    let path = target_dir().join("arm64-cli-checks.sh");
    write_atomic(&path, format!("{}{CHECKS}", prelude(&p)).as_bytes())?;
    let (code, lines) = crate::testhost_arm64::run_command_lines(
        &["sh".into(), path.to_string_lossy().into_owned()],
        &options(),
    )?;
    let failed: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.trim().strip_prefix("arm64-cli FAIL: "))
        .collect();
    let passed = lines
        .iter()
        .filter(|l| l.trim().starts_with("arm64-cli ok: "))
        .count();
    let finished = lines.iter().any(|l| l.trim() == "arm64-cli failures: 0");
    if !failed.is_empty() || !finished || code != 0 {
        bail!(
            "the arm64 CLI checks failed (status {code}, {passed} passed): {}",
            if failed.is_empty() {
                "the script did not finish".to_string()
            } else {
                failed.join("; ")
            }
        );
    }
    eprintln!("arm64: {passed} CLI checks passed");
    Ok(())
}

/// The words of `cargo xtask run` split at `--arch`: the architecture (x86-64 unless given)
/// and the rest.
pub fn take_arch(flags: &[String]) -> Result<(Arch, Vec<String>)> {
    let mut arch = Arch::X86_64;
    let mut rest = Vec::new();
    let mut words = flags.iter();
    while let Some(w) = words.next() {
        if w == "--arch" {
            let Some(name) = words.next() else {
                bail!("--arch needs a value (x86_64 or aarch64)");
            };
            arch = Arch::parse(name)?;
        } else if let Some(name) = w.strip_prefix("--arch=") {
            arch = Arch::parse(name)?;
        } else {
            rest.push(w.clone());
        }
    }
    Ok((arch, rest))
}
