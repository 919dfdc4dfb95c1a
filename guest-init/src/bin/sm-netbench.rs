//! `sm-netbench`: a TCP benchmark that runs inside a guest (packed into the initramfs by
//! `cargo xtask initramfs`, driven by `cargo xtask bench net` against a server on the host).
//!
//! ```text
//! sm-netbench recv IP:PORT              read until the host closes: host→guest throughput
//! sm-netbench send IP:PORT MIB          write MIB, then wait for the host's close: guest→host
//! sm-netbench connect IP:PORT COUNT     COUNT sequential connects (each closed at once)
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
        _ => fail(
            "usage: sm-netbench recv IP:PORT | send IP:PORT MIB | connect IP:PORT COUNT".into(),
        ),
    }
}
