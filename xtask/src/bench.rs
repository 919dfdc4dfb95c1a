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

#[path = "../../supermachine/tests/support/toy_guest.rs"]
mod toy_guest;

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

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs each (name, command builder) `runs` times, interleaved, and prints a table.
fn compare(
    title: &str,
    marker: &str,
    marker_label: &str,
    runs: usize,
    limit: Duration,
    vmms: &mut [(&str, Box<dyn FnMut() -> Command>)],
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
        "supermachine",
        "--bin",
        "supermachine",
    ]))?;
    Ok(target_dir().join("release").join("supermachine"))
}

fn qemu_microvm(kernel: &Path, memory_mib: u32) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-enable-kvm",
        "-cpu",
        "host",
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

fn bench_boot(runs: usize, here: bool) -> Result<()> {
    // Inside the test host (`--here`) everything was built by the outer run.
    let supermachine = if here {
        target_dir().join("release").join("supermachine")
    } else {
        prepare_guest()?;
        build_release()?
    };
    if !here && !crate::tests::guests_run_locally(&supermachine) {
        let me = std::env::current_exe()?;
        let code = crate::testhost::run_command(
            &[
                me.to_string_lossy().into_owned(),
                "bench".into(),
                "boot".into(),
                "--runs".into(),
                runs.to_string(),
                "--here".into(),
            ],
            &crate::testhost::Options::default(),
        )?;
        if code != 0 {
            bail!("benchmark in the emulated host failed (status {code})");
        }
        return Ok(());
    }
    let kernel = installed_kernel();
    let base = installed_initramfs();
    // QEMU gets the same base initramfs with the same init configuration appended.
    let config = guest_init::InitConfig {
        argv: vec!["/bin/true".into()],
        verbose: true,
        ..Default::default()
    };
    let mut combined = std::fs::read(&base)?;
    combined.resize(combined.len().next_multiple_of(4), 0);
    combined.extend_from_slice(&config.to_initramfs());
    let combined_path =
        std::env::temp_dir().join(format!("sm-bench-initramfs-{}.cpio", std::process::id()));
    std::fs::write(&combined_path, &combined)?;
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
            (
                "qemu microvm",
                Box::new(move || {
                    let mut c = qemu_microvm(&k2, 512);
                    c.arg("-initrd").arg(&cp).args([
                        "-append",
                        "console=ttyS0 reboot=t panic=-1 io_delay=none quiet",
                    ]);
                    c
                }),
            ),
        ],
    );
    let _ = std::fs::remove_file(&combined_path);
    result
}
