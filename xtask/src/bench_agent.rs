//! `cargo xtask bench exec` and `bench http`: a detached VM of the cached busybox image, driven
//! through its vsock socket with the agent protocol (what the library does) and through a
//! published port with `wrk`. Runs in the emulated KVM host when this machine's KVM cannot
//! boot Linux, so absolute numbers there are inflated; `http` puts the same `busybox httpd`
//! running natively on that host next to it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_protocol::{read_frame, write_frame, ExecRequest, Frame, Operation, Request};
use anyhow::{bail, Context, Result};

use crate::util::{step, target_dir};

/// A detached VM for the benchmark, removed on drop.
pub(crate) struct BenchVm {
    supermachine: PathBuf,
    env: Vec<(String, PathBuf)>,
    pub(crate) id: String,
    runtime: PathBuf,
}

impl BenchVm {
    fn start(supermachine: &Path, name: &str, run_args: &[&str]) -> Result<BenchVm> {
        Self::start_image(supermachine, "busybox", name, run_args)
    }

    /// `run -d --name NAME RUN_ARGS` of the OCI layout `target/images/IMAGE`, whose reference
    /// takes the place of the `--` in `run_args`.
    pub(crate) fn start_image(
        supermachine: &Path,
        image: &str,
        name: &str,
        run_args: &[&str],
    ) -> Result<BenchVm> {
        let base = PathBuf::from("/run").join(format!("sm-bench-{name}-{}", std::process::id()));
        let runtime = base.join("rt");
        let env = vec![
            ("SUPERMACHINE_HOME".to_string(), base.join("home")),
            ("SUPERMACHINE_RUNTIME_DIR".to_string(), runtime.clone()),
        ];
        let layout = target_dir().join("images").join(image);
        let image = format!("oci:{}:latest", layout.display());
        let mut args = vec!["run", "-d", "--name", name];
        args.extend_from_slice(run_args);
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        // The image goes before the command: find the first argument that is the command.
        let at = full
            .iter()
            .position(|a| a == "--")
            .context("no -- in run args")?;
        full[at] = image;
        let out = Command::new(supermachine)
            .args(&full)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("run -d failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(BenchVm {
            supermachine: supermachine.to_path_buf(),
            env,
            id,
            runtime,
        })
    }

    fn socket(&self) -> PathBuf {
        self.runtime.join("vms").join(&self.id).join("vsock.sock")
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.supermachine);
        c.args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

impl Drop for BenchVm {
    fn drop(&mut self) {
        let _ = self.cli(&["rm", "-f", &self.id]).output();
        if let Some(base) = self.runtime.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

/// Opens an exec of `argv` on the agent; returns the stream after the Started frame.
fn exec_start(socket: &Path, argv: &[&str], stdin: bool) -> Result<UnixStream> {
    let mut s = UnixStream::connect(socket)?;
    s.write_all(format!("CONNECT {}\n", agent_protocol::AGENT_PORT).as_bytes())?;
    let mut byte = [0u8; 1];
    let mut line = Vec::new();
    while s.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    if !line.starts_with(b"OK ") {
        bail!("vsock CONNECT refused");
    }
    let req = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        stdin,
        ..Default::default()
    };
    write_frame(&mut s, &Frame::Request(Request::new(Operation::Exec(req))))?;
    match read_frame(&mut s)? {
        Some(Frame::Started { .. }) => Ok(s),
        other => bail!("exec did not start: {other:?}"),
    }
}

/// Reads frames to the Exit frame; returns stdout bytes seen.
fn exec_finish(s: &mut UnixStream) -> Result<u64> {
    let mut out = 0u64;
    loop {
        match read_frame(s)? {
            Some(Frame::Stdout(d)) => out += d.len() as u64,
            Some(Frame::Stderr(_)) => {}
            Some(Frame::Exit(st)) if st.code == 0 => return Ok(out),
            other => bail!("exec ended with {other:?}"),
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn bench_exec(supermachine: &Path, calls: usize, mib: u64) -> Result<()> {
    step("exec benchmark: starting a detached VM");
    let vm = BenchVm::start(supermachine, "bench-exec", &["--", "sleep", "1000000"])?;
    let socket = vm.socket();
    // Warm-up: page cache, the agent's first thread.
    for _ in 0..20 {
        let mut s = exec_start(&socket, &["true"], false)?;
        exec_finish(&mut s)?;
    }
    step(&format!("{calls} exec round trips of `true`"));
    let mut lat = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let mut s = exec_start(&socket, &["true"], false)?;
        exec_finish(&mut s)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let cli_runs = 20;
    let mut cli = Vec::new();
    for _ in 0..cli_runs {
        let t = Instant::now();
        let st = vm.cli(&["exec", &vm.id, "true"]).status()?;
        if !st.success() {
            bail!("supermachine exec failed: {st}");
        }
        cli.push(t.elapsed().as_secs_f64() * 1e3);
    }
    cli.sort_by(|a, b| a.total_cmp(b));

    step(&format!("vsock streams: {mib} MiB each way"));
    let bytes = mib << 20;
    // Host → guest: stdin of `cat > /dev/null`.
    let t = Instant::now();
    let mut s = exec_start(&socket, &["sh", "-c", "cat > /dev/null"], true)?;
    let chunk = vec![0x5au8; agent_protocol::DATA_CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        write_frame(&mut s, &Frame::Data(chunk[..n].to_vec()))?;
        sent += n as u64;
    }
    write_frame(&mut s, &Frame::Eof)?;
    exec_finish(&mut s)?;
    let to_guest = mib as f64 / t.elapsed().as_secs_f64();
    // Guest → host: stdout of head.
    let t = Instant::now();
    let count = bytes.to_string();
    let mut s = exec_start(&socket, &["head", "-c", &count, "/dev/zero"], false)?;
    let got = exec_finish(&mut s)?;
    if got != bytes {
        bail!("guest sent {got} bytes of {bytes}");
    }
    let to_host = mib as f64 / t.elapsed().as_secs_f64();

    println!("\nexec in a running VM (agent over vsock; {calls} calls; ms)\n");
    println!("| what | median | p99 | min | max |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| exec `true`, library protocol | {:.2} | {:.2} | {:.2} | {:.2} |",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat[0],
        lat[lat.len() - 1]
    );
    println!(
        "| `supermachine exec VM true` (CLI process included, {cli_runs} runs) | {:.2} | {:.2} | {:.2} | {:.2} |",
        percentile(&cli, 0.5),
        percentile(&cli, 0.99),
        cli[0],
        cli[cli.len() - 1]
    );
    println!("\nvsock stream through the agent ({mib} MiB): host → guest {to_guest:.0} MiB/s, guest → host {to_host:.0} MiB/s");
    Ok(())
}

/// Runs wrk; returns (requests/s, median latency ms, p99 latency ms).
fn wrk(url: &str, connections: u32, seconds: u32) -> Result<(f64, f64, f64)> {
    let threads = connections.clamp(1, 2);
    let out = Command::new("wrk")
        .args([
            "--latency",
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
        ])
        .args(["-d", &format!("{seconds}s"), url])
        .output()
        .context("wrk (Debian package wrk; `cargo xtask deps` installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if let Some(l) = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        eprintln!("wrk: {}", l.trim());
    }
    let field = |prefix: &str| -> Option<String> {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
    };
    let to_ms = |s: String| -> f64 {
        let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic()).unwrap_or(s.len()));
        let v: f64 = num.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => v / 1e3,
            "ms" => v,
            "s" => v * 1e3,
            _ => f64::NAN,
        }
    };
    let rps: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("wrk printed no Requests/sec")?;
    let p50 = field("50%").map(to_ms).unwrap_or(f64::NAN);
    let p99 = field("99%").map(to_ms).unwrap_or(f64::NAN);
    Ok((rps, p50, p99))
}

pub fn bench_http(supermachine: &Path, seconds: u32) -> Result<()> {
    let (vm_port, native_port, tls_port) = (18181u16, 18182u16, 18183u16);
    let serve = "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 80 -h /www";
    step(
        "http benchmark: a detached VM serving busybox httpd on a published port, and on a TLS one",
    );
    let publish = format!("127.0.0.1:{vm_port}:80");
    let publish_tls = format!("127.0.0.1:{tls_port}:80/tls");
    let _vm = BenchVm::start(
        supermachine,
        "bench-http",
        &[
            "-p",
            &publish,
            "-p",
            &publish_tls,
            "--tls-autogen",
            "--",
            "sh",
            "-c",
            serve,
        ],
    )?;
    // The peer: the same httpd natively on this host.
    let www = PathBuf::from("/run").join(format!("sm-bench-www-{}", std::process::id()));
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), "hello\n")?;
    let mut native = Command::new("busybox")
        .args([
            "httpd",
            "-f",
            "-p",
            &format!("127.0.0.1:{native_port}"),
            "-h",
        ])
        .arg(&www)
        .spawn()?;
    // Wait until both answer.
    for port in [vm_port, native_port] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port))
            .and_then(|mut s| {
                s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
                let mut b = Vec::new();
                s.read_to_end(&mut b)?;
                if b.ends_with(b"hello\n") {
                    Ok(())
                } else {
                    Err(std::io::Error::other("no body"))
                }
            })
            .is_err()
        {
            if Instant::now() > deadline {
                let _ = native.kill();
                bail!("port {port} does not serve");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut rows = Vec::new();
    for connections in [1u32, 64] {
        for (who, scheme, port) in [
            ("supermachine -p (VM)", "http", vm_port),
            (
                "supermachine -p .../tls (VM, TLS on the host)",
                "https",
                tls_port,
            ),
            ("busybox httpd on the host", "http", native_port),
        ] {
            step(&format!("wrk, {connections} connections, {who}"));
            let url = format!("{scheme}://127.0.0.1:{port}/index.html");
            rows.push((who, connections, wrk(&url, connections, seconds)?));
        }
    }
    step("TLS handshake latency, curl, 50 connections");
    let mut handshakes = handshake_times(tls_port, 50)?;
    let _ = native.kill();
    let _ = native.wait();
    let _ = std::fs::remove_dir_all(&www);
    println!("\nHTTP through a published port: 6-byte file, busybox httpd (one connection per request, so every HTTPS request is a full handshake), wrk {seconds} s\n");
    println!("| server | connections | requests/s | latency median (ms) | p99 (ms) |");
    println!("|---|---:|---:|---:|---:|");
    for (who, c, (rps, p50, p99)) in &rows {
        println!("| {who} | {c} | {rps:.0} | {p50:.2} | {p99:.2} |");
    }
    let runs = handshakes.len();
    println!(
        "\nTLS handshake on the published port (curl: TCP connected -> TLS established, {runs} runs), ms\n"
    );
    println!("| median | p90 | min | max |\n|---:|---:|---:|---:|");
    println!("| {} |", crate::bench_restore::summary(&mut handshakes));
    Ok(())
}

/// TLS handshake times (ms) against the TLS port, as curl measures them (connected to
/// handshake done), one fresh connection each.
fn handshake_times(port: u16, runs: usize) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let out = Command::new("curl")
            .args(["-k", "-sS", "--http1.1", "-o", "/dev/null", "-w"])
            .arg("%{time_connect} %{time_appconnect}")
            .arg(format!("https://127.0.0.1:{port}/index.html"))
            .output()
            .context("curl (`cargo xtask deps` installs it)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: Vec<f64> = text
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        let [connect, tls] = v[..] else {
            bail!("curl -w gave {text:?}");
        };
        times.push((tls - connect) * 1e3);
    }
    Ok(times)
}
