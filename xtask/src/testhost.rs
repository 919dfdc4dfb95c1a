//! The emulated KVM test host: an x86-64 machine emulated by QEMU (TCG, `-cpu max`, which
//! includes AMD SVM with nested paging; XSAVE off, see below) running Debian's generic kernel with `kvm_amd`, so a
//! command run in it sees a standard `/dev/kvm` that boots Linux guests. This machine's whole
//! filesystem is shared over 9p, so freshly built binaries run there unchanged.
//!
//! Why: the build machines' `/dev/kvm` is a paravirtual KVM (`kvm_pvm`) that runs tiny guests
//! but fails on a stock Linux guest kernel; and CI services without nested virtualization need
//! the same. Cached under `~/.cache/supermachine/testhost`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use guest_init::newc::Writer;

use crate::util::{cache_dir, nproc, output, run, step, write_atomic};

// Why `xsave=off`: TCG's SVM does not make the nested KVM see a guest's XSETBV, so KVM never
// updates CPUID 0xD's size for the guest's XCR0; the guest kernel then warns "XSAVE consistency
// problem" and sizes its XSAVE buffers too small, which corrupts memory (seen as random triple
// faults under load). Without XSAVE in the emulated CPU, guests use FXSAVE and all is consistent.
// Real hardware does not have this defect; the VMM passes KVM's CPUID through unchanged.
const CPU: &str = "max,xsave=off";
const START_MARKER: &str = "supermachine-testhost-start";
const EXIT_MARKER: &str = "supermachine-testhost-exit=";
/// Modules the L1 initramfs loads, with their dependencies first.
const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "kvm-amd",
    "virtio_net",
    "tun",
];

pub struct Options {
    pub memory_mib: u32,
    pub cpus: usize,
    pub cwd: PathBuf,
    /// Kill the emulated machine when it prints nothing for this long (it has stopped
    /// responding); `run_command` then returns [`WEDGED`].
    pub silence_limit: Option<std::time::Duration>,
    /// Extra parameters for the emulated machine's kernel.
    pub kernel_args: &'static str,
}

/// What `run_command` returns when the emulated machine stopped responding and was killed.
pub const WEDGED: i32 = -1;

/// What `run_command` returns when the emulated machine ended before the command did (its
/// kernel panicked or it reset).
pub const CRASHED: i32 = -2;

impl Default for Options {
    fn default() -> Self {
        Options {
            memory_mib: 4096,
            cpus: nproc(),
            cwd: std::env::current_dir().unwrap_or_else(|_| "/".into()),
            silence_limit: None,
            kernel_args: "",
        }
    }
}

fn dir() -> PathBuf {
    cache_dir().join("testhost")
}

/// Downloads Debian's generic kernel package and unpacks it (once).
fn ensure_kernel() -> Result<(PathBuf, PathBuf)> {
    let d = dir();
    let pkg = d.join("pkg");
    let vmlinuz = d.join("vmlinuz");
    if vmlinuz.is_file() && pkg.join("lib/modules").is_dir() {
        return Ok((vmlinuz, pkg));
    }
    step("testhost: fetching Debian's generic amd64 kernel (with kvm_amd)");
    std::fs::create_dir_all(&d)?;
    let depends = || output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]));
    let mut deps = depends().unwrap_or_default();
    if !deps.contains("Depends: linux-image-") {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        deps = depends()?;
    }
    let image =
        kernel_package_of(&deps).context("cannot resolve linux-image-amd64's kernel package")?;
    if fetch_package(&format!("{image}-unsigned"), &d, &pkg).is_err() {
        fetch_package(&image, &d, &pkg)?;
    }
    write_atomic(&vmlinuz, &std::fs::read(package_kernel(&pkg)?)?)?;
    Ok((vmlinuz, pkg))
}

/// Module name as the kernel knows it (dashes and underscores are the same).
fn module_name(path: &Path) -> String {
    path.file_name()
        .map(|n| {
            n.to_string_lossy()
                .split(".ko")
                .next()
                .unwrap_or("")
                .replace('-', "_")
        })
        .unwrap_or_default()
}

/// The `depends=` list from a module's `.modinfo` section (the package ships no modules.dep).
fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

fn find_modules(dir: &Path, found: &mut HashMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            find_modules(&path, found)?;
        } else if path.to_string_lossy().ends_with(".ko") {
            found.insert(module_name(&path), path);
        }
    }
    Ok(())
}

/// Resolves the load order of [`MODULES`] and their dependencies.
fn module_order(modules_dir: &Path) -> Result<Vec<PathBuf>> {
    module_order_of(modules_dir, MODULES)
}

/// Resolves the load order of `modules` and their dependencies in a kernel package's
/// `lib/modules/VERSION` (modules built into the kernel are skipped).
pub fn module_order_of(modules_dir: &Path, modules: &[&str]) -> Result<Vec<PathBuf>> {
    let mut all = HashMap::new();
    find_modules(&modules_dir.join("kernel"), &mut all)?;
    fn add(name: &str, all: &HashMap<String, PathBuf>, order: &mut Vec<PathBuf>) -> Result<()> {
        let Some(path) = all.get(name) else {
            // Built into the kernel, or absent: nothing to load.
            return Ok(());
        };
        if order.contains(path) {
            return Ok(());
        }
        for dep in module_depends(&std::fs::read(path)?) {
            add(&dep, all, order)?;
        }
        order.push(path.clone());
        Ok(())
    }
    let mut order = Vec::new();
    for m in modules {
        add(&m.replace('-', "_"), &all, &mut order)?;
    }
    Ok(order)
}

const L1_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do
  case $m in
    # TCG's emulation of virtual GIF can keep the emulated CPU in a nested guest with host
    # interrupts held off (soft lockups that never end): KVM then uses STGI/CLGI instead.
    kvm-amd*|kvm_amd*) insmod /mods/$m vgif=0 2>/dev/null ;;
    *) insmod /mods/$m 2>/dev/null ;;
  esac
done
echo "testhost: kvm_amd vgif=$(cat /sys/module/kvm_amd/parameters/vgif 2>/dev/null)"
ip link set lo up
for n in $(ls /sys/class/net); do [ "$n" = lo ] && continue; ip link set "$n" up; ip addr add 10.0.2.15/24 dev "$n"; ip route add default via 10.0.2.2; break; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=loose hostroot /host || { echo "testhost: 9p mount failed"; poweroff -f; }
for d in proc sys dev; do mount --bind /$d /host/$d; done
cmd=$(sed -n 's/.*sm_cmd=\([^ ]*\).*/\1/p' /proc/cmdline)
# Fresh /run and /tmp (sockets do not work on 9p), except the paths the command needs from
# them (a checkout under /tmp), carried over by bind mounts: the `.keep` file lists them.
n=0
while IFS= read -r p; do
  [ -d "/host$p" ] || continue
  n=$((n+1)); mkdir -p "/keep/$n"; mount --bind "/host$p" "/keep/$n"
done < "/host${cmd%.sh}.keep"
mount -t tmpfs tmpfs /host/run 2>/dev/null
mount -t tmpfs tmpfs /host/tmp 2>/dev/null
n=0
while IFS= read -r p; do
  [ -d "/keep/$((n+1))" ] || continue
  n=$((n+1)); mkdir -p "/host$p"; mount --move "/keep/$n" "/host$p"
done < "/host${cmd%.sh}.keep"
mkdir -p /host/dev/pts; mount -t devpts -o newinstance,ptmxmode=0666 devpts /host/dev/pts 2>/dev/null; ln -sf pts/ptmx /host/dev/ptmx 2>/dev/null
[ -c /dev/kvm ] || echo "testhost: no /dev/kvm in the emulated machine (kvm_amd did not load)"
echo supermachine-testhost-start
sh=/bin/bash; [ -x /host/bin/bash ] || sh=/bin/sh
chroot /host $sh "$cmd" < /dev/null; rc=$?
echo "supermachine-testhost-exit=$rc"
poweroff -f
"#;

/// Builds the L1 initramfs (once per kernel package).
fn ensure_initrd(pkg: &Path) -> Result<PathBuf> {
    // Named by the init script's content and the module list, so a change to either gets a
    // new initrd.
    let script_hash = L1_INIT
        .bytes()
        .chain(MODULES.join(",").into_bytes())
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
    let initrd = dir().join(format!("initrd-{script_hash:016x}.cpio"));
    if initrd.is_file() {
        return Ok(initrd);
    }
    let modules_dir = std::fs::read_dir(pkg.join("lib/modules"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .next()
        .context("the kernel package has no modules")?;
    let order = module_order(&modules_dir)?;
    let busybox = std::fs::read("/bin/busybox").context("testhost needs busybox-static")?;
    let mut w = Writer::new(Vec::new());
    for d in ["bin", "proc", "sys", "dev", "host", "mods"] {
        w.directory(d, 0o755)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.file("bin/busybox", 0o755, &busybox)?;
    for applet in [
        "sh", "mount", "insmod", "mkdir", "chroot", "cat", "echo", "poweroff", "ip", "ls", "sed",
    ] {
        w.symlink(&format!("bin/{applet}"), "busybox")?;
    }
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

/// The directories among `paths` (or holding them) that lie under `/tmp` or `/run`, which
/// the emulated host covers with fresh tmpfs mounts: they are carried over. Outermost first,
/// none inside another.
pub fn kept_paths(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut kept: Vec<PathBuf> = Vec::new();
    for path in paths {
        let dir = if path.is_dir() {
            path.clone()
        } else {
            match path.parent() {
                Some(p) => p.to_path_buf(),
                None => continue,
            }
        };
        let dir = dir.canonicalize().unwrap_or(dir);
        let under_tmpfs = ["/tmp", "/run"]
            .iter()
            .any(|t| dir.starts_with(t) && dir != Path::new(t));
        // Paths with a newline cannot be listed one per line; they stay uncovered.
        if !under_tmpfs || dir.to_string_lossy().contains('\n') {
            continue;
        }
        if kept.iter().any(|k| dir.starts_with(k)) {
            continue;
        }
        kept.retain(|k| !k.starts_with(&dir));
        kept.push(dir);
    }
    kept.sort_by_key(|p| p.components().count());
    kept
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=:,+@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The shell script an emulated host runs: into `cwd` (125 if it is not there), the
/// environment variables `passed` selects, `prelude`, then `command` quoted.
pub fn command_script(
    cwd: &Path,
    passed: impl Fn(&str) -> bool,
    prelude: &str,
    command: &[String],
) -> String {
    let mut text = format!("cd {} || exit 125\n", shell_quote(&cwd.to_string_lossy()));
    for (k, v) in std::env::vars() {
        if passed(&k) {
            text.push_str(&format!("export {k}={}\n", shell_quote(&v)));
        }
    }
    text.push_str(prelude);
    text.push_str(
        &command
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" "),
    );
    text.push('\n');
    text
}

/// Runs `command` in the emulated host; returns its exit status.
pub fn run_command(command: &[String], opts: &Options) -> Result<i32> {
    run_command_lines(command, opts).map(|(code, _)| code)
}

/// [`run_command`], also returning the lines the command printed.
pub fn run_command_lines(command: &[String], opts: &Options) -> Result<(i32, Vec<String>)> {
    if command.is_empty() {
        bail!("testhost: no command given");
    }
    let (vmlinuz, pkg) = ensure_kernel()?;
    let initrd = ensure_initrd(&pkg)?;

    // The command's script, on the shared filesystem.
    let scripts = PathBuf::from("/var/tmp/supermachine-testhost");
    std::fs::create_dir_all(&scripts)?;
    let script = scripts.join(format!("cmd-{}.sh", std::process::id()));
    // See `hold_kvm`: before the command creates any VM of its own, and with the other CPUs
    // offline, so that creating it patches the scheduler while no other CPU runs it.
    let xtask = std::env::current_exe()?;
    let hold_kvm = format!(
        "if [ -c /dev/kvm ]; then\n\
         \x20 off=; for c in /sys/devices/system/cpu/cpu[0-9]*/online; do\n\
         \x20   [ \"$(cat $c 2>/dev/null)\" = 1 ] && echo 0 > $c 2>/dev/null && off=\"$off $c\"\n\
         \x20 done\n\
         \x20 {} hold-kvm || echo 'testhost: could not hold an idle VM'\n\
         \x20 for c in $off; do echo 1 > $c; done\n\
         fi\n",
        shell_quote(&xtask.to_string_lossy())
    );
    let text = command_script(
        &opts.cwd,
        |k| {
            matches!(k, "HOME" | "PATH" | "TERM" | "CI")
                || k.starts_with("SUPERMACHINE_")
                || k.starts_with("RUST_")
                || k.starts_with("CARGO")
        },
        &hold_kvm,
        command,
    );
    write_atomic(&script, text.as_bytes())?;
    let keep: String = kept_paths(&[
        opts.cwd.clone(),
        crate::util::workspace_root(),
        crate::util::target_dir(),
        xtask.clone(),
    ])
    .iter()
    .map(|p| format!("{}\n", p.display()))
    .collect();
    write_atomic(&script.with_extension("keep"), keep.as_bytes())?;

    // A monitor socket, so that a machine that stopped responding can be asked where its CPUs are.
    let monitor = scripts.join(format!("monitor-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&monitor);
    let loglevel = std::env::var("SUPERMACHINE_TESTHOST_LOGLEVEL").unwrap_or_else(|_| "1".into());
    let mut qemu = Command::new("qemu-system-x86_64");
    let cpu = std::env::var("SUPERMACHINE_TESTHOST_CPU").unwrap_or_else(|_| CPU.into());
    let accel =
        std::env::var("SUPERMACHINE_TESTHOST_ACCEL").unwrap_or_else(|_| "tcg,thread=multi".into());
    qemu.args(["-accel", &accel, "-cpu", &cpu])
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .args(["-smp", &opts.cpus.to_string(), "-m", &opts.memory_mib.to_string()])
        .args(["-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet loglevel={loglevel} panic=-1 {} sm_cmd={}{}",
            opts.kernel_args,
            script.display(),
            // Extra kernel parameters for the emulated host, for experiments.
            std::env::var("SUPERMACHINE_TESTHOST_APPEND")
                .map(|a| format!(" {a}"))
                .unwrap_or_default()
        ))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=passthrough,multidevs=remap,id=hostroot",
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = qemu
        .spawn()
        .context("cannot start qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let stdout = child.stdout.take().context("no qemu stdout")?;
    // Nested KVM under TCG occasionally stops making progress altogether: a watchdog ends
    // the machine after a long silence, and the caller decides what to do.
    let last_output = std::sync::Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
    let wedged = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(limit) = opts.silence_limit {
        let (last, wedged, pid) = (last_output.clone(), wedged.clone(), child.id());
        let monitor_for_watchdog = monitor.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            let quiet = last.lock().map(|t| t.elapsed()).unwrap_or_default();
            if quiet > limit {
                wedged.store(true, std::sync::atomic::Ordering::SeqCst);
                dump_cpus(&monitor_for_watchdog);
                // SAFETY: signalling our own QEMU child, which we have not reaped yet.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                return;
            }
        });
    }
    let console = read_console(stdout, |line| {
        // The emulated kernel reporting a CPU stuck (in practice: a nested vCPU thread that never
        // leaves KVM_RUN) is a machine that will not recover: end it now. Its periodic reports
        // must not count as progress either.
        // With one emulated CPU the same reports come from a machine that goes on (a long
        // stretch in the nested guest starves the watchdog thread: a 200-restore loop passed
        // after "CPU#0 stuck for 456s"), so there only the silence limit ends it.
        let stall_report =
            line.contains("soft lockup") || line.contains("rcu_preempt detected stalls");
        if stall_report && opts.cpus == 1 {
            // Not progress: the machine only reports that it stood still.
            eprintln!("testhost: {}", line.trim());
            return true;
        }
        if opts.silence_limit.is_some() && opts.cpus > 1 && stall_report {
            eprintln!("testhost: {}", line.trim());
            if !wedged.swap(true, std::sync::atomic::Ordering::SeqCst) {
                // Give the kernel a moment to print the stuck task's stack (with a higher
                // SUPERMACHINE_TESTHOST_LOGLEVEL), then record where every CPU is.
                std::thread::sleep(std::time::Duration::from_secs(3));
                dump_cpus(&monitor);
            }
            let _ = child.kill();
            return false;
        }
        if let Ok(mut t) = last_output.lock() {
            *t = std::time::Instant::now();
        }
        true
    });
    let Console {
        exit,
        printed,
        tail,
    } = console;
    let _ = child.wait();
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(script.with_extension("keep"));
    let _ = std::fs::remove_file(&monitor);
    if wedged.load(std::sync::atomic::Ordering::SeqCst) {
        eprintln!(
            "testhost: the emulated machine stopped making progress (a stuck CPU, or nothing \
             printed for {:?}): killed",
            opts.silence_limit.unwrap_or_default()
        );
        return Ok((WEDGED, printed));
    }
    match exit {
        Some(rc) => Ok((rc, printed)),
        None => {
            eprintln!(
                "testhost: the emulated machine ended without the command's status; its console:"
            );
            for l in tail {
                eprintln!("  {l}");
            }
            Ok((CRASHED, printed))
        }
    }
}

/// What an emulated host's console said.
pub struct Console {
    /// The command's exit status, if the machine got to report it.
    pub exit: Option<i32>,
    /// What the command printed.
    pub printed: Vec<String>,
    /// The last lines before the command started (the machine's boot), for errors.
    pub tail: Vec<String>,
}

/// Reads an emulated host's console until it closes: lines before the start marker are kept
/// (the last 40), the command's lines are printed as they come, the exit marker gives its
/// status. `inspect` sees every line first and swallows it by returning false.
pub fn read_console(stdout: impl std::io::Read, mut inspect: impl FnMut(&str) -> bool) -> Console {
    let mut console = Console {
        exit: None,
        printed: Vec::new(),
        tail: Vec::new(),
    };
    let mut started = false;
    let out = std::io::stdout();
    for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
        let line = String::from_utf8_lossy(&line).replace('\r', "");
        if !inspect(&line) {
            continue;
        }
        if let Some(rc) = line.trim().strip_prefix(EXIT_MARKER) {
            console.exit = rc.trim().parse::<i32>().ok();
            continue;
        }
        if line.trim_end().ends_with(START_MARKER) {
            started = true;
            continue;
        }
        if started {
            if line.contains("reboot: Power down") {
                continue;
            }
            let mut o = out.lock();
            let _ = writeln!(o, "{line}");
            let _ = o.flush();
            console.printed.push(line);
        } else {
            console.tail.push(line);
            if console.tail.len() > 40 {
                console.tail.remove(0);
            }
        }
    }
    console
}

/// Downloads Debian package `spec` (e.g. `busybox-static:arm64`) into `work` and unpacks it
/// into `into`, replacing what was there.
pub fn fetch_package(spec: &str, work: &Path, into: &Path) -> Result<()> {
    let dl = work.join("download");
    let _ = std::fs::remove_dir_all(&dl);
    std::fs::create_dir_all(&dl)?;
    let got = Command::new("apt-get")
        .args(["download", "-q", spec])
        .current_dir(&dl)
        .status()?
        .success();
    if !got {
        bail!("apt-get download {spec} failed");
    }
    let deb = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {spec} produced no .deb"))?;
    let _ = std::fs::remove_dir_all(into);
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(into))?;
    let _ = std::fs::remove_dir_all(&dl);
    Ok(())
}

/// The `/boot/vmlinuz-*` of an unpacked kernel package.
pub fn package_kernel(pkg: &Path) -> Result<PathBuf> {
    std::fs::read_dir(pkg.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("the kernel package has no /boot/vmlinuz-*")
}

/// The versioned kernel package a Debian meta-package (`linux-image-amd64`) depends on.
pub fn kernel_package_of(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|p| p.split(':').next().unwrap_or(p))
        .find(|p| {
            p.starts_with("linux-image-") && p.chars().nth(12).is_some_and(|c| c.is_ascii_digit())
        })
        .map(|p| p.trim_end_matches("-unsigned").to_string())
}

/// Prints where each CPU of a stuck emulated machine is (registers, the instructions at its
/// program counter), from QEMU's monitor: the evidence for telling a nested guest that never
/// exits from a host kernel that spins.
fn dump_cpus(monitor: &Path) {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let Ok(mut s) = UnixStream::connect(monitor) else {
        eprintln!("testhost: no monitor at {}", monitor.display());
        return;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(1500)));
    let mut commands = String::from("info cpus\n");
    for cpu in 0..16 {
        commands.push_str(&format!(
            "cpu {cpu}\ninfo registers\nx/6i $pc\ninfo lapic\n"
        ));
    }
    let _ = s.write_all(commands.as_bytes());
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&out);
    // HMP draws its prompt with terminal escapes: drop them (ESC [ ... final letter).
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for e in chars.by_ref() {
                if e.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if c != '\r' {
            plain.push(c);
        }
    }
    eprintln!("testhost: the stuck machine's CPUs (QEMU monitor):");
    for line in plain.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("  | {line}");
    }
}

/// Creates one KVM VM with an in-kernel irqchip and one vCPU that never runs, then leaves it to
/// a background process that lives as long as the emulated host.
///
/// Why: the emulated host's kernel flips static keys when the first VM appears and the last one
/// goes (KVM's preempt notifiers, patched into `__schedule`; the lapic's enable keys), by
/// live-patching its code with `int3`. QEMU 7.2's multi-threaded TCG sometimes keeps running a
/// stale translation of the patched code on the other CPU: it hits an `int3` that memory no
/// longer holds, the kernel backs up over it and retries, forever, with interrupts off (seen as
/// both CPUs looping in `asm_exc_int3` from `__schedule+0x2ab`, soft lockups, a silent host).
/// With one VM held for the whole run, those counts never return to zero, so tests that create
/// and destroy many VMs no longer patch the scheduler each time. The one patch left, when this
/// VM is created, is made with the other emulated CPUs offline (the command script does that).
pub fn hold_kvm() -> Result<()> {
    let kvm = kvm_ioctls::Kvm::new().context("hold-kvm: /dev/kvm")?;
    let vm = kvm.create_vm().context("hold-kvm: KVM_CREATE_VM")?;
    vm.create_irq_chip()
        .context("hold-kvm: KVM_CREATE_IRQCHIP")?;
    let vcpu = vm.create_vcpu(0).context("hold-kvm: KVM_CREATE_VCPU")?;
    // SAFETY: fork in a single-threaded process; the child only sleeps and keeps the fds.
    match unsafe { libc::fork() } {
        -1 => bail!("hold-kvm: fork: {}", std::io::Error::last_os_error()),
        0 => {
            let _held = (kvm, vm, vcpu);
            // Let go of the console the script's caller reads.
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                use std::os::fd::AsRawFd;
                for fd in 0..3 {
                    // SAFETY: dup2 onto the standard descriptors of this process.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_versioned_kernel_package_is_found_for_both_architectures() {
        let amd64 = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            kernel_package_of(amd64).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        let arm64 = "linux-image-arm64:arm64\n  Depends: linux-image-6.1.0-57-arm64:arm64\n";
        assert_eq!(
            kernel_package_of(arm64).as_deref(),
            Some("linux-image-6.1.0-57-arm64")
        );
        let unsigned = "  Depends: linux-image-6.1.0-57-amd64-unsigned\n";
        assert_eq!(
            kernel_package_of(unsigned).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(kernel_package_of("  Depends: linux-base\n"), None);
    }

    #[test]
    fn paths_under_the_fresh_tmpfs_mounts_are_kept_outermost_only() {
        let base = std::env::temp_dir().join(format!("testhost-keep-{}", std::process::id()));
        let inner = base.join("checkout/supermachine");
        std::fs::create_dir_all(&inner).unwrap();
        let base = base.canonicalize().unwrap();
        let kept = kept_paths(&[
            inner.clone(),
            base.join("checkout"),
            PathBuf::from("/usr/bin"),
            PathBuf::from("/tmp"),
        ]);
        std::fs::remove_dir_all(&base).unwrap();
        if base.starts_with("/tmp") {
            assert_eq!(kept, vec![base.join("checkout")]);
        } else {
            // TMPDIR elsewhere: nothing of ours is under /tmp.
            assert!(kept.is_empty());
        }
    }
}
