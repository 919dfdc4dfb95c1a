//! The warm pool's cycle, acquire → `exec(["true"])` → release, with 1 and with 4 concurrent
//! users, next to the same cycle with a cold boot (start → exec → stop). Boots real guests:
//! `cargo xtask bench pool` runs it where they boot (the emulated KVM host here).
//!
//! `pool IMAGE [--cycles N] [--cold N]`; prints a Markdown table.

use std::time::{Duration, Instant};

use supermachine::{Image, VmConfig};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Row {
    what: String,
    users: usize,
    ms: Vec<f64>,
    wall: Duration,
}

fn cycle(pool: &supermachine::Pool) -> supermachine::Result<f64> {
    let started = Instant::now();
    let vm = pool.acquire()?;
    let out = vm.exec_builder().argv(["true"]).output()?;
    assert!(out.success(), "true failed: {out:?}");
    drop(vm);
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

fn pooled(pool: &supermachine::Pool, users: usize, cycles: usize) -> supermachine::Result<Row> {
    pool.settle(Duration::from_secs(600));
    let started = Instant::now();
    let ms = std::thread::scope(|s| -> supermachine::Result<Vec<f64>> {
        let workers: Vec<_> = (0..users)
            .map(|_| {
                s.spawn(move || -> supermachine::Result<Vec<f64>> {
                    (0..cycles / users).map(|_| cycle(pool)).collect()
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.join().expect("a user thread panicked")?);
        }
        Ok(all)
    })?;
    Ok(Row {
        what: "pool: acquire → exec true → release".into(),
        users,
        ms,
        wall: started.elapsed(),
    })
}

fn main() -> supermachine::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut image = None;
    let (mut cycles, mut cold) = (100usize, 10usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cycles" => cycles = args.next().and_then(|n| n.parse().ok()).unwrap_or(cycles),
            "--cold" => cold = args.next().and_then(|n| n.parse().ok()).unwrap_or(cold),
            // `cargo bench` passes this.
            "--bench" => {}
            other => image = Some(other.to_string()),
        }
    }
    let image = Image::open(image.as_deref().unwrap_or("busybox"))?;
    let config = VmConfig::new().memory_mib(128);
    eprintln!("==> baking the pool's snapshot");
    let pool = image.pool().config(config.clone()).min(4).max(4).build()?;
    let mut rows = Vec::new();
    for users in [1, 4] {
        eprintln!("==> {cycles} pool cycles, {users} user(s)");
        rows.push(pooled(&pool, users, cycles)?);
    }
    drop(pool);
    eprintln!("==> {cold} cold cycles");
    let started = Instant::now();
    let mut ms = Vec::new();
    for _ in 0..cold {
        let t = Instant::now();
        let vm = image.start(&config.clone().boot_always(true))?;
        let out = vm.exec_builder().argv(["true"]).output()?;
        assert!(out.success(), "true failed: {out:?}");
        vm.kill();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    rows.push(Row {
        what: "cold: boot → exec true → power off".into(),
        users: 1,
        ms,
        wall: started.elapsed(),
    });
    println!("| cycle | users | cycles | median (ms) | p99 (ms) | cycles/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for mut r in rows {
        r.ms.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} |",
            r.what,
            r.users,
            r.ms.len(),
            percentile(&r.ms, 0.5),
            percentile(&r.ms, 0.99),
            r.ms.len() as f64 / r.wall.as_secs_f64()
        );
    }
    Ok(())
}
