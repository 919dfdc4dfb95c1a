//! Restores that get input from their first millisecond: serial console bytes and a vsock
//! connection arrive while the restored guest's state is being put back; every restored guest
//! must answer on both.
//!
//! They boot Linux guests: `cargo xtask test` runs them in the emulated KVM host.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/sm_env.rs"]
mod sm_env;
use sm_env::Env;

/// Restores taken in a row by each test: four tests of 50 (200 in all), each from its own
/// snapshot, so that a stall of the emulated host (see `xtask/src/tests.rs`) costs one short
/// test a restart, not the whole loop. `SUPERMACHINE_TEST_RESTORES` overrides it.
fn restores() -> usize {
    std::env::var("SUPERMACHINE_TEST_RESTORES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// How often a byte of serial input is sent, from the restore's first millisecond on. Each byte
/// costs the guest a UART interrupt and about ten port exits to read and echo it; in the
/// emulated host (nested KVM under TCG) that is over a millisecond, so at one byte a
/// millisecond the restored guest did nothing but serve its UART and answered nothing within a
/// minute, while at one byte per 10 ms it answered within 0.3 s (4 of 4). The input still
/// arrives during the restore, which is what the test is about.
/// `SUPERMACHINE_TEST_INPUT_EVERY_MS` overrides it (to measure the serial path by hand).
fn input_every() -> Duration {
    std::env::var("SUPERMACHINE_TEST_INPUT_EVERY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_millis(10), Duration::from_millis)
}

/// What a line of progress starts with: the isolated test runner shows these lines as they come
/// (the rest of a test's output only when it fails), so a stalled machine is told from a slow
/// test within minutes.
const PROGRESS: &str = "progress: ";

/// The guest of the restore loop: a vsock echo server, then the serial console in raw mode
/// echoing what it reads.
const ECHO_GUEST: &str = "/usr/bin/sm-netbench vsock-echo 5000 > /tmp/ve & \
     until [ -s /tmp/ve ]; do sleep 0.01; done; stty raw -echo; echo ECHO-READY; exec cat";

/// Dials guest vsock port 5000 through the VMM's socket from the moment it exists (retrying
/// every millisecond) and checks an echo.
fn vsock_echo(socket: &std::path::Path, stop: &AtomicBool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        match try_vsock_echo(socket) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(format!("no vsock echo: {last}"))
}

fn try_vsock_echo(socket: &std::path::Path) -> Result<(), String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"CONNECT 5000\n").map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with("OK ") {
        return Err(format!("refused ({line:?})"));
    }
    let probe = b"restored-and-listening";
    reader
        .get_mut()
        .write_all(probe)
        .map_err(|e| e.to_string())?;
    let mut back = vec![0u8; probe.len()];
    reader.read_exact(&mut back).map_err(|e| e.to_string())?;
    if back != probe {
        return Err(format!("echo {:?}", String::from_utf8_lossy(&back)));
    }
    Ok(())
}

/// One restore: serial input and a vsock connection from the first millisecond; both echo.
fn restore_once(env: &Env, snapshot: &std::path::Path, i: usize) -> Result<(), String> {
    let socket = env.dir.join(format!("v{i}.sock"));
    let _ = std::fs::remove_file(&socket);
    let mut child: Child = env
        .command(&["boot", "--restore"])
        .arg(snapshot)
        .arg("--vsock")
        .arg(&socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut input = child.stdin.take().ok_or("no stdin")?;
    let stop_input = stop.clone();
    let every = input_every();
    let feeder = std::thread::spawn(move || {
        while !stop_input.load(Ordering::Relaxed) && input.write_all(b"#").is_ok() {
            std::thread::sleep(every);
        }
    });
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let serial = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        while let Ok(1) = out.read(&mut b) {
            if b[0] == b'#' {
                return true;
            }
        }
        false
    });
    let mut err = child.stderr.take().ok_or("no stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let vsock = vsock_echo(&socket, &stop);
    if let Err(e) = &vsock {
        eprintln!("{PROGRESS}restore {i}: {e}");
    }
    // The serial echo came, or the VMM ended (its stdout closed), or it is stuck: bounded.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !serial.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let serial_ok = serial.is_finished() && serial.join().unwrap_or(false);
    stop.store(true, Ordering::Relaxed);
    let _ = child.kill();
    let _ = child.wait();
    let _ = feeder.join();
    let stderr = err_reader.join().unwrap_or_default();
    let _ = std::fs::remove_file(&socket);
    match (serial_ok, vsock) {
        (true, Ok(())) => Ok(()),
        (serial_ok, vsock) => Err(format!(
            "restore {i}: serial echo {}, vsock {:?}; stderr: {stderr}",
            if serial_ok { "ok" } else { "missing" },
            vsock
        )),
    }
}

/// Takes a snapshot of the echo guest, then restores it [`restores()`] times; restores are
/// numbered from `first` in messages.
fn restore_loop(first: usize) {
    let env = Env::new("restores");
    let snapshot = env.dir.join("echo-snapshot");
    let setup_socket = env.dir.join("setup.sock");
    let (code, _, err) = env.sm(&[
        "boot",
        "--quiet",
        "-m",
        "128",
        "--vsock",
        setup_socket.to_str().unwrap(),
        "--snapshot-to",
        snapshot.to_str().unwrap(),
        "--snapshot-when",
        "ECHO-READY",
        "--",
        "/bin/sh",
        "-c",
        ECHO_GUEST,
    ]);
    assert_eq!(code, 0, "snapshot failed: {err}");
    eprintln!("{PROGRESS}snapshot taken");
    let started = Instant::now();
    let mut failures = Vec::new();
    let count = restores();
    for i in first..first + count {
        if let Err(e) = restore_once(&env, &snapshot, i) {
            // Shown as it happens (the VMM's stderr is in it), not only at the end.
            eprintln!("{PROGRESS}{}", e.replace('\n', "\n  | "));
            failures.push(e);
        }
        if (i + 1) % 10 == 0 {
            eprintln!(
                "{PROGRESS}{} restores in {:.0} s",
                i + 1 - first,
                started.elapsed().as_secs_f64()
            );
        }
    }
    eprintln!(
        "{count} restores in {:.0} s, {} failed",
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {count} restores did not answer on both paths; first: {}",
        failures.len(),
        failures[0]
    );
}

#[test]
fn restores_with_input_from_the_first_millisecond_all_answer_1() {
    restore_loop(0);
}

#[test]
fn restores_with_input_from_the_first_millisecond_all_answer_2() {
    restore_loop(50);
}

#[test]
fn restores_with_input_from_the_first_millisecond_all_answer_3() {
    restore_loop(100);
}

#[test]
fn restores_with_input_from_the_first_millisecond_all_answer_4() {
    restore_loop(150);
}
