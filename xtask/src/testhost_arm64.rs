//! The emulated arm64 test host: `qemu-system-aarch64 -M virt,virtualization=on,gic-version=3
//! -cpu max` (TCG) running Debian's arm64 kernel, which brings KVM up in VHE mode there, so a
//! command run in it sees a `/dev/kvm` that runs arm64 guests.
//!
//! Unlike the x86 test host, this machine's programs cannot run inside (another
//! architecture): the emulated machine's userland is Debian's static arm64 busybox, and the
//! command is a busybox shell line or a static aarch64 program. This machine's directories
//! (`/work`, `/root`, `/var`, `/home`, `/opt`, `/srv` and the top-level directories of the
//! checkout and of the command's directory) are shared over 9p at their own paths, so paths mean
//! the same inside; `/tmp` is a fresh tmpfs holding only the paths the command needs from the
//! host's (a checkout under `/tmp`). Cached under
//! `~/.cache/supermachine/testhost-arm64`; `cargo xtask testhost --arch aarch64 -- CMD`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use guest_init::newc::Writer;

use crate::testhost::{
    command_script, fetch_package, kept_paths, kernel_package_of, module_order_of, package_kernel,
    read_console, Console, Options,
};
use crate::util::{cache_dir, have_command, output, run, step, write_atomic};

/// Modules the L1 initramfs loads (with their dependencies): the virtio-mmio transport of
/// QEMU's `virt` machine and the 9p filesystem that shares this machine's files. KVM is built
/// into Debian's arm64 kernel.
const MODULES: &[&str] = &["virtio_mmio", "9pnet_virtio", "9p"];

/// The host directories always shared at their own paths; the top-level directories of the
/// command's working directory, the workspace and the target directory join them per command
/// (a checkout at `/check/…` in CI).
const SHARED: &[&str] = &["work", "root", "var", "home", "opt", "srv"];

/// Top-level directories that are the emulated machine's own, never shared.
const OWN: &[&str] = &[
    "bin", "dev", "host", "mods", "proc", "sys", "tmp", "run", "",
];

const L1_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
ip link set lo up
for m in $(cat /mods/order); do insmod /mods/$m 2>/dev/null; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=loose hostroot /host || { echo "testhost: 9p mount failed"; poweroff -f; }
cmd=$(sed -n 's/.*sm_cmd=\([^ ]*\).*/\1/p' /proc/cmdline)
for d in $(cat "/host${cmd%.sh}.shared"); do
  [ -d "/host/$d" ] || continue
  mkdir -p "/$d"; mount --bind "/host/$d" "/$d"
done
# A fresh /tmp (sockets do not work on 9p), with the paths the command needs from the host's
# (a checkout under /tmp) bound in: the `.keep` file lists them.
mount -t tmpfs tmpfs /tmp
while IFS= read -r p; do
  [ -d "/host$p" ] || continue
  mkdir -p "$p"; mount --bind "/host$p" "$p"
done < "${cmd%.sh}.keep"
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts 2>/dev/null
[ -c /dev/kvm ] || echo "testhost: no /dev/kvm in the emulated arm64 machine"
echo supermachine-testhost-start
sh "$cmd" < /dev/null; rc=$?
echo "supermachine-testhost-exit=$rc"
poweroff -f
"#;

fn dir() -> PathBuf {
    cache_dir().join("testhost-arm64")
}

/// Debian's arm64 architecture, its package index and QEMU's arm64 emulator.
fn ensure_tools() -> Result<()> {
    let foreign = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    let mut updated = false;
    if !foreign.lines().any(|a| a.trim() == "arm64") {
        step("testhost (arm64): adding Debian's arm64 architecture");
        run(Command::new("dpkg").args(["--add-architecture", "arm64"]))?;
        run(Command::new("apt-get").args(["update", "-q"]))?;
        updated = true;
    }
    if !have_command("qemu-system-aarch64") {
        step("testhost (arm64): installing qemu-system-arm");
        if !updated {
            run(Command::new("apt-get").args(["update", "-q"]))?;
        }
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "qemu-system-arm"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// Debian's arm64 kernel (an uncompressed `Image`) and its modules, once.
fn ensure_kernel() -> Result<(PathBuf, PathBuf)> {
    let d = dir();
    let pkg = d.join("pkg");
    let image = d.join("Image");
    if image.is_file() && pkg.join("lib/modules").is_dir() {
        return Ok((image, pkg));
    }
    step("testhost (arm64): fetching Debian's arm64 kernel");
    std::fs::create_dir_all(&d)?;
    let deps = output(Command::new("apt-cache").args(["depends", "linux-image-arm64:arm64"]))?;
    let name =
        kernel_package_of(&deps).context("cannot resolve linux-image-arm64's kernel package")?;
    if fetch_package(&format!("{name}-unsigned:arm64"), &d, &pkg).is_err() {
        fetch_package(&format!("{name}:arm64"), &d, &pkg)?;
    }
    write_atomic(&image, &std::fs::read(package_kernel(&pkg)?)?)?;
    Ok((image, pkg))
}

/// Debian's static arm64 busybox, once.
pub fn ensure_busybox() -> Result<PathBuf> {
    let busybox = dir().join("busybox");
    if busybox.is_file() {
        return Ok(busybox);
    }
    step("testhost (arm64): fetching Debian's static arm64 busybox");
    let pkg = dir().join("busybox-pkg");
    fetch_package("busybox-static:arm64", &dir(), &pkg)?;
    write_atomic(&busybox, &std::fs::read(pkg.join("bin/busybox"))?)?;
    let _ = std::fs::remove_dir_all(&pkg);
    Ok(busybox)
}

/// The L1 initramfs: busybox as every command, the init script, the modules (once per script,
/// module list and kernel package).
fn ensure_initrd(pkg: &Path, busybox: &Path) -> Result<PathBuf> {
    let hash = L1_INIT
        .bytes()
        .chain(MODULES.join(",").into_bytes())
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
    let initrd = dir().join(format!("initrd-{hash:016x}.cpio"));
    if initrd.is_file() {
        return Ok(initrd);
    }
    let modules_dir = std::fs::read_dir(pkg.join("lib/modules"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .next()
        .context("the arm64 kernel package has no modules")?;
    let order = module_order_of(&modules_dir, MODULES)?;
    let mut w = Writer::new(Vec::new());
    for d in ["bin", "proc", "sys", "dev", "host", "mods", "tmp"] {
        w.directory(d, 0o755)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.file("bin/busybox", 0o755, &std::fs::read(busybox)?)?;
    let mut names = String::new();
    for path in &order {
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        w.file(&format!("mods/{file}"), 0o644, &std::fs::read(path)?)?;
        names.push_str(&file);
        names.push('\n');
    }
    w.file("mods/order", 0o644, names.as_bytes())?;
    w.file("init", 0o755, L1_INIT.as_bytes())?;
    write_atomic(&initrd, &w.finish()?)?;
    Ok(initrd)
}

/// The host's top-level directories the emulated machine mounts at their own paths: [`SHARED`]
/// and the first component of each of `paths` (absolute), but never the machine's own.
fn shared_dirs(paths: &[PathBuf]) -> Vec<String> {
    let mut dirs: Vec<String> = SHARED.iter().map(|d| d.to_string()).collect();
    for path in paths {
        let path = path.canonicalize().unwrap_or_else(|_| path.clone());
        let Some(std::path::Component::Normal(top)) = path.components().nth(1) else {
            continue;
        };
        let top = top.to_string_lossy().into_owned();
        let plain = !top.contains(char::is_whitespace);
        if plain && !OWN.contains(&top.as_str()) && !dirs.contains(&top) {
            dirs.push(top);
        }
    }
    dirs
}

/// QEMU's arm64 `machine` (`virt,…`) with `cpus` CPUs of the newest model, `memory_mib`,
/// `image` booted with `initrd` and `append`, the serial line on stdout and nothing else.
fn virt_machine(
    machine: &str,
    cpus: usize,
    memory_mib: u32,
    image: &Path,
    initrd: &Path,
    append: &str,
) -> Command {
    let mut qemu = Command::new("qemu-system-aarch64");
    qemu.args(["-M", machine, "-cpu", "max"])
        .args(["-smp", &cpus.to_string(), "-m", &memory_mib.to_string()])
        .args(["-nographic", "-no-reboot", "-nodefaults"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(image)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append]);
    qemu
}

/// Runs `command` in the emulated arm64 machine; returns its exit status.
pub fn run_command(command: &[String], opts: &Options) -> Result<i32> {
    run_command_lines(command, opts).map(|(code, _)| code)
}

/// [`run_command`], also returning the lines the command printed.
pub fn run_command_lines(command: &[String], opts: &Options) -> Result<(i32, Vec<String>)> {
    if command.is_empty() {
        bail!("testhost: no command given");
    }
    ensure_tools()?;
    let (image, pkg) = ensure_kernel()?;
    let busybox = ensure_busybox()?;
    let initrd = ensure_initrd(&pkg, &busybox)?;

    let scripts = PathBuf::from("/var/tmp/supermachine-testhost");
    std::fs::create_dir_all(&scripts)?;
    let script = scripts.join(format!("arm64-cmd-{}.sh", std::process::id()));
    let text = command_script(
        &opts.cwd,
        |k| matches!(k, "HOME" | "TERM" | "CI") || k.starts_with("SUPERMACHINE_"),
        "",
        command,
    );
    write_atomic(&script, text.as_bytes())?;
    let keep: String = kept_paths(&[
        opts.cwd.clone(),
        crate::util::workspace_root(),
        crate::util::target_dir(),
    ])
    .iter()
    .filter(|p| p.starts_with("/tmp"))
    .map(|p| format!("{}\n", p.display()))
    .collect();
    write_atomic(&script.with_extension("keep"), keep.as_bytes())?;
    let shared = shared_dirs(&[
        opts.cwd.clone(),
        crate::util::workspace_root(),
        crate::util::target_dir(),
    ]);
    write_atomic(
        &script.with_extension("shared"),
        shared.join("\n").as_bytes(),
    )?;

    let loglevel = std::env::var("SUPERMACHINE_TESTHOST_LOGLEVEL").unwrap_or_else(|_| "1".into());
    let append = format!(
        "console=ttyAMA0 loglevel={loglevel} panic=-1 sm_cmd={} {}",
        script.display(),
        opts.kernel_args
    );
    let mut child = virt_machine(
        "virt,virtualization=on,gic-version=3",
        opts.cpus,
        opts.memory_mib,
        &image,
        &initrd,
        append.trim_end(),
    )
    .args(["-accel", "tcg,thread=multi"])
    .args([
        "-fsdev",
        "local,id=hostfs,path=/,security_model=none,multidevs=remap",
        "-device",
        "virtio-9p-device,fsdev=hostfs,mount_tag=hostroot",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .spawn()
    .context("cannot start qemu-system-aarch64 (apt-get install qemu-system-arm)")?;
    let stdout = child.stdout.take().context("no qemu stdout")?;
    let Console {
        exit,
        tail,
        printed,
    } = read_console(stdout, |_| true);
    let _ = child.wait();
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(script.with_extension("keep"));
    let _ = std::fs::remove_file(script.with_extension("shared"));
    match exit {
        Some(code) => Ok((code, printed)),
        None => {
            eprintln!("testhost (arm64): the emulated machine ended without the command's status; its console:");
            for l in &tail {
                eprintln!("  {l}");
            }
            Ok((crate::testhost::CRASHED, printed))
        }
    }
}

const KERNEL_OK: &str = "supermachine-arm64-guest-kernel-ok";

/// Boots the arm64 guest kernel `image` directly under QEMU's `virt` machine (TCG, 2 CPUs:
/// PSCI, the GICv3, the architected timer, a PL011 console) with a busybox initramfs whose init
/// prints a marker and the CPU count and powers off: proof the recipe makes a kernel that boots
/// to userspace on arm64, before any VMM of ours runs it.
pub fn check_guest_kernel(image: &Path) -> Result<()> {
    ensure_tools()?;
    let busybox = ensure_busybox()?;
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nmount -t proc proc /proc\n\
         echo \"{KERNEL_OK} $(uname -m) $(nproc)\"\npoweroff -f\n"
    );
    let initrd = test_initramfs(
        &format!("arm64-kernel-check-{}.cpio", std::process::id()),
        &busybox,
        init.as_bytes(),
        &[],
    )?;
    let mut child = virt_machine(
        "virt,gic-version=3",
        2,
        256,
        image,
        &initrd,
        "console=ttyAMA0 panic=-1 quiet",
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .spawn()
    .context("cannot start qemu-system-aarch64")?;
    let stdout = child.stdout.take().context("no qemu stdout")?;
    let pid = child.id();
    // A kernel that hangs must fail the check, not the run.
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if finished.recv_timeout(std::time::Duration::from_secs(180))
            == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        {
            // SAFETY: signalling our own QEMU child, which is reaped only after `done` is sent
            // (so its pid cannot belong to another process yet).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    });
    let mut lines = Vec::new();
    let mut ok = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
        if let Some(rest) = line.trim().strip_prefix(KERNEL_OK) {
            ok = Some(rest.trim().to_string());
        }
        lines.push(line);
        if lines.len() > 60 {
            lines.remove(0);
        }
    }
    let _ = done.send(());
    let _ = child.wait();
    let _ = std::fs::remove_file(&initrd);
    match ok {
        Some(what) if what == "aarch64 2" => {
            eprintln!("kernel: the arm64 guest kernel boots to init on 2 CPUs");
            Ok(())
        }
        _ => {
            for l in &lines {
                eprintln!("  {l}");
            }
            bail!("the arm64 guest kernel did not boot to init under QEMU (its console above)")
        }
    }
}

const GUEST_OK: &str = "supermachine-arm64-guest";
/// The status the busybox test guest reports through the exit register.
const GUEST_STATUS: i32 = 42;
/// The status guest-init's test command exits with.
const INIT_STATUS: i32 = 7;
const MUSL: &str = "aarch64-unknown-linux-musl";

/// Builds a static arm64 program of the workspace with `cargo build ARGS --target
/// aarch64-unknown-linux-musl` (linked by `aarch64-linux-gnu-gcc`); `release` picks the profile
/// directory it lands in.
fn build_arm64(args: &[&str], release: bool, name: &str) -> Result<PathBuf> {
    run(crate::util::cargo()
        .arg("build")
        .args(args)
        .args(["--target", MUSL])
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER",
            "aarch64-linux-gnu-gcc",
        ))?;
    Ok(crate::util::target_dir()
        .join(MUSL)
        .join(if release { "release" } else { "debug" })
        .join(name))
}

/// Builds the guest programs (`guest-init`, `sm-blkbench`, `sm-netbench`) static for arm64;
/// returns the directory they are in.
pub fn guest_binaries() -> Result<PathBuf> {
    step("initramfs (arm64): building guest-init, sm-blkbench and sm-netbench (static, musl)");
    let init = build_arm64(
        &["--release", "-p", "guest-init", "--bins"],
        true,
        "guest-init",
    )?;
    Ok(init.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// A test initramfs: busybox (also as `/bin/sh`), `/init`, and `extra` files (path, mode,
/// bytes), written under the target directory as `name` (shared with the emulated host).
fn test_initramfs(
    name: &str,
    busybox: &Path,
    init: &[u8],
    extra: &[(&str, &[u8])],
) -> Result<PathBuf> {
    let mut w = Writer::new(Vec::new());
    for d in ["bin", "proc", "dev", "sys", "tmp"] {
        w.directory(d, 0o755)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.file("bin/busybox", 0o755, &std::fs::read(busybox)?)?;
    w.symlink("bin/sh", "busybox")?;
    w.file("init", 0o755, init)?;
    for (path, bytes) in extra {
        w.file(path, 0o755, bytes)?;
    }
    let initrd = crate::util::target_dir().join(name);
    write_atomic(&initrd, &w.finish()?)?;
    Ok(initrd)
}

/// Runs `boot IMAGE INITRD ARGS…` in the emulated arm64 host and checks the guest printed
/// `line` and ended with `status`.
fn boot_and_expect(
    boot: &Path,
    image: &Path,
    initrd: &Path,
    args: &[&str],
    line: &str,
    status: i32,
) -> Result<()> {
    let mut command = vec![
        boot.to_string_lossy().into_owned(),
        image.to_string_lossy().into_owned(),
        initrd.to_string_lossy().into_owned(),
    ];
    command.extend(args.iter().map(|a| a.to_string()));
    let (code, lines) = run_command_lines(
        &command,
        &Options {
            cpus: 2,
            memory_mib: 2048,
            ..Default::default()
        },
    )?;
    let saw = lines.iter().any(|l| l.trim() == line);
    if code != status || !saw {
        bail!(
            "the arm64 guest did not run as expected under our VMM (status {code}, want {status}; \
             its line {line:?} {})",
            if saw { "came" } else { "did not come" }
        );
    }
    Ok(())
}

/// Boots the arm64 guest kernel `image` under our VMM (the machine layer's `boot` example,
/// built static for arm64) on KVM in the emulated arm64 host, with 2 vCPUs: first with a
/// busybox init that prints the machine it sees and reports status 42 through the VMM's exit
/// register, then with `guest-init` as PID 1 running a command whose status (7) it reports.
/// The arm64 backend, device tree, GIC, UART and exit path end to end.
pub fn check_vmm_boot(image: &Path) -> Result<()> {
    step("arm64: building the machine layer's boot example for aarch64-unknown-linux-musl");
    let boot = build_arm64(
        &[
            "-p",
            "vmm",
            "--example",
            "boot",
            "--no-default-features",
            "--features",
            "kvm",
        ],
        false,
        "examples/boot",
    )?;
    let busybox = ensure_busybox()?;
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc; mount -t devtmpfs dev /dev\n\
         echo \"{GUEST_OK} $(uname -m) $(nproc)\"\n\
         devmem {:#x} 32 {GUEST_STATUS}\npoweroff -f\n",
        vmm_core::arch::aarch64::layout::EXIT_STATUS_ADDR
    );
    let initrd = test_initramfs("arm64-check-initramfs.cpio", &busybox, init.as_bytes(), &[])?;
    boot_and_expect(
        &boot,
        image,
        &initrd,
        &["--cpus", "2", "--memory", "256", "--", "quiet"],
        &format!("{GUEST_OK} aarch64 2"),
        GUEST_STATUS,
    )?;
    eprintln!("arm64: our VMM booted the arm64 guest on 2 vCPUs and got its status {GUEST_STATUS}");

    step("arm64: guest-init as PID 1 runs a command and reports its status");
    let guest_init = build_arm64(
        &["--release", "-p", "guest-init", "--bin", "guest-init"],
        true,
        "guest-init",
    )?;
    let script = format!(
        "#!/bin/sh\necho \"{GUEST_OK} init $(/bin/busybox uname -m)\"\nexit {INIT_STATUS}\n"
    );
    let initrd = test_initramfs(
        "arm64-check-guest-init.cpio",
        &busybox,
        &std::fs::read(&guest_init)?,
        &[("check.sh", script.as_bytes())],
    )?;
    boot_and_expect(
        &boot,
        image,
        &initrd,
        &["--", "quiet", "--", "/check.sh"],
        &format!("{GUEST_OK} init aarch64"),
        INIT_STATUS,
    )?;
    eprintln!("arm64: guest-init ran the command and reported its status {INIT_STATUS}");
    Ok(())
}
