//! `cargo xtask bench`: wall-clock benchmarks, each run side by side with QEMU in the same run
//! on the same machine, reporting median, min and max.
//!
//! - `toy`: the VMM's own overhead on this machine's KVM, with the toy guest (a few
//!   instructions that print a marker on COM1 and end the VM): process start → marker, and
//!   process start → exit.
//! - `boot`: our Linux guest kernel + initramfs, process start → init's first line and → exit.
//!   Runs in the emulated KVM host when this machine's KVM cannot boot Linux.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use crate::tests::prepare_guest;
use crate::util::{self, cargo, installed_initramfs, installed_kernel, step, target_dir};

#[path = "../../supermachine-cli/tests/support/toy_guest.rs"]
pub mod toy_guest;

#[derive(Debug, Subcommand)]
pub enum Which {
    /// VMM overhead with the toy guest on this machine's KVM, next to QEMU microvm
    Toy {
        /// Runs per VMM
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Linux boot to init and to exit, next to QEMU microvm on the same kernel and initramfs
    Boot {
        /// Runs per VMM
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Run here even if this machine's KVM fails the probe (used inside the test host)
        #[arg(long)]
        here: bool,
    },
    /// `supermachine run IMAGE true` (cached busybox image), split into phases, next to QEMU
    /// microvm running the same kernel, initramfs, image and init to the same end
    Run {
        /// Runs per VMM
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Run here even if this machine's KVM fails the probe (used inside the test host)
        #[arg(long)]
        here: bool,
    },
    /// Pull of a 100+ MiB multi-layer image from a local registry, cold and warm, next to skopeo
    Pull {
        /// Runs (the median is reported)
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Layers in the test image
        #[arg(long, default_value_t = 4)]
        layers: usize,
        /// MiB of files per layer
        #[arg(long, default_value_t = 40)]
        layer_mib: usize,
    },
    /// Restore: the VMM's own overhead with the echo toy guest on this machine's KVM, next to
    /// QEMU -incoming; then a baked busybox httpd (restore vs cold boot to the first HTTP
    /// response, QEMU -incoming of the same Linux guest, bake time, PSS of 20 clones), where
    /// Linux guests boot
    Restore {
        /// Runs per VMM and memory size (toy)
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Guest memory sizes in MiB (toy)
        #[arg(long, value_delimiter = ',', default_value = "128,1024")]
        sizes: Vec<u32>,
        /// Runs of each Linux measurement
        #[arg(long, default_value_t = 30)]
        linux_runs: usize,
        /// VMs restored from one snapshot at once for the memory measurement
        #[arg(long, default_value_t = 20)]
        clones: usize,
        /// Only the Linux part, here (used inside the test host)
        #[arg(long)]
        here: bool,
    },
    /// Exec round trips (`true`) in a running VM and vsock stream throughput both ways
    Exec {
        /// Exec calls timed
        #[arg(long, default_value_t = 1000)]
        calls: usize,
        /// MiB streamed each way
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Run here even if this machine's KVM fails the probe (used inside the test host)
        #[arg(long)]
        here: bool,
    },
    /// Requests/s and latency of a small file through a published port, with wrk at 1 and 64
    /// connections, next to the same httpd running on the host
    Http {
        /// Seconds per wrk run
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Run here even if this machine's KVM fails the probe (used inside the test host)
        #[arg(long)]
        here: bool,
    },
    /// Live sandbox verbs on a 256 MiB VM: pause/unpause round trips, fork to N clones (time,
    /// RSS and PSS)
    Sandbox {
        /// pause → unpause rounds
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Clones made by one fork
        #[arg(long, default_value_t = 10)]
        clones: usize,
        /// Run here even if this machine's KVM fails the probe (used inside the test host)
        #[arg(long)]
        here: bool,
    },
    /// Redis requests/s through a published port against the same server reached inside its
    /// guest, at 1 and 20 connections (one emulated CPU in the test host)
    Redis {
        /// Runs per path and connection count (the median is reported)
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Requests per redis-benchmark test
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Run here even if this machine's KVM fails the probe (used inside the test host)
        #[arg(long)]
        here: bool,
    },
    /// The library's warm pool: acquire → exec true → release cycles with 1 and 4 users, next
    /// to the same cycle with a cold boot
    Pool {
        /// Pool cycles per row
        #[arg(long, default_value_t = 100)]
        cycles: usize,
        /// Cold-boot cycles
        #[arg(long, default_value_t = 10)]
        cold: usize,
        /// Run here even if this machine's KVM fails the probe (used inside the test host)
        #[arg(long)]
        here: bool,
    },
    /// virtio-blk throughput and IOPS from inside the guest, next to QEMU microvm's virtio-blk
    Blk {
        /// Runs per VMM (the median is reported)
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Disk size and sequential transfer in MiB
        #[arg(long, default_value_t = 256)]
        mib: u64,
        /// Duration of the random-read phase in seconds
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Run here even if this machine's KVM fails the probe (used inside the test host)
        #[arg(long)]
        here: bool,
    },
    /// A block volume and a shared directory from inside the guest: virtio-blk and virtio-fs,
    /// next to QEMU microvm's virtio-blk and virtio-9p
    Fs {
        /// Runs per VMM (the median is reported)
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Disk/file size and sequential transfer in MiB
        #[arg(long, default_value_t = 128)]
        mib: u64,
        /// Duration of each random-read phase in seconds
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Run here even if this machine's KVM fails the probe (used inside the test host)
        #[arg(long)]
        here: bool,
    },
    /// TCP through the user-mode network: throughput both ways and connect latency, next to
    /// QEMU's user-mode (slirp) network
    Net {
        /// Runs per VMM (the median is reported)
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// MiB moved each way per run
        #[arg(long, default_value_t = 64)]
        mib: u64,
        /// Sequential connects per run
        #[arg(long, default_value_t = 200)]
        connects: usize,
        /// Run here even if this machine's KVM fails the probe (used inside the test host)
        #[arg(long)]
        here: bool,
    },
}

/// Timestamps of one run.
struct Sample {
    marker: Duration,
    exit: Duration,
}

/// Starts `cmd`, timing the first appearance of `marker` on stdout and the process exit.
fn time_run(cmd: &mut Command, marker: &str, limit: Duration) -> Result<Sample> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot start the VMM")?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let needle = marker.as_bytes().to_vec();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut found = false;
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if !found && seen.windows(needle.len()).any(|w| w == needle) {
                found = true;
                let _ = tx.send(Instant::now());
            }
        }
        seen
    });
    // Wait blocking (polling would add the timer tick to every sample); a watchdog kills a
    // hung run.
    let pid = child.id() as libc::pid_t;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            // SAFETY: kill(2) on our own unreaped child's pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return true;
        }
        false
    });
    let status = child.wait()?;
    let exited = started.elapsed();
    let _ = done_tx.send(());
    if watchdog.join().unwrap_or(false) {
        bail!("run exceeded {limit:?}");
    }
    let output = reader.join().unwrap_or_default();
    let marker_at = rx.try_recv().map_err(|_| {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        anyhow::anyhow!(
            "marker {marker:?} never appeared (status {status}); output:\n{}\n{err}",
            String::from_utf8_lossy(&output)
        )
    })?;
    Ok(Sample {
        marker: marker_at - started,
        exit: exited,
    })
}

pub(crate) struct Stats {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

pub(crate) fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Stats {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Makes a fresh command for one run of a VMM.
type CommandFactory = Box<dyn FnMut() -> Command>;

/// Runs each (name, command builder) `runs` times, interleaved, and prints a table.
fn compare(
    title: &str,
    marker: &str,
    marker_label: &str,
    runs: usize,
    limit: Duration,
    vmms: &mut [(&str, CommandFactory)],
) -> Result<()> {
    let mut samples: Vec<Vec<Sample>> = vmms.iter().map(|_| Vec::new()).collect();
    // One warm-up each (page cache, binary loading), not counted.
    for (name, make) in vmms.iter_mut() {
        time_run(&mut make(), marker, limit).with_context(|| format!("{name}, warm-up run"))?;
    }
    for i in 0..runs {
        for (k, (name, make)) in vmms.iter_mut().enumerate() {
            let s = time_run(&mut make(), marker, limit)
                .with_context(|| format!("{name}, run {}", i + 1))?;
            samples[k].push(s);
        }
    }
    println!("\n{title} ({runs} runs each, wall time in ms)\n");
    println!("| VMM | {marker_label} median | min | max | → exit median | min | max |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut medians = Vec::new();
    for (k, (name, _)) in vmms.iter().enumerate() {
        let m = stats(samples[k].iter().map(|s| ms(s.marker)).collect());
        let e = stats(samples[k].iter().map(|s| ms(s.exit)).collect());
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            m.median, m.min, m.max, e.median, e.min, e.max
        );
        medians.push((m.median, e.median));
    }
    if medians.len() == 2 {
        println!(
            "\n{} is {:.1}× faster to {marker_label} and {:.1}× faster to exit than {}.",
            vmms[0].0,
            medians[1].0 / medians[0].0,
            medians[1].1 / medians[0].1,
            vmms[1].0
        );
    }
    Ok(())
}

fn build_release() -> Result<PathBuf> {
    util::run(cargo().args([
        "build",
        "--release",
        "-p",
        "supermachine-cli",
        "--bin",
        "supermachine",
    ]))?;
    Ok(target_dir().join("release").join("supermachine"))
}

/// Where the pool benchmark (`supermachine/benches/pool.rs`, release) is copied, for the
/// emulated host to run without cargo.
fn pool_bench_binary() -> PathBuf {
    target_dir().join("release").join("bench-pool")
}

fn build_pool_bench() -> Result<()> {
    let json = util::output(cargo().args([
        "bench",
        "-p",
        "supermachine",
        "--bench",
        "pool",
        "--no-run",
        "--message-format=json",
    ]))?;
    let exe = json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "pool")
        .and_then(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the pool benchmark binary")?;
    std::fs::copy(&exe, pool_bench_binary())?;
    Ok(())
}

/// Runs the pool benchmark here, with its own store and VM registry.
fn bench_pool(cycles: usize, cold: usize) -> Result<()> {
    let base = PathBuf::from("/run").join(format!("sm-bench-pool-{}", std::process::id()));
    let image = format!(
        "oci:{}:latest",
        target_dir().join("images/busybox").display()
    );
    let status = Command::new(pool_bench_binary())
        .arg(&image)
        .args(["--cycles", &cycles.to_string(), "--cold", &cold.to_string()])
        .env("SUPERMACHINE_HOME", base.join("home"))
        .env("SUPERMACHINE_RUNTIME_DIR", base.join("rt"))
        .status()
        .context("the pool benchmark binary (built by `cargo xtask bench pool`)")?;
    let _ = std::fs::remove_dir_all(&base);
    if !status.success() {
        bail!("the pool benchmark failed ({status})");
    }
    Ok(())
}

pub fn qemu_microvm(kernel: &Path, memory_mib: u32) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off",
        "-enable-kvm",
        // Without the ARCH_CAPABILITIES MSR: this machine's paravirtual KVM refuses QEMU 7.2's
        // write of it ("failed to set MSR 0x10a"), and the toy guest never reads it.
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args(["-m", &memory_mib.to_string(), "-smp", "1"])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    // Ends QEMU when the guest writes its exit status to our exit-status port.
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
    .args(["-serial", "stdio", "-kernel"])
    .arg(kernel);
    c
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Toy { runs } => bench_toy(runs),
        Which::Boot { runs, here } => bench_boot(runs, here),
        Which::Run { runs, here } => bench_run(runs, here),
        Which::Restore {
            runs,
            sizes,
            linux_runs,
            clones,
            here,
        } => {
            if !here {
                let supermachine = build_release()?;
                crate::bench_restore::bench(&supermachine, runs, &sizes)?;
                crate::images::busybox()?;
            }
            let args = [
                "restore".to_string(),
                "--linux-runs".into(),
                linux_runs.to_string(),
                "--clones".into(),
                clones.to_string(),
            ];
            match guest_bench_host(here, &args)? {
                Some(sm) => crate::bench_restore::bench_linux(&sm, linux_runs, clones),
                None => Ok(()),
            }
        }
        Which::Exec { calls, mib, here } => {
            let args = [
                "exec".to_string(),
                "--calls".into(),
                calls.to_string(),
                "--mib".into(),
                mib.to_string(),
            ];
            if !here {
                crate::images::busybox()?;
            }
            match guest_bench_host(here, &args)? {
                Some(sm) => crate::bench_agent::bench_exec(&sm, calls, mib),
                None => Ok(()),
            }
        }
        Which::Pool { cycles, cold, here } => {
            let args = [
                "pool".to_string(),
                "--cycles".into(),
                cycles.to_string(),
                "--cold".into(),
                cold.to_string(),
            ];
            if !here {
                crate::images::busybox()?;
                build_pool_bench()?;
            }
            match guest_bench_host(here, &args)? {
                Some(_) => bench_pool(cycles, cold),
                None => Ok(()),
            }
        }
        Which::Sandbox {
            rounds,
            clones,
            here,
        } => {
            let args = [
                "sandbox".to_string(),
                "--rounds".into(),
                rounds.to_string(),
                "--clones".into(),
                clones.to_string(),
            ];
            if !here {
                crate::images::busybox()?;
            }
            match guest_bench_host(here, &args)? {
                Some(sm) => crate::bench_sandbox::bench(&sm, rounds, clones),
                None => Ok(()),
            }
        }
        Which::Http { seconds, here } => {
            let args = ["http".to_string(), "--seconds".into(), seconds.to_string()];
            if !here {
                crate::images::busybox()?;
            }
            match guest_bench_host(here, &args)? {
                Some(sm) => crate::bench_agent::bench_http(&sm, seconds),
                None => Ok(()),
            }
        }
        Which::Redis {
            runs,
            requests,
            here,
        } => {
            let args = [
                "redis".to_string(),
                "--runs".into(),
                runs.to_string(),
                "--requests".into(),
                requests.to_string(),
            ];
            if !here {
                crate::images::redis()?;
            }
            // One emulated CPU: with two the emulation breaks nested guests under this load.
            match guest_bench_host_on(here, &args, Some(1))? {
                Some(sm) => crate::bench_redis::bench(&sm, runs, requests),
                None => Ok(()),
            }
        }
        Which::Pull {
            runs,
            layers,
            layer_mib,
        } => crate::bench_pull::bench(runs, layers, layer_mib),
        Which::Blk {
            runs,
            mib,
            seconds,
            here,
        } => bench_blk(runs, mib, seconds, here),
        Which::Fs {
            runs,
            mib,
            seconds,
            here,
        } => bench_fs(runs, mib, seconds, here),
        Which::Net {
            runs,
            mib,
            connects,
            here,
        } => {
            let args = [
                "net".to_string(),
                "--runs".into(),
                runs.to_string(),
                "--mib".into(),
                mib.to_string(),
                "--connects".into(),
                connects.to_string(),
            ];
            match guest_bench_host(here, &args)? {
                Some(sm) => crate::bench_net::bench(&sm, runs, mib, connects),
                None => Ok(()),
            }
        }
    }
}

fn bench_toy(runs: usize) -> Result<()> {
    let supermachine = build_release()?;
    let toy = target_dir().join("toy-guest.elf");
    toy_guest::write_to(&toy)?;
    step("toy guest on this machine's KVM");
    let (t1, t2) = (toy.clone(), toy.clone());
    let sm = supermachine.clone();
    compare(
        "VMM overhead: toy guest on this machine's KVM",
        toy_guest::MARKER.trim_end(),
        "→ marker",
        runs,
        Duration::from_secs(10),
        &mut [
            (
                "supermachine",
                Box::new(move || {
                    let mut c = Command::new(&sm);
                    c.args([
                        "boot",
                        "--quiet",
                        "--no-initramfs",
                        "--memory",
                        "32",
                        "--kernel",
                    ])
                    .arg(&t1);
                    c
                }),
            ),
            ("qemu microvm", Box::new(move || qemu_microvm(&t2, 32))),
        ],
    )
}

/// Builds what the guest benchmarks need, then tells whether to measure here. When this
/// machine's KVM cannot boot Linux, re-runs `cargo xtask bench ARGS --here` in the emulated host
/// and returns `None`.
fn guest_bench_host(here: bool, args: &[String]) -> Result<Option<PathBuf>> {
    guest_bench_host_on(here, args, None)
}

/// As [`guest_bench_host`], with `cpus` emulated CPUs (default: as many as this machine has).
fn guest_bench_host_on(
    here: bool,
    args: &[String],
    cpus: Option<usize>,
) -> Result<Option<PathBuf>> {
    // Inside the test host (`--here`) everything was built by the outer run.
    if here {
        return Ok(Some(target_dir().join("release").join("supermachine")));
    }
    prepare_guest()?;
    let supermachine = build_release()?;
    if crate::tests::guests_run_locally(&supermachine) {
        return Ok(Some(supermachine));
    }
    let mut command = vec![
        std::env::current_exe()?.to_string_lossy().into_owned(),
        "bench".into(),
    ];
    command.extend(args.iter().cloned());
    command.push("--here".into());
    let mut options = crate::testhost::Options::default();
    if let Some(cpus) = cpus {
        options.cpus = cpus;
    }
    let code = crate::testhost::run_command(&command, &options)?;
    if code != 0 {
        bail!("benchmark in the emulated host failed (status {code})");
    }
    Ok(None)
}

/// The installed base initramfs with `config` appended, as a file for QEMU's `-initrd`
/// (we pass the same archive to our VMM in memory).
pub(crate) fn initramfs_with(config: &guest_init::InitConfig, dir: &Path) -> Result<PathBuf> {
    let mut combined = std::fs::read(installed_initramfs())?;
    combined.resize(combined.len().next_multiple_of(4), 0);
    combined.extend_from_slice(&config.to_initramfs());
    let path = dir.join(format!("sm-bench-initramfs-{}.cpio", std::process::id()));
    std::fs::write(&path, &combined)?;
    Ok(path)
}

/// QEMU microvm booting our kernel with `initrd`, quiet, ending through the exit-status port.
pub(crate) fn qemu_linux(kernel: &Path, initrd: &Path, memory_mib: u32) -> Command {
    let mut c = qemu_microvm(kernel, memory_mib);
    c.arg("-initrd").arg(initrd).args([
        "-append",
        "console=ttyS0 reboot=t panic=-1 io_delay=none quiet",
    ]);
    c
}

fn bench_boot(runs: usize, here: bool) -> Result<()> {
    let args = ["boot".to_string(), "--runs".into(), runs.to_string()];
    let Some(supermachine) = guest_bench_host(here, &args)? else {
        return Ok(());
    };
    let kernel = installed_kernel();
    let base = installed_initramfs();
    // QEMU gets the same base initramfs with the same init configuration appended.
    let config = guest_init::InitConfig {
        argv: vec!["/bin/true".into()],
        verbose: true,
        ..Default::default()
    };
    let combined_path = initramfs_with(&config, &std::env::temp_dir())?;
    let marker = "supermachine-init: running";
    let (k1, k2, cp, sm) = (
        kernel.clone(),
        kernel.clone(),
        combined_path.clone(),
        supermachine.clone(),
    );
    let result = compare(
        "Linux boot: our guest kernel + initramfs, 512 MiB, 1 vCPU",
        marker,
        "→ init",
        runs,
        Duration::from_secs(120),
        &mut [
            (
                "supermachine",
                Box::new(move || {
                    let mut c = Command::new(&sm);
                    c.args(["boot", "--cmdline", "quiet", "--memory", "512", "--kernel"])
                        .arg(&k1)
                        .arg("--initramfs")
                        .arg(&base)
                        .args(["--", "/bin/true"]);
                    c
                }),
            ),
            ("qemu microvm", Box::new(move || qemu_linux(&k2, &cp, 512))),
        ],
    );
    let _ = std::fs::remove_file(&combined_path);
    result
}

/// Runs `cmd`, returns the `RESULT <mode> <value> <unit>` lines as (mode, value, unit).
pub(crate) fn result_lines(
    cmd: &mut Command,
    expected: usize,
) -> Result<Vec<(String, f64, String)>> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("cannot start the VMM")?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let results: Vec<(String, f64, String)> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.trim().strip_prefix("RESULT ")?.split_whitespace();
            Some((
                w.next()?.to_string(),
                w.next()?.parse().ok()?,
                w.next()?.to_string(),
            ))
        })
        .collect();
    if results.len() != expected {
        bail!(
            "expected {expected} results, got:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(results)
}

fn bench_blk(runs: usize, mib: u64, seconds: u64, here: bool) -> Result<()> {
    let args = [
        "blk".to_string(),
        "--runs".into(),
        runs.to_string(),
        "--mib".into(),
        mib.to_string(),
        "--seconds".into(),
        seconds.to_string(),
    ];
    let Some(supermachine) = guest_bench_host(here, &args)? else {
        return Ok(());
    };
    // The disk lives in memory (tmpfs) so both VMMs measure their I/O path, not the host disk.
    let dir = PathBuf::from("/run").join(format!("sm-bench-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let disk = dir.join("disk.img");
    let script = format!(
        "sm-blkbench write /dev/vda {mib} && sm-blkbench read /dev/vda {mib} && \
         sm-blkbench randread /dev/vda {mib} {seconds}"
    );
    let config = guest_init::InitConfig {
        argv: vec!["/bin/sh".into(), "-c".into(), script.clone()],
        ..Default::default()
    };
    let initrd = initramfs_with(&config, &dir)?;
    let kernel = installed_kernel();
    let mut results: Vec<Vec<Vec<(String, f64, String)>>> = vec![Vec::new(), Vec::new()];
    for run in 0..runs {
        for (k, result) in results.iter_mut().enumerate() {
            // A fresh, fully allocated disk for every run.
            std::fs::write(&disk, vec![0u8; (mib << 20) as usize])?;
            let mut cmd = if k == 0 {
                let mut c = Command::new(&supermachine);
                c.args(["boot", "--quiet", "--memory", "512", "--disk"])
                    .arg(&disk)
                    .args(["--", "/bin/sh", "-c", &script]);
                c
            } else {
                let mut c = qemu_linux(&kernel, &initrd, 512);
                c.arg("-drive")
                    .arg(format!("id=d0,file={},format=raw,if=none", disk.display()))
                    .args(["-device", "virtio-blk-device,drive=d0"]);
                c
            };
            let r = result_lines(&mut cmd, 3).with_context(|| format!("run {}", run + 1))?;
            result.push(r);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\nvirtio-blk from the guest (O_DIRECT, {mib} MiB disk in host memory, median of {runs} runs)\n"
    );
    println!("| VMM | seq write MiB/s | seq read MiB/s | 4 KiB random read IOPS |");
    println!("|---|---:|---:|---:|");
    let mut medians = Vec::new();
    for (k, name) in ["supermachine", "qemu microvm"].iter().enumerate() {
        let col = |i: usize| stats(results[k].iter().map(|r| r[i].1).collect()).median;
        let m = [col(0), col(1), col(2)];
        println!("| {name} | {:.0} | {:.0} | {:.0} |", m[0], m[1], m[2]);
        medians.push(m);
    }
    println!(
        "\nsupermachine / qemu: write {:.2}×, read {:.2}×, random read {:.2}×",
        medians[0][0] / medians[1][0],
        medians[0][1] / medians[1][1],
        medians[0][2] / medians[1][2]
    );
    Ok(())
}

fn bench_fs(runs: usize, mib: u64, seconds: u64, here: bool) -> Result<()> {
    let args = [
        "fs".to_string(),
        "--runs".into(),
        runs.to_string(),
        "--mib".into(),
        mib.to_string(),
        "--seconds".into(),
        seconds.to_string(),
    ];
    let Some(supermachine) = guest_bench_host(here, &args)? else {
        return Ok(());
    };
    // Disk and shared directory live in memory (tmpfs), so the VMMs' I/O paths are measured.
    let dir = PathBuf::from("/run").join(format!("sm-bench-fs-{}", std::process::id()));
    let share = dir.join("share");
    std::fs::create_dir_all(&share)?;
    let disk = dir.join("disk.img");
    let passes = |path: &str| {
        format!(
            "sm-blkbench write {path} {mib} && sm-blkbench read {path} {mib} && \
             sm-blkbench randread {path} {mib} {seconds}"
        )
    };
    let script = |mount: &str| {
        format!(
            "{} && mkdir -p /mnt && {mount} share0 /mnt && {}",
            passes("/dev/vda"),
            passes("/mnt/file")
        )
    };
    let ours = script("mount -t virtiofs");
    let theirs = script("mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000");
    let config = guest_init::InitConfig {
        argv: vec!["/bin/sh".into(), "-c".into(), theirs],
        ..Default::default()
    };
    let initrd = initramfs_with(&config, &dir)?;
    let kernel = installed_kernel();
    let names = [
        "supermachine: virtio-blk, virtio-fs",
        "qemu microvm: virtio-blk, virtio-9p",
    ];
    let mut results: Vec<Vec<Vec<(String, f64, String)>>> = vec![Vec::new(), Vec::new()];
    for run in 0..runs {
        for (k, result) in results.iter_mut().enumerate() {
            step(&format!("fs: {} run {}/{runs}", names[k], run + 1));
            std::fs::write(&disk, vec![0u8; (mib << 20) as usize])?;
            let _ = std::fs::remove_file(share.join("file"));
            let mut cmd = if k == 0 {
                let mut c = Command::new(&supermachine);
                c.args(["boot", "--quiet", "--memory", "512", "--disk"])
                    .arg(&disk)
                    .arg("--share")
                    .arg(format!("{}:share0", share.display()))
                    .args(["--", "/bin/sh", "-c", &ours]);
                c
            } else {
                let mut c = qemu_linux(&kernel, &initrd, 512);
                c.arg("-drive")
                    .arg(format!("id=d0,file={},format=raw,if=none", disk.display()))
                    .args(["-device", "virtio-blk-device,drive=d0"])
                    .arg("-fsdev")
                    .arg(format!(
                        "local,id=f0,path={},security_model=none",
                        share.display()
                    ))
                    .args(["-device", "virtio-9p-device,fsdev=f0,mount_tag=share0"]);
                c
            };
            let r = result_lines(&mut cmd, 6).with_context(|| format!("run {}", run + 1))?;
            result.push(r);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\nBlock volume (O_DIRECT) and shared directory (page cache dropped before each read \
         pass) from the guest, {mib} MiB in host memory, \
         {seconds} s of 4 KiB random reads; median of {runs} runs\n"
    );
    println!(
        "| VMM | block write MiB/s | block read MiB/s | block 4 KiB rand IOPS | share write MiB/s | share read MiB/s | share 4 KiB rand IOPS |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut medians = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let col = |i: usize| stats(results[k].iter().map(|r| r[i].1).collect()).median;
        let m: Vec<f64> = (0..6).map(col).collect();
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} |",
            m[0], m[1], m[2], m[3], m[4], m[5]
        );
        medians.push(m);
    }
    let ratio = |i: usize| medians[0][i] / medians[1][i];
    println!(
        "\nsupermachine / qemu: block {:.2}× / {:.2}× / {:.2}×; shared directory (virtio-fs vs 9p) {:.2}× / {:.2}× / {:.2}×",
        ratio(0),
        ratio(1),
        ratio(2),
        ratio(3),
        ratio(4),
        ratio(5)
    );
    Ok(())
}

fn bench_run(runs: usize, here: bool) -> Result<()> {
    let args = ["run".to_string(), "--runs".into(), runs.to_string()];
    if !here {
        crate::images::busybox()?;
    }
    let Some(supermachine) = guest_bench_host(here, &args)? else {
        return Ok(());
    };
    let layout = target_dir().join("images/busybox");
    let image = format!("oci:{}:latest", layout.display());
    let dir = PathBuf::from("/run").join(format!("sm-bench-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let home = dir.join("home");
    // Pull once (not measured); QEMU gets the same root filesystem image.
    let pulled = Command::new(&supermachine)
        .args(["pull", "-q", &image])
        .env("SUPERMACHINE_HOME", &home)
        .output()?;
    if !pulled.status.success() {
        bail!("pull failed: {}", String::from_utf8_lossy(&pulled.stderr));
    }
    let rootfs = String::from_utf8_lossy(&pulled.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("rootfs: ").map(str::to_string))
        .context("pull printed no rootfs")?;
    let config = guest_init::InitConfig {
        argv: vec!["true".into()],
        container: Some(guest_init::ContainerConfig {
            rootfs_device: "/dev/vda".into(),
            rootfs_type: "squashfs".into(),
            user: String::new(),
            hostname: "bench".into(),
            tty: false,
            interactive: false,
            tty_size: None,
            stdout_device: "/dev/hvc0".into(),
            stderr_device: "/dev/hvc1".into(),
            control_device: "/dev/hvc2".into(),
            mounts: Vec::new(),
            hold_before_start: false,
            network: None,
        }),
        ..Default::default()
    };
    let initrd = initramfs_with(&config, &dir)?;
    let kernel = installed_kernel();
    let (mut ours, mut qemu) = (Vec::new(), Vec::new());
    let mut phases: Vec<[f64; 3]> = Vec::new();
    for i in 0..=runs {
        let started = Instant::now();
        let out = Command::new(&supermachine)
            .args(["run", "--pull", "never", &image, "true"])
            .env("SUPERMACHINE_HOME", &home)
            .env("SUPERMACHINE_TIMINGS", "1")
            .stdin(Stdio::null())
            .output()?;
        let wall = ms(started.elapsed());
        if !out.status.success() {
            bail!("run failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .find(|l| l.starts_with("timings:"))
            .context("no timings")?;
        let get = |k: &str| -> f64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let mut q = qemu_linux(&kernel, &initrd, 512);
        q.arg("-drive")
            .arg(format!(
                "id=root,file={rootfs},format=raw,if=none,readonly=on"
            ))
            .args(["-device", "virtio-blk-device,drive=root"])
            .args(["-device", "virtio-serial-device"]);
        for c in 0..3 {
            q.args(["-chardev", &format!("null,id=c{c}")])
                .args(["-device", &format!("virtconsole,chardev=c{c}")]);
        }
        let started = Instant::now();
        let qout = q.stdin(Stdio::null()).output()?;
        let qwall = ms(started.elapsed());
        // isa-debug-exit turns the workload's status 0 into QEMU's exit code 1.
        if qout.status.code() != Some(1) {
            bail!(
                "qemu's workload did not exit 0 through the exit port ({}): {}",
                qout.status,
                String::from_utf8_lossy(&qout.stdout)
            );
        }
        if i == 0 {
            continue; // warm-up
        }
        ours.push(wall);
        qemu.push(qwall);
        phases.push([get("prepare"), get("boot"), get("workload")]);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let col = |k: usize| stats(phases.iter().map(|p| p[k]).collect()).median;
    let o = stats(ours);
    let q = stats(qemu);
    println!(
        "\n`run IMAGE true` on the cached busybox image, 512 MiB, 1 vCPU ({runs} runs each, ms)\n"
    );
    println!("| | total median | min | max | host preparation | VM + kernel + init setup | workload to VM end |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| supermachine run | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0} |",
        o.median,
        o.min,
        o.max,
        col(0),
        col(1),
        col(2)
    );
    println!(
        "| qemu microvm, same kernel/initramfs/image/init | {:.0} | {:.0} | {:.0} | | | |",
        q.median, q.min, q.max
    );
    println!(
        "\nsupermachine is {:.1}× faster end to end.",
        q.median / o.median
    );
    Ok(())
}
