//! `cargo xtask bench redis`: requests/s of a Redis server VM (`cargo xtask image redis`)
//! reached through a published port (`-p`, from the host) against the same server reached from
//! inside its own guest (`supermachine exec VM redis-benchmark`), at 1 and 20 connections.
//! The ratio is what the published-port path (host listener → vsock → guest agent → guest TCP)
//! keeps of the server's own rate. Runs in the emulated KVM host on one emulated CPU when this
//! machine's KVM cannot boot Linux (with two, the emulation breaks nested guests under this
//! load: see `LOAD_SUITE` in tests.rs).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench_agent::BenchVm;
use crate::util::step;

/// Host port the benchmark publishes the guest's 6379 on.
const HOST_PORT: u16 = 16379;

/// One redis-benchmark run: (SET requests/s, GET requests/s, GET p50 latency ms).
#[derive(Clone, Copy)]
struct Rates {
    set: f64,
    get: f64,
    get_p50: f64,
}

/// Parses `redis-benchmark --csv`: a header, then `"SET","rps","avg",min,p50,...` lines.
fn parse_csv(text: &str) -> Result<Rates> {
    let mut set = None;
    let mut get = None;
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        let (Some(name), Some(rps), Some(p50)) = (fields.first(), fields.get(1), fields.get(4))
        else {
            continue;
        };
        let (Ok(rps), Ok(p50)) = (rps.parse::<f64>(), p50.parse::<f64>()) else {
            continue;
        };
        match *name {
            "SET" => set = Some(rps),
            "GET" => get = Some((rps, p50)),
            _ => {}
        }
    }
    match (set, get) {
        (Some(set), Some((get, get_p50))) => Ok(Rates { set, get, get_p50 }),
        _ => bail!("redis-benchmark printed no SET and GET rates: {text:?}"),
    }
}

fn benchmark_args(port: u16, requests: usize, connections: usize) -> Vec<String> {
    [
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-n",
        &requests.to_string(),
        "-c",
        &connections.to_string(),
        "-t",
        "set,get",
        "--csv",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_benchmark(mut cmd: Command) -> Result<Rates> {
    let out = cmd
        .output()
        .context("redis-benchmark (Debian's redis-tools; `cargo xtask deps` installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "redis-benchmark failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_csv(&text)
}

/// Waits until the published port answers PING.
fn wait_for_pong(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "ping"])
            .output()
            .context("redis-cli (Debian's redis-tools)")?;
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the Redis VM does not answer on port {port}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn bench(supermachine: &Path, runs: usize, requests: usize) -> Result<()> {
    step("redis benchmark: a detached Redis VM (default memory) behind -p");
    let publish = format!("127.0.0.1:{HOST_PORT}:6379");
    let vm = BenchVm::start_image(
        supermachine,
        "redis",
        "bench-redis",
        &["-p", &publish, "--"],
    )?;
    wait_for_pong(HOST_PORT)?;
    let mut rows = Vec::new();
    for connections in [1usize, 20] {
        let (mut port, mut inside) = (Vec::new(), Vec::new());
        // Alternated, so that drift in the emulated host touches both alike.
        for run in 0..runs {
            step(&format!(
                "{connections} connection(s), run {} of {runs}",
                run + 1
            ));
            let mut host = Command::new("redis-benchmark");
            host.args(benchmark_args(HOST_PORT, requests, connections));
            port.push(run_benchmark(host)?);
            let mut guest = vm.cli(&["exec", &vm.id, "redis-benchmark"]);
            guest.args(benchmark_args(6379, requests, connections));
            inside.push(run_benchmark(guest)?);
        }
        rows.push((connections, port, inside));
    }
    println!(
        "\nRedis behind a published port vs the same server reached inside its guest: \
         redis-benchmark -n {requests} -t set,get, median of {runs} runs\n"
    );
    println!(
        "| connections | path | SET req/s | GET req/s | GET p50 (ms) | vs inside (SET / GET) |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for (connections, port, inside) in rows {
        let m = |v: &[Rates], f: fn(&Rates) -> f64| median(v.iter().map(f).collect());
        let (in_set, in_get) = (m(&inside, |r| r.set), m(&inside, |r| r.get));
        for (path, rates) in [("-p from the host", &port), ("inside the guest", &inside)] {
            let (set, get) = (m(rates, |r| r.set), m(rates, |r| r.get));
            println!(
                "| {connections} | {path} | {set:.0} | {get:.0} | {:.2} | {:.0} % / {:.0} % |",
                m(rates, |r| r.get_p50),
                100.0 * set / in_set,
                100.0 * get / in_get
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rates_are_read() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"SET\",\"750.19\",\"26.4\",\"2.1\",\"25.1\",\"40.0\",\"50.0\",\"60.0\"\n\
                    \"GET\",\"690.00\",\"28.0\",\"2.0\",\"27.5\",\"41.0\",\"51.0\",\"61.0\"\n";
        let r = parse_csv(text).unwrap();
        assert_eq!((r.set, r.get, r.get_p50), (750.19, 690.0, 27.5));
        assert!(parse_csv("\"SET\",\"1\"\n").is_err());
    }
}
