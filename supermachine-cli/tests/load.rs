//! Guests under sustained load, as users run them: servers behind published ports with many
//! clients for a minute; each test then checks that the VM still serves and answers `exec`.
//!
//! They boot Linux guests: `cargo xtask test` runs them in the emulated KVM host (with one
//! emulated CPU; see `LOAD_SUITE` in `xtask/src/tests.rs`). The Redis image comes from `cargo
//! xtask image redis` (`SUPERMACHINE_TEST_REDIS_IMAGE`); without it, or without a KVM that
//! boots Linux, they fail with the reason.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long each server is loaded.
const LOAD: Duration = Duration::from_secs(60);
/// Concurrent clients.
const CLIENTS: usize = 20;

#[path = "support/sm_env.rs"]
mod sm_env;
use sm_env::Env;

/// A host port nobody listens on (bound once, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_image() -> String {
    let dir = std::env::var("SUPERMACHINE_TEST_REDIS_IMAGE")
        .expect("SUPERMACHINE_TEST_REDIS_IMAGE is not set: run `cargo xtask test` (it builds the image with `cargo xtask image redis`)");
    format!("oci:{dir}:latest")
}

fn busybox_image(env: &Env) -> String {
    let layout = env.dir.join("busybox");
    let layer = oci_bake::layout::busybox_layer(std::path::Path::new("/bin/busybox"))
        .expect("busybox-static is needed (cargo xtask deps installs it)");
    oci_bake::layout::write_layout(
        &layout,
        "latest",
        &[layer],
        &oci_bake::layout::busybox_config(),
    )
    .unwrap();
    format!("oci:{}:latest", layout.display())
}

/// One Redis request over RESP; the reply line (and a bulk string's body).
fn redis_call(conn: &mut BufReader<TcpStream>, args: &[&[u8]]) -> std::io::Result<Vec<u8>> {
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    conn.get_mut().write_all(&req)?;
    let mut line = Vec::new();
    conn.read_until(b'\n', &mut line)?;
    if line.first() == Some(&b'$') {
        let len: i64 = String::from_utf8_lossy(&line[1..])
            .trim()
            .parse()
            .unwrap_or(-1);
        if len >= 0 {
            let mut body = vec![0u8; len as usize + 2];
            conn.read_exact(&mut body)?;
            body.truncate(len as usize);
            return Ok(body);
        }
    }
    Ok(line)
}

fn redis_connect(port: u16) -> std::io::Result<BufReader<TcpStream>> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_nodelay(true)?;
    Ok(BufReader::new(s))
}

/// Waits (at most two minutes) until Redis answers PING on `port`.
fn wait_for_redis(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(mut c) = redis_connect(port) {
            if let Ok(reply) = redis_call(&mut c, &[b"PING"]) {
                if reply.starts_with(b"+PONG") {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "Redis never answered on {port}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_redis_server_behind_a_published_port_serves_twenty_clients_for_a_minute() {
    let env = Env::new("redis");
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:6379");
    let id = env.detached(&["-p", &publish, &redis_image()]);
    wait_for_redis(port);
    // Each client SETs its own keys and GETs them back: every reply is checked, so a byte
    // lost or misplaced anywhere on the path fails the test, not just a dead VM.
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let done = done.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let mut c = redis_connect(port).map_err(|e| format!("client {client}: {e}"))?;
                let mut i = 0u64;
                while started.elapsed() < LOAD {
                    let key = format!("k{client}-{}", i % 64);
                    let value = format!("v{client}-{i}-{}", "x".repeat((i % 200) as usize));
                    let set = redis_call(&mut c, &[b"SET", key.as_bytes(), value.as_bytes()])
                        .map_err(|e| format!("client {client} SET {i}: {e}"))?;
                    if !set.starts_with(b"+OK") {
                        return Err(format!("client {client} SET {i}: {set:?}"));
                    }
                    let got = redis_call(&mut c, &[b"GET", key.as_bytes()])
                        .map_err(|e| format!("client {client} GET {i}: {e}"))?;
                    if got != value.as_bytes() {
                        return Err(format!(
                            "client {client} GET {i}: {:?}",
                            String::from_utf8_lossy(&got)
                        ));
                    }
                    done.fetch_add(2, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            })
        })
        .collect();
    let errors: Vec<String> = clients
        .into_iter()
        .filter_map(|c| c.join().unwrap().err())
        .collect();
    let requests = done.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{requests} requests in {secs:.0} s through -p: {:.0} requests/s",
        requests as f64 / secs
    );
    let (_, logs, _) = env.sm(&["logs", &id]);
    assert!(
        errors.is_empty(),
        "{} of {CLIENTS} clients failed, first: {}\nlogs:\n{logs}",
        errors.len(),
        errors[0]
    );
    assert!(requests > 0);
    let mut c = redis_connect(port).expect("Redis after the load");
    assert!(redis_call(&mut c, &[b"PING"])
        .unwrap()
        .starts_with(b"+PONG"));
    env.assert_alive(&id);
}

/// `wrk -c 20 -d 60s` against `url`; its report.
fn wrk(url: &str) -> String {
    let out = Command::new("wrk")
        .args(["-t", "2", "-c", &CLIENTS.to_string()])
        .args([
            "-d",
            &format!("{}s", LOAD.as_secs()),
            "--timeout",
            "30s",
            url,
        ])
        .output()
        .expect("wrk is needed (cargo xtask deps installs it)");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wrk failed: {report}");
    report
}

/// The requests wrk completed; fails on any error it counted.
fn wrk_requests(report: &str) -> u64 {
    assert!(
        !report.contains("Socket errors") && !report.contains("Non-2xx"),
        "wrk saw errors:\n{report}"
    );
    report
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's report:\n{report}"))
}

fn http_ok(port: u16, tls: bool) -> bool {
    let scheme = if tls { "https" } else { "http" };
    Command::new("curl")
        .args(["-sk", "-m", "30", &format!("{scheme}://127.0.0.1:{port}/")])
        .output()
        .map(|o| o.status.success() && o.stdout == b"hello\n")
        .unwrap_or(false)
}

fn http_server_under_load(tls: bool) {
    let env = Env::new(if tls { "https" } else { "http" });
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80{}", if tls { "/tls" } else { "" });
    let mut args = vec!["-p", publish.as_str()];
    if tls {
        args.push("--tls-autogen");
    }
    let image = busybox_image(&env);
    args.extend_from_slice(&[
        &image,
        "sh",
        "-c",
        "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 80 -h /www",
    ]);
    let id = env.detached(&args);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !http_ok(port, tls) {
        assert!(Instant::now() < deadline, "the server never answered");
        std::thread::sleep(Duration::from_millis(200));
    }
    let scheme = if tls { "https" } else { "http" };
    let report = wrk(&format!("{scheme}://127.0.0.1:{port}/"));
    eprintln!("{report}");
    assert!(wrk_requests(&report) > 0, "{report}");
    assert!(http_ok(port, tls), "no answer after the load");
    env.assert_alive(&id);
}

#[test]
fn an_http_server_behind_a_published_port_serves_wrk_for_a_minute() {
    http_server_under_load(false);
}

#[test]
fn a_tls_published_port_serves_wrk_for_a_minute() {
    http_server_under_load(true);
}
