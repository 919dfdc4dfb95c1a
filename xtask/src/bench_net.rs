//! `cargo xtask bench net`: TCP through each VMM's user-mode network, from inside the guest
//! (`sm-netbench`) to servers in this process on the host's loopback, reached at the gateway
//! 10.0.2.2 in both: our NAT (`supermachine boot --network user`) and QEMU's slirp
//! (`-netdev user`), same kernel, initramfs and guest script.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::bench::{initramfs_with, qemu_linux, result_lines, stats};
use crate::util::{installed_kernel, step};

/// Starts the three host servers; their ports (recv, send, connect).
fn servers(mib: u64) -> Result<(u16, u16, u16)> {
    let bind = || TcpListener::bind("127.0.0.1:0").context("cannot listen on the loopback");
    let (recv, send, connect) = (bind()?, bind()?, bind()?);
    let ports = (
        recv.local_addr()?.port(),
        send.local_addr()?.port(),
        connect.local_addr()?.port(),
    );
    // Host → guest: MIB MiB, then close.
    std::thread::spawn(move || {
        let chunk = vec![0xa5u8; 1 << 16];
        for mut c in recv.incoming().flatten() {
            for _ in 0..(mib << 4) {
                if c.write_all(&chunk).is_err() {
                    break;
                }
            }
        }
    });
    // Guest → host: read to the end, then close (the guest waits for that close).
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        for mut c in send.incoming().flatten() {
            while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    std::thread::spawn(move || for _c in connect.incoming() {});
    Ok(ports)
}

pub fn bench(supermachine: &Path, runs: usize, mib: u64, connects: usize) -> Result<()> {
    let (p_recv, p_send, p_connect) = servers(mib)?;
    let script = format!(
        "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && \
         ip route add default via 10.0.2.2 && \
         sm-netbench recv 10.0.2.2:{p_recv} && sm-netbench send 10.0.2.2:{p_send} {mib} && \
         sm-netbench connect 10.0.2.2:{p_connect} {connects}"
    );
    let dir = std::env::temp_dir().join(format!("sm-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = guest_init::InitConfig {
        argv: vec!["/bin/sh".into(), "-c".into(), script.clone()],
        ..Default::default()
    };
    let initrd = initramfs_with(&config, &dir)?;
    let kernel = installed_kernel();
    let names = [
        "supermachine, user-mode NAT",
        "qemu microvm, user-mode (slirp)",
    ];
    let mut results: Vec<Vec<[f64; 3]>> = vec![Vec::new(), Vec::new()];
    for run in 1..=runs {
        for (k, result) in results.iter_mut().enumerate() {
            step(&format!("net: {} run {run}/{runs}", names[k]));
            let mut cmd = if k == 0 {
                let mut c = Command::new(supermachine);
                c.args([
                    "boot",
                    "--quiet",
                    "--memory",
                    "512",
                    "--network",
                    "user",
                    "--egress",
                    "allow-all",
                ])
                .args(["--", "/bin/sh", "-c", &script]);
                c
            } else {
                let mut c = qemu_linux(&kernel, &initrd, 512);
                c.args(["-netdev", "user,id=n0"])
                    .args(["-device", "virtio-net-device,netdev=n0"]);
                c
            };
            let r = result_lines(&mut cmd, 3).with_context(|| format!("{} run {run}", names[k]))?;
            result.push([r[0].1, r[1].1, r[2].1]);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\nTCP between the guest and the host's loopback through the user-mode network \
         ({mib} MiB each way, {connects} connects; median of {runs} runs)\n"
    );
    println!("| VMM, network | host→guest MiB/s | guest→host MiB/s | connect (median µs) |");
    println!("|---|---:|---:|---:|");
    let mut medians = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let col = |i: usize| stats(results[k].iter().map(|r| r[i]).collect()).median;
        let m = [col(0), col(1), col(2)];
        println!("| {name} | {:.1} | {:.1} | {:.0} |", m[0], m[1], m[2]);
        medians.push(m);
    }
    println!(
        "\nsupermachine / qemu: host→guest {:.2}×, guest→host {:.2}×, connect time {:.2}× (lower is better)",
        medians[0][0] / medians[1][0],
        medians[0][1] / medians[1][1],
        medians[0][2] / medians[1][2]
    );
    Ok(())
}
