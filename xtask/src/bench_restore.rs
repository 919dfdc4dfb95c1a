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
    // Its stderr, for a failure report, read on a thread: a helper process it started (QEMU's
    // `exec:cat`) may keep the pipe open after it is gone.
    let mut err_pipe = child.stderr.take().context("no stderr")?;
    let (err_tx, err_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut err = String::new();
        let _ = err_pipe.read_to_string(&mut err);
        let _ = err_tx.send(err);
    });
    let echoed = rx.recv_timeout(Duration::from_secs(30));
    echoed_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = child.kill();
    // Reaped on a thread: a QEMU stuck in the emulated host's kernel must not stop the run.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let status = done_rx.recv_timeout(Duration::from_secs(5));
    match echoed {
        Ok(at) => Ok(at - started),
        Err(_) => {
            let err = err_rx
                .recv_timeout(Duration::from_secs(2))
                .unwrap_or_default();
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

/// Starts QEMU (`cmd`) with its human monitor on the Unix socket `sock` and piped stdio.
fn spawn_with_monitor(mut cmd: Command, sock: &Path) -> Result<Child> {
    let _ = std::fs::remove_file(sock);
    cmd.arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().context("qemu-system-x86_64")
}

/// Boots the echo toy in QEMU, waits for it to echo, saves its state to `file`.
fn qemu_snapshot(kernel: &Path, mib: u32, file: &Path, work: &Path) -> Result<()> {
    let sock = work.join(format!("qemu-monitor-{mib}.sock"));
    let mut child = spawn_with_monitor(crate::bench::qemu_microvm(kernel, mib), &sock)?;
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
    save_and_quit(&sock, file, child, Duration::from_secs(60))
}

/// Has the QEMU whose monitor is `sock` migrate its running VM into `file`, waits until that
/// completed (at most `limit`), and ends it.
fn save_and_quit(sock: &Path, file: &Path, mut child: Child, limit: Duration) -> Result<()> {
    monitor(sock, &format!("migrate \"exec:cat > {}\"", file.display()))?;
    let deadline = Instant::now() + limit;
    loop {
        let info = monitor(sock, "info migrate")?;
        if info.contains("completed") {
            break;
        }
        if info.contains("failed") || Instant::now() > deadline {
            let _ = child.kill();
            bail!("QEMU migration to a file failed: {info}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = monitor(sock, "quit");
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
        // The same restore without the system-call filters, for their cost.
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        // One warm-up each (page cache, binaries), not counted.
        for i in 0..=runs {
            let mut ours_cmd = Command::new(supermachine);
            ours_cmd.args(["boot", "--restore"]).arg(&ours);
            let t = time_echo(ours_cmd).context("supermachine restore")?;
            let mut unfiltered = Command::new(supermachine);
            unfiltered
                .args(["boot", "--restore"])
                .arg(&ours)
                .env("SUPERMACHINE_SECCOMP", "off");
            let f = time_echo(unfiltered).context("supermachine restore, unfiltered")?;
            let mut q = crate::bench::qemu_microvm(&kernel, mib);
            q.arg("-incoming")
                .arg(format!("exec:cat {}", qemu_state.display()));
            let u = time_echo(q).context("QEMU -incoming")?;
            if i > 0 {
                a.push(t.as_secs_f64() * 1e3);
                b.push(u.as_secs_f64() * 1e3);
                c.push(f.as_secs_f64() * 1e3);
            }
        }
        a.sort_by(|x, y| x.total_cmp(y));
        b.sort_by(|x, y| x.total_cmp(y));
        c.sort_by(|x, y| x.total_cmp(y));
        rows.push((mib, a, b, c));
    }
    println!("\nRestore of the echo toy on this machine's KVM: process start → restored → first echoed byte ({runs} runs each, ms)\n");
    println!("| guest memory | VMM | median | p90 | min | max |");
    println!("|---:|---|---:|---:|---:|---:|");
    for (mib, a, b, c) in &rows {
        for (name, v) in [
            ("supermachine", a),
            ("supermachine, SUPERMACHINE_SECCOMP=off", c),
            ("qemu -incoming", b),
        ] {
            println!(
                "| {mib} MiB | {name} | {:.2} | {:.2} | {:.2} | {:.2} |",
                percentile(v, 0.5),
                percentile(v, 0.9),
                v[0],
                v[v.len() - 1]
            );
        }
    }
    for (mib, a, b, c) in &rows {
        println!(
            "\n{mib} MiB: supermachine restores {:.1}× faster than QEMU (medians); the \
             system-call filters add {:+.2} ms ({:+.1} %).",
            percentile(b, 0.5) / percentile(a, 0.5),
            percentile(a, 0.5) - percentile(c, 0.5),
            (percentile(a, 0.5) / percentile(c, 0.5) - 1.0) * 100.0
        );
    }
    Ok(())
}

/// The Linux guest's shell command for the echo comparison: raw console, a ready line, echo.
const LINUX_ECHO: &str = "stty raw -echo; echo ECHO-READY; exec cat";

/// The web server baked for the HTTP measurements.
const WEB: &str = "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 80 -h /www";

/// Sends `GET /` to `port` until a `200` comes back; the time from `since`.
fn first_http_response(port: u16, since: Instant, child: &mut Child) -> Result<Duration> {
    let deadline = since + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the VM process ended ({status}) before it answered");
        }
        if Instant::now() > deadline {
            bail!("no HTTP answer on port {port} within 120 s");
        }
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_ok() {
                let mut reply = Vec::new();
                let _ = s.read_to_end(&mut reply);
                if reply.starts_with(b"HTTP/1.0 200") || reply.starts_with(b"HTTP/1.1 200") {
                    return Ok(since.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Ends a foreground `run` the way a user would: SIGTERM (the workload's stop signal).
fn stop(mut child: Child) -> Result<()> {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.wait();
    Ok(())
}

/// Proportional set size of a process, in KiB.
fn pss_kib(pid: u32) -> Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no Pss in smaps_rollup")
}

/// `median | p90 | min | max` of `v` (ms, one decimal), for a Markdown table row.
pub(crate) fn summary(v: &mut [f64]) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "{:.1} | {:.1} | {:.1} | {:.1}",
        percentile(v, 0.5),
        percentile(v, 0.9),
        v[0],
        v[v.len() - 1]
    )
}

/// The Linux part of `bench restore`, run where Linux guests boot (the emulated KVM host):
/// restore vs cold boot of a baked web server, QEMU `-incoming` of the same kernel and
/// initramfs, bake time, and the memory cost of 20 VMs restored from one snapshot.
pub fn bench_linux(supermachine: &Path, runs: usize, clones: usize) -> Result<()> {
    let mib = 128u32;
    let work = PathBuf::from("/run").join(format!("sm-bench-restore-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let home = work.join("home");
    let runtime = work.join("vms");
    let sm = |args: &[&str]| {
        let mut c = Command::new(supermachine);
        c.args(args)
            .env("SUPERMACHINE_HOME", &home)
            .env("SUPERMACHINE_RUNTIME_DIR", &runtime)
            .env("SUPERMACHINE_TIMINGS", "1")
            .stdin(Stdio::null());
        c
    };
    let layout = target_dir().join("images/busybox");
    let image = format!("oci:{}:latest", layout.display());
    let out = sm(&["pull", "-q", &image]).output()?;
    if !out.status.success() {
        bail!("pull failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let memory = format!("{mib}m");

    // Bake (timed), next to a cold `run` to the same point below.
    step("baking busybox httpd");
    let mut bake_times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        // Snapshotted once httpd accepts on port 80 (busybox's image exposes no port, so
        // the default check would only wait for the shell to start).
        let out = sm(&[
            "bake",
            "-m",
            &memory,
            "--ready-port",
            "80",
            &image,
            "sh",
            "-c",
            WEB,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()?;
        if !out.status.success() {
            bail!("bake failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        bake_times.push(started.elapsed().as_secs_f64() * 1e3);
    }

    // (a) + (b): restores; (c) cold boots; each to the first HTTP response.
    step(&format!(
        "{runs} restores and {runs} cold boots to the first HTTP response"
    ));
    let port = 18900u16;
    let publish = format!("127.0.0.1:{port}:80");
    let (mut restore_call, mut restored, mut cold) = (Vec::new(), Vec::new(), Vec::new());
    // Milestones of each restore, ms from process start (`timings: at NAME=MS`).
    let mut marks: Vec<(String, Vec<f64>)> = Vec::new();
    for i in 0..=runs {
        for boot in [false, true] {
            let mut args = vec!["run", "-m", &memory, "-p", &publish];
            if boot {
                args.push("--no-restore");
            }
            args.extend_from_slice(&[&image, "sh", "-c", WEB]);
            let mut cmd = sm(&args);
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            let t0 = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            cmd.env("SUPERMACHINE_TIMINGS_T0", t0.to_string());
            let since = Instant::now();
            let mut child = cmd.spawn()?;
            let mut err = child.stderr.take().context("no stderr")?;
            let err_reader = std::thread::spawn(move || {
                let mut s = String::new();
                let _ = err.read_to_string(&mut s);
                s
            });
            let t = first_http_response(port, since, &mut child);
            stop(child)?;
            let err = err_reader.join().unwrap_or_default();
            let t = t.with_context(|| err.clone())?;
            eprintln!(
                "run {i}/{runs} {}: {:.1} ms",
                if boot { "cold boot" } else { "restore" },
                t.as_secs_f64() * 1e3
            );
            if i == 0 {
                continue; // warm-up
            }
            if boot {
                cold.push(t.as_secs_f64() * 1e3);
            } else {
                restored.push(t.as_secs_f64() * 1e3);
                for (name, ms) in err.lines().filter_map(|l| {
                    let (n, v) = l.strip_prefix("timings: at ")?.split_once('=')?;
                    Some((n.to_string(), v.trim().parse::<f64>().ok()?))
                }) {
                    match marks.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, v)) => v.push(ms),
                        None => marks.push((name, vec![ms])),
                    }
                }
                let call = err
                    .lines()
                    .find_map(|l| l.strip_prefix("timings: restore_call="))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .with_context(|| {
                        format!("a restore printed no timing (was it restored?): {err}")
                    })?;
                restore_call.push(call);
            }
        }
    }

    // QEMU restoring the same kernel + initramfs from its own saved state, next to ours: process
    // start → first echoed byte on the serial console.
    step("Linux echo guest: QEMU -incoming and supermachine restore");
    let kernel = crate::util::installed_kernel();
    let ours_dir = work.join("linux-echo");
    let out = sm(&[
        "boot",
        "--quiet",
        "-m",
        &mib.to_string(),
        "--snapshot-to",
        ours_dir.to_str().unwrap_or_default(),
        "--snapshot-when",
        "ECHO-READY",
        "--",
        "/bin/sh",
        "-c",
        LINUX_ECHO,
    ])
    .output()?;
    if !out.status.success() {
        bail!(
            "Linux echo snapshot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let config = guest_init::InitConfig {
        argv: vec!["/bin/sh".into(), "-c".into(), LINUX_ECHO.into()],
        ..Default::default()
    };
    let initrd = crate::bench::initramfs_with(&config, &work)?;
    let qemu_state = work.join("qemu-linux.state");
    eprintln!("our Linux echo snapshot is taken; QEMU's next");
    qemu_linux_snapshot(&kernel, &initrd, mib, &qemu_state, &work)?;
    let (mut ours_echo, mut qemu_echo) = (Vec::new(), Vec::new());
    let mut qemu_failed = 0;
    for i in 0..=runs {
        eprintln!("Linux echo restore {i}/{runs}");
        let mut ours_cmd = Command::new(supermachine);
        ours_cmd.args(["boot", "--restore"]).arg(&ours_dir);
        let t = time_echo(ours_cmd).context("supermachine restore (Linux)")?;
        let mut q = crate::bench::qemu_linux(&kernel, &initrd, mib);
        q.arg("-incoming")
            .arg(format!("exec:cat {}", qemu_state.display()));
        // QEMU's restore of a Linux guest sometimes never answers in the emulated host:
        // counted, not fatal.
        let u = time_echo(q);
        if i > 0 {
            ours_echo.push(t.as_secs_f64() * 1e3);
            match u {
                Ok(u) => qemu_echo.push(u.as_secs_f64() * 1e3),
                Err(e) => {
                    eprintln!("QEMU -incoming (Linux), run {i}: {e}");
                    qemu_failed += 1;
                }
            }
        }
    }
    if qemu_echo.is_empty() {
        bail!("QEMU -incoming never answered ({qemu_failed} runs)");
    }

    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(v, 0.5)
    };
    let (r, c) = (median(&mut restored.clone()), median(&mut cold.clone()));
    println!("\nbusybox httpd, {mib} MiB guest, in this host ({runs} runs each, ms)\n");
    println!("| measurement | median | p90 | min | max |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| (a) restore call → vCPUs running | {} |",
        summary(&mut restore_call)
    );
    println!(
        "| (b) restore: process start → first HTTP response | {} |",
        summary(&mut restored)
    );
    println!(
        "| (c) cold boot: process start → first HTTP response | {} |",
        summary(&mut cold)
    );
    println!(
        "| Linux echo guest, supermachine restore → first echoed byte | {} |",
        summary(&mut ours_echo)
    );
    println!(
        "| Linux echo guest, QEMU -incoming → first echoed byte{} | {} |",
        if qemu_failed > 0 {
            format!(" ({qemu_failed} of {runs} runs never answered within 30 s)")
        } else {
            String::new()
        },
        summary(&mut qemu_echo)
    );
    println!(
        "| bake (boot → ready → snapshot written) | {} |",
        summary(&mut bake_times)
    );
    println!(
        "\nrestore is {:.1}× faster than a cold boot to the first response (medians); \
         supermachine restores the Linux echo guest {:.1}× faster than QEMU -incoming.",
        c / r,
        median(&mut qemu_echo.clone()) / median(&mut ours_echo.clone())
    );
    if !marks.is_empty() {
        println!("\nWhere a restore's time goes: milestones from process start (median ms)\n");
        println!("| milestone | ms |");
        println!("|---|---:|");
        for (name, mut v) in marks {
            println!("| {name} | {:.1} |", median(&mut v));
        }
        println!("| first HTTP response (b) | {:.1} |", r);
    }
    // Memory: 20 VMs restored from one snapshot at once.
    step(&format!("{clones} VMs restored from one snapshot: memory"));
    let mut ids = Vec::new();
    for i in 0..clones {
        eprintln!("clone {i}/{clones}");
        let out = sm(&["run", "-d", "-m", &memory, &image, "sh", "-c", WEB])
            .stderr(Stdio::piped())
            .output()?;
        if !out.status.success() {
            bail!("run -d failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        ids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    // Let every guest settle (its first steps after restore touch pages).
    std::thread::sleep(Duration::from_secs(2));
    let mut pss = Vec::new();
    for id in &ids {
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(
            runtime.join("vms").join(id).join("vm.json"),
        )?)?;
        let pid = record["pid"].as_u64().context("no pid")? as u32;
        pss.push(pss_kib(pid)? as f64 / 1024.0);
    }
    for id in &ids {
        let _ = sm(&["rm", "-f", id]).output();
    }

    let _ = std::fs::remove_dir_all(&work);
    println!(
        "\n{clones} VMs restored from one {mib} MiB snapshot, running at once: PSS per VM \
         median {:.1} MiB (max {:.1}), {:.0} MiB for all {clones}.",
        median(&mut pss.clone()),
        pss.iter().copied().fold(0.0, f64::max),
        pss.iter().sum::<f64>()
    );
    Ok(())
}

/// Boots the Linux echo guest in QEMU, waits for it to echo, saves its state to `file`.
fn qemu_linux_snapshot(
    kernel: &Path,
    initrd: &Path,
    mib: u32,
    file: &Path,
    work: &Path,
) -> Result<()> {
    let sock = work.join("qemu-linux-monitor.sock");
    let mut child = spawn_with_monitor(crate::bench::qemu_linux(kernel, initrd, mib), &sock)?;
    let mut out = child.stdout.take().context("no stdout")?;
    // Its console, read on a thread (and drained to the end, so the guest never blocks).
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !String::from_utf8_lossy(&seen).contains("ECHO-READY") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.extend_from_slice(&chunk),
            Err(_) => {
                let _ = child.kill();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!(
                    "QEMU's Linux echo guest did not start within 120 s: {}{err}",
                    String::from_utf8_lossy(&seen)
                );
            }
        }
    }
    std::thread::spawn(move || while rx.recv().is_ok() {});
    save_and_quit(&sock, file, child, Duration::from_secs(120))
}
