//! `cargo xtask bench restore`: the VMM's own restore overhead, on this machine's KVM, with the
//! echo toy guest (it prints a line, then echoes every byte of serial input). Each VMM
//! snapshots it while it echoes; then, per run: process start → snapshot restored → a byte
//! written to the serial console comes back. QEMU restores the same guest with `-incoming`
//! from a state file it saved itself, in the same run, at each memory size.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::toy_guest;
use crate::util::{step, target_dir};

/// Spawns `cmd`, sends one byte on its stdin and times until it comes back on stdout.
fn time_echo(mut cmd: Command) -> Result<Duration> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot start the VMM")?;
    // A byte that reaches a VMM before its serial port is restored can be lost (QEMU drops
    // input received during `-incoming`): send one every millisecond until the echo comes.
    let mut input = child.stdin.take().context("no stdin")?;
    let echoed_flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_sending = echoed_flag.clone();
    std::thread::spawn(move || {
        while !stop_sending.load(std::sync::atomic::Ordering::Relaxed) {
            if input.write_all(b"#").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let mut out = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        loop {
            match out.read(&mut b) {
                Ok(1) if b[0] == b'#' => {
                    let _ = tx.send(Instant::now());
                    return;
                }
                Ok(1) => continue,
                _ => return,
            }
        }
    });
    let echoed = rx.recv_timeout(Duration::from_secs(30));
    echoed_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = child.kill();
    let status = child.wait();
    match echoed {
        Ok(at) => Ok(at - started),
        Err(_) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("no echo within 30 s ({status:?}): {err}")
        }
    }
}

fn ours_snapshot(supermachine: &Path, kernel: &Path, mib: u32, dir: &Path) -> Result<()> {
    let out = Command::new(supermachine)
        .args([
            "boot",
            "--no-initramfs",
            "--memory",
            &mib.to_string(),
            "--kernel",
        ])
        .arg(kernel)
        .arg("--snapshot-to")
        .arg(dir)
        .args(["--snapshot-when", toy_guest::ECHO_READY])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "supermachine snapshot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn monitor(sock: &Path, cmd: &str) -> Result<String> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?; // greeting
    writeln!(s, "{cmd}")?;
    // The monitor echoes the command, then prints its output and a new prompt.
    let mut out = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !out.ends_with("(qemu) ") || !out.contains(cmd) {
        if Instant::now() > deadline {
            bail!("QEMU monitor did not answer {cmd:?}: {out}");
        }
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => bail!("QEMU monitor: {e}"),
        }
    }
    Ok(out)
}

/// Boots the echo toy in QEMU, waits for it to echo, saves its state to `file`.
fn qemu_snapshot(kernel: &Path, mib: u32, file: &Path, work: &Path) -> Result<()> {
    let sock = work.join(format!("qemu-monitor-{mib}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = crate::bench::qemu_microvm(kernel, mib);
    cmd.arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child: Child = cmd.spawn().context("qemu-system-x86_64")?;
    let mut out = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.contains(toy_guest::ECHO_READY.trim_end()) {
        let mut line = String::new();
        if out.read_line(&mut line)? == 0 || Instant::now() > deadline {
            let _ = child.kill();
            bail!("QEMU's echo toy did not start: {seen}");
        }
        seen.push_str(&line);
    }
    // Live, not stopped first: QEMU keeps a VM that was paused at migration paused after
    // `-incoming`, and the guest dirties next to no memory while it polls.
    monitor(&sock, &format!("migrate \"exec:cat > {}\"", file.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = monitor(&sock, "info migrate")?;
        if info.contains("completed") {
            break;
        }
        if info.contains("failed") || Instant::now() > deadline {
            let _ = child.kill();
            bail!("QEMU migration to a file failed: {info}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = monitor(&sock, "quit");
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn bench(supermachine: &Path, runs: usize, sizes: &[u32]) -> Result<()> {
    let work = target_dir().join("bench-restore");
    std::fs::create_dir_all(&work)?;
    let kernel = work.join("echo-toy.elf");
    std::fs::write(&kernel, toy_guest::echo_elf())?;
    let mut rows = Vec::new();
    for &mib in sizes {
        step(&format!("echo toy, {mib} MiB: snapshots"));
        let ours: PathBuf = work.join(format!("ours-{mib}"));
        ours_snapshot(supermachine, &kernel, mib, &ours)?;
        let qemu_state = work.join(format!("qemu-{mib}.state"));
        qemu_snapshot(&kernel, mib, &qemu_state, &work)?;
        step(&format!("echo toy, {mib} MiB: {runs} restores each"));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        // One warm-up each (page cache, binaries), not counted.
        for i in 0..=runs {
            let mut ours_cmd = Command::new(supermachine);
            ours_cmd.args(["boot", "--restore"]).arg(&ours);
            let t = time_echo(ours_cmd).context("supermachine restore")?;
            let mut q = crate::bench::qemu_microvm(&kernel, mib);
            q.arg("-incoming")
                .arg(format!("exec:cat {}", qemu_state.display()));
            let u = time_echo(q).context("QEMU -incoming")?;
            if i > 0 {
                a.push(t.as_secs_f64() * 1e3);
                b.push(u.as_secs_f64() * 1e3);
            }
        }
        a.sort_by(|x, y| x.total_cmp(y));
        b.sort_by(|x, y| x.total_cmp(y));
        rows.push((mib, a, b));
    }
    println!("\nRestore of the echo toy on this machine's KVM: process start → restored → first echoed byte ({runs} runs each, ms)\n");
    println!("| guest memory | VMM | median | p90 | min | max |");
    println!("|---:|---|---:|---:|---:|---:|");
    for (mib, a, b) in &rows {
        for (name, v) in [("supermachine", a), ("qemu -incoming", b)] {
            println!(
                "| {mib} MiB | {name} | {:.2} | {:.2} | {:.2} | {:.2} |",
                percentile(v, 0.5),
                percentile(v, 0.9),
                v[0],
                v[v.len() - 1]
            );
        }
    }
    for (mib, a, b) in &rows {
        println!(
            "\n{mib} MiB: supermachine restores {:.1}× faster than QEMU (medians).",
            percentile(b, 0.5) / percentile(a, 0.5)
        );
    }
    Ok(())
}
