//! `cargo xtask fuzz`: runs the fuzz targets in `fuzz/` with cargo-fuzz (libFuzzer +
//! AddressSanitizer) for a fixed time each. Installs cargo-fuzz when it is missing.
//!
//! cargo-fuzz needs nightly compiler flags; the machine has one stable toolchain, so we set
//! `RUSTC_BOOTSTRAP=1`, which lets stable rustc accept them.

use std::process::Command;

use anyhow::Result;

use crate::util::{cargo, have_command, run, step, workspace_root};

/// The fuzz targets (`fuzz/fuzz_targets/*.rs`).
const TARGETS: &[&str] = &[
    "blk_request",
    "vsock_packet",
    "net_queue",
    "oci_layer",
    "oci_documents",
    "agent_frames",
    "snapshot_state",
];

pub fn run_all(seconds: u64) -> Result<()> {
    let installed = have_command("cargo-fuzz")
        || std::env::var_os("HOME")
            .map(|h| {
                std::path::Path::new(&h)
                    .join(".cargo/bin/cargo-fuzz")
                    .exists()
            })
            .unwrap_or(false);
    if !installed {
        step("fuzz: installing cargo-fuzz from crates.io");
        run(cargo().args(["install", "--locked", "cargo-fuzz"]))?;
    }
    // The time budget is shared by the targets.
    let seconds = (seconds / TARGETS.len() as u64).max(10);
    for target in TARGETS {
        step(&format!("fuzz: {target} for {seconds} s"));
        run(
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .current_dir(workspace_root())
                .env("RUSTC_BOOTSTRAP", "1")
                .args(["fuzz", "run", target, "--"])
                .arg(format!("-max_total_time={seconds}"))
                // A single input running this long is a hang: fail loudly.
                .arg("-timeout=10")
                .arg("-rss_limit_mb=4096"),
        )?;
    }
    Ok(())
}
