//! A warm pool serving many short jobs: the image is baked once, VMs are restored ahead of
//! demand, and every job gets a fresh VM (nothing leaks from one job to the next).
//!
//! `cargo run --example pool -- [IMAGE]` (default `busybox`).

use std::sync::atomic::{AtomicUsize, Ordering};

fn main() -> supermachine::Result<()> {
    let reference = std::env::args().nth(1).unwrap_or_else(|| "busybox".into());
    let image = supermachine::Image::open(&reference)?;
    let pool = image
        .pool()
        .config(supermachine::VmConfig::new().memory_mib(128))
        .min(2)
        .max(4)
        .build()?;
    let leaked = AtomicUsize::new(0);
    std::thread::scope(|s| -> supermachine::Result<()> {
        let workers: Vec<_> = (0..4)
            .map(|worker| {
                let (pool, leaked) = (&pool, &leaked);
                s.spawn(move || -> supermachine::Result<()> {
                    for job in 0..5 {
                        let vm = pool.acquire()?;
                        // A previous job's file would show here.
                        if vm.read_file("/tmp/job").is_ok() {
                            leaked.fetch_add(1, Ordering::SeqCst);
                        }
                        vm.write_file("/tmp/job", format!("{worker}.{job}").as_bytes())?;
                        let out = vm
                            .exec_builder()
                            .argv([
                                "sh",
                                "-c",
                                "expr $(cut -d. -f1 /tmp/job) \\* 10 + $(cut -d. -f2 /tmp/job)",
                            ])
                            .output()?;
                        println!(
                            "job {worker}.{job} -> {}",
                            String::from_utf8_lossy(&out.stdout).trim()
                        );
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a worker panicked")?;
        }
        Ok(())
    })?;
    let stats = pool.settle(std::time::Duration::from_secs(60));
    println!(
        "jobs seen another job's file: {}; acquired {}, restored {}, in use {}",
        leaked.load(Ordering::SeqCst),
        stats.acquired,
        stats.restored,
        stats.in_use
    );
    Ok(())
}
