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

/// Restores taken in a row by [`restores_with_input_from_the_first_millisecond_all_answer`].
const RESTORES: usize = 200;

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
    let feeder = std::thread::spawn(move || {
        while !stop_input.load(Ordering::Relaxed) && input.write_all(b"#").is_ok() {
            std::thread::sleep(Duration::from_millis(1));
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

#[test]
fn restores_with_input_from_the_first_millisecond_all_answer() {
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
    let started = Instant::now();
    let failures: Vec<String> = (0..RESTORES)
        .filter_map(|i| restore_once(&env, &snapshot, i).err())
        .collect();
    eprintln!(
        "{RESTORES} restores in {:.0} s, {} failed",
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {RESTORES} restores did not answer on both paths; first: {}",
        failures.len(),
        failures[0]
    );
}
