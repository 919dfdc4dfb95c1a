//! `cargo xtask bench sandbox`: the live-sandbox verbs on a detached busybox VM of 256 MiB whose
//! guest has written 96 MiB — `pause` → `unpause` round trips (each a CLI call through the VM's
//! control socket), and `fork -n N` (wall time, and each clone's host RSS and PSS: what the
//! clones cost together against N copies of the source). Runs in the emulated KVM host when
//! this machine's KVM cannot boot Linux, so times there are inflated.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::bench_agent::BenchVm;
use crate::util::step;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (RSS, PSS) of a process, in KiB.
fn rss_pss(pid: u64) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let kib = |key: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((kib("Rss:"), kib("Pss:")))
}

fn vm_pid(vm: &BenchVm, name: &str) -> Result<u64> {
    let out = vm.cli(&["inspect", name]).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("inspect")?;
    v[0]["State"]["Pid"]
        .as_u64()
        .with_context(|| format!("no pid for {name}: {v}"))
}

fn ok(vm: &BenchVm, args: &[&str]) -> Result<String> {
    let out = vm.cli(args).output()?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn bench(supermachine: &Path, rounds: usize, clones: usize) -> Result<()> {
    step("sandbox benchmark: a detached busybox VM, 256 MiB, 96 MiB written in the guest");
    let vm = BenchVm::start_image(
        supermachine,
        "busybox",
        "bench-sandbox",
        &["-m", "256m", "--", "sleep", "1000000"],
    )?;
    ok(
        &vm,
        &[
            "exec",
            &vm.id,
            "dd",
            "if=/dev/zero",
            "of=/dev/shm/fill",
            "bs=1M",
            "count=96",
        ],
    )?;

    step(&format!("pause → unpause, {rounds} rounds"));
    let (mut pause, mut unpause, mut ps) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        // The CLI's own start-up and registry read, for comparison.
        let t = Instant::now();
        ok(&vm, &["ps", "-q"])?;
        ps.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        ok(&vm, &["pause", &vm.id])?;
        pause.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        ok(&vm, &["unpause", &vm.id])?;
        unpause.push(t.elapsed().as_secs_f64() * 1e3);
    }

    step(&format!("fork to {clones} clones"));
    let (source_rss, source_pss) = rss_pss(vm_pid(&vm, &vm.id)?)?;
    let t = Instant::now();
    let ids = ok(
        &vm,
        &[
            "fork",
            "-n",
            &clones.to_string(),
            "--name",
            "bench-clone",
            &vm.id,
        ],
    )?;
    let fork_ms = t.elapsed().as_secs_f64() * 1e3;
    let ids: Vec<String> = ids.lines().map(str::to_string).collect();
    let mut sizes = Vec::new();
    for id in &ids {
        sizes.push(rss_pss(vm_pid(&vm, id)?)?);
    }
    for id in &ids {
        let _ = vm.cli(&["rm", "-f", id]).output();
    }
    if ids.len() != clones {
        bail!("fork made {} clones of {clones}", ids.len());
    }
    let rss: u64 = sizes.iter().map(|s| s.0).sum();
    let pss: u64 = sizes.iter().map(|s| s.1).sum();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "\nLive sandbox verbs, a detached busybox VM of 256 MiB (96 MiB written in the guest)\n"
    );
    println!("| what | median (ms) | min (ms) | max (ms) |");
    println!("|---|---:|---:|---:|");
    for (what, v) in [
        ("pause (CLI call)", &pause),
        ("unpause (CLI call)", &unpause),
        ("ps -q (CLI call, for comparison)", &ps),
    ] {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        println!(
            "| {what} | {:.1} | {min:.1} | {max:.1} |",
            median(v.clone())
        );
    }
    println!(
        "\nfork -n {clones}: {fork_ms:.0} ms in all ({:.0} ms a clone); source RSS {:.0} MiB \
         (PSS {:.0}); the {clones} clones: RSS {:.0} MiB in all, PSS {:.0} MiB in all \
         ({:.1} MiB a clone, {:.0} % of {clones} × the source's RSS)",
        fork_ms / clones as f64,
        mib(source_rss),
        mib(source_pss),
        mib(rss),
        mib(pss),
        mib(pss) / clones as f64,
        100.0 * pss as f64 / (clones as f64 * source_rss as f64)
    );
    Ok(())
}
