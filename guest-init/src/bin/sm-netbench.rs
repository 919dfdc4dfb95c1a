//! `sm-netbench`: a TCP benchmark that runs inside a guest (packed into the initramfs by
//! `cargo xtask initramfs`, driven by `cargo xtask bench net` against a server on the host).
//!
//! ```text
//! sm-netbench recv IP:PORT              read until the host closes: host→guest throughput
//! sm-netbench send IP:PORT MIB          write MIB, then wait for the host's close: guest→host
//! sm-netbench connect IP:PORT COUNT     COUNT sequential connects (each closed at once)
//! sm-netbench vsock-echo PORT           echo every vsock connection to PORT back (load tests)
//! ```
//! Prints `RESULT <mode> <value> <unit>` (MiB/s, or the median connect time in µs).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Instant;

fn fail(msg: String) -> ! {
    eprintln!("sm-netbench: {msg}");
    std::process::exit(1);
}

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| fail(format!("bad address {s:?} (IP:PORT)")))
}

fn number(s: &str) -> u64 {
    s.parse()
        .unwrap_or_else(|_| fail(format!("bad number {s:?}")))
}

fn connect(to: SocketAddr) -> TcpStream {
    TcpStream::connect(to).unwrap_or_else(|e| fail(format!("connect {to}: {e}")))
}

fn mib_per_s(bytes: u64, started: Instant) -> f64 {
    bytes as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["recv", to] => {
            let mut s = connect(addr(to));
            let started = Instant::now();
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) => fail(format!("read: {e}")),
                }
            }
            println!("RESULT recv {:.1} MiB/s", mib_per_s(total, started));
        }
        ["send", to, mib] => {
            let total = number(mib) << 20;
            let mut s = connect(addr(to));
            let buf = vec![0x5au8; 1 << 16];
            let started = Instant::now();
            let mut sent = 0u64;
            while sent < total {
                let n = (total - sent).min(buf.len() as u64) as usize;
                if let Err(e) = s.write_all(&buf[..n]) {
                    fail(format!("write: {e}"));
                }
                sent += n as u64;
            }
            let _ = s.shutdown(Shutdown::Write);
            // The host closes once it has read everything: the bytes arrived.
            let _ = s.read(&mut [0u8; 1]);
            println!("RESULT send {:.1} MiB/s", mib_per_s(total, started));
        }
        ["connect", to, count] => {
            let to = addr(to);
            let mut times: Vec<f64> = (0..number(count).max(1))
                .map(|_| {
                    let started = Instant::now();
                    let s = connect(to);
                    let t = started.elapsed().as_secs_f64() * 1e6;
                    drop(s);
                    t
                })
                .collect();
            times.sort_by(f64::total_cmp);
            println!("RESULT connect {:.0} us", times[times.len() / 2]);
        }
        ["vsock-echo", port] => vsock_echo(number(port) as u32),
        _ => fail(
            "usage: sm-netbench recv IP:PORT | send IP:PORT MIB | connect IP:PORT COUNT | \
             vsock-echo PORT"
                .into(),
        ),
    }
}

/// Serves vsock `port` forever: each connection on its own thread, its bytes echoed back.
fn vsock_echo(port: u32) -> ! {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        fail(format!("vsock socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor we own from here on (for the life of the process).
    let _listener = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm of the size passed; the descriptor is ours.
    let bound = unsafe {
        libc::bind(
            fd,
            &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        ) == 0
            && libc::listen(fd, 128) == 0
    };
    if !bound {
        fail(format!(
            "vsock port {port}: {}",
            std::io::Error::last_os_error()
        ));
    }
    println!("VSOCK-ECHO-READY {port}");
    loop {
        // SAFETY: accept on our listening socket; null address pointers are allowed.
        let conn = unsafe { libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut()) };
        if conn < 0 {
            continue;
        }
        // SAFETY: a fresh descriptor from accept, owned by this File from here on.
        let mut conn = unsafe { std::fs::File::from_raw_fd(conn) };
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = conn.read(&mut buf) {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
}
