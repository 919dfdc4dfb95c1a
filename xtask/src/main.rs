//! `cargo xtask`: the project's build, test and benchmark driver.
//!
//! - `deps`: install the Debian packages and rustup targets the rest needs
//! - `kernel`, `initramfs`: build the guest kernel (cached) and the initramfs
//! - `boot [ARGS]`: build what is missing and boot a guest (`supermachine boot ARGS`), in the
//!   emulated KVM host when this machine's KVM cannot boot Linux
//! - `run [FLAGS] -- CMD`: the same for `supermachine run` on the busybox image
//! - `image [busybox|redis]`: build a test OCI image from Debian's packages
//! - `testhost -- CMD`: run CMD in the emulated KVM host
//! - `test`: unit tests, local-KVM tests, guest-booting integration tests, cross-target checks
//! - `fuzz`: run the device fuzz targets for a fixed time
//! - `bench toy|boot|blk`: VMM overhead on the toy guest, Linux boot time, virtio-blk I/O; each
//!   next to QEMU

mod arm64_cli;
mod bench;
mod bench_agent;
mod bench_net;
mod bench_pull;
mod bench_redis;
mod bench_restore;
mod bench_sandbox;
mod deps;
mod fuzz;
mod images;
mod initramfs;
mod kernel;
mod probe;
mod testhost;
mod testhost_arm64;
mod tests;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "supermachine's build, test and benchmark driver"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the Debian packages and rustup targets the build and tests need
    Deps,
    /// Build the guest kernel from Debian's linux-source-6.1 (cached by config hash)
    Kernel {
        /// x86_64 (the default) or aarch64 (cross-built, installed as Image-aarch64, then
        /// booted to init under QEMU as a check)
        #[arg(long, default_value = "x86_64")]
        arch: String,
    },
    /// Build the initramfs: guest-init as /init plus busybox
    Initramfs {
        /// x86_64 (the default) or aarch64 (cross-built, installed as initramfs-aarch64.cpio)
        #[arg(long, default_value = "x86_64")]
        arch: String,
    },
    /// Set up everything and run the busybox image: `cargo xtask run [RUN-FLAGS] -- COMMAND...`;
    /// `--arch aarch64` runs the arm64 busybox image with the arm64 CLI in the emulated arm64
    /// host
    Run {
        /// `supermachine run` flags, then `--` and the command
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build a test image as an OCI layout at target/images/NAME: `busybox` (Debian's
    /// busybox-static), `busybox-arm64` (the same for linux/arm64) or `redis` (busybox plus
    /// Debian's redis-server and redis-benchmark)
    Image {
        /// Which image
        #[arg(default_value = "busybox", value_parser = ["busybox", "busybox-arm64", "redis"])]
        name: String,
    },
    /// Set up everything and boot a guest: `cargo xtask boot -- /bin/sh -c 'nproc; exit 3'`
    Boot {
        /// Arguments for `supermachine boot`
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a command inside an emulated host that has a real KVM (x86-64, or arm64 with --arch)
    Testhost {
        /// Memory of the emulated host in MiB
        #[arg(short, long, default_value_t = 4096)]
        memory: u32,
        /// vCPUs of the emulated host
        #[arg(short, long)]
        cpus: Option<usize>,
        /// Working directory for the command
        #[arg(short = 'C', long)]
        dir: Option<PathBuf>,
        /// Kill the emulated host (and dump its CPUs) after this many seconds without output
        #[arg(long)]
        silence: Option<u64>,
        /// The emulated machine: x86_64 (runs this machine's programs) or aarch64 (Debian's
        /// arm64 kernel with KVM, a static arm64 busybox userland)
        #[arg(long, default_value = "x86_64")]
        arch: String,
        /// The command
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Build the arm64 guest kernel and our VMM for arm64, boot the guest with it on KVM in the
    /// emulated arm64 host (2 vCPUs, its exit status carried out), then check the arm64 CLI
    /// there (run, -d -p + exec, bake, restore)
    Arm64Check,
    /// Run every test: unit, local KVM, guest boots (emulated host if needed), cross checks
    Test {
        /// Run guest tests directly on this machine's KVM even if the probe says it cannot
        #[arg(long)]
        local: bool,
        /// Only these suites of guest-booting tests (repeatable), after building what they need
        #[arg(long, value_enum)]
        suite: Vec<tests::GuestSuite>,
    },
    /// Fuzz the device models (cargo-fuzz, libFuzzer + ASan) for SECONDS per target
    Fuzz {
        /// Seconds per target
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run each test of a test binary in its own process with a time limit (used inside the
    /// emulated host by `test`)
    #[command(hide = true)]
    IsolatedTests {
        /// Seconds per test
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The test binary
        binary: std::path::PathBuf,
        /// Only these tests (default: all)
        tests: Vec<String>,
    },
    /// Keep one idle KVM VM alive in the background (inside the emulated host, see testhost.rs)
    #[command(hide = true)]
    HoldKvm,
    /// Benchmarks, each next to QEMU in the same run
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Deps => deps::ensure().map(|_| 0),
        Cmd::Kernel { arch } => kernel::Arch::parse(&arch).and_then(|arch| {
            let image = kernel::build_for(arch)?;
            // The arm64 kernel cannot boot under this machine's KVM: prove it under QEMU.
            if arch == kernel::Arch::Aarch64 {
                testhost_arm64::check_guest_kernel(&image)?;
            }
            Ok(0)
        }),
        Cmd::Initramfs { arch } => {
            kernel::Arch::parse(&arch).and_then(|arch| initramfs::build_for(arch).map(|_| 0))
        }
        Cmd::Image { name } => match name.as_str() {
            "redis" => images::redis(),
            "busybox-arm64" => images::busybox_arm64(),
            _ => images::busybox(),
        }
        .map(|p| {
            println!("oci:{}:latest", p.display());
            0
        }),
        Cmd::Boot { args } => tests::boot(&args),
        Cmd::Run { args } => tests::run_image(&args),
        Cmd::Testhost {
            memory,
            cpus,
            dir,
            silence,
            arch,
            command,
        } => {
            let mut opts = testhost::Options {
                memory_mib: memory,
                silence_limit: silence.map(std::time::Duration::from_secs),
                ..Default::default()
            };
            if let Some(c) = cpus {
                opts.cpus = c;
            }
            if let Some(d) = dir {
                opts.cwd = d;
            }
            match arch.as_str() {
                "x86_64" | "amd64" => testhost::run_command(&command, &opts),
                "aarch64" | "arm64" => testhost_arm64::run_command(&command, &opts),
                other => Err(anyhow::anyhow!(
                    "unknown --arch {other:?} (x86_64 or aarch64)"
                )),
            }
        }
        Cmd::Test { local, suite } if suite.is_empty() => tests::run_all(local).map(|_| 0),
        Cmd::Test { local, suite } => tests::run_only(local, &suite).map(|_| 0),
        Cmd::Fuzz { seconds } => fuzz::run_all(seconds).map(|_| 0),
        Cmd::Bench { which } => bench::run(which).map(|_| 0),
        Cmd::Arm64Check => kernel::build_for(kernel::Arch::Aarch64).and_then(|image| {
            testhost_arm64::check_guest_kernel(&image)?;
            testhost_arm64::check_vmm_boot(&image)?;
            arm64_cli::check_cli()?;
            Ok(0)
        }),
        Cmd::HoldKvm => testhost::hold_kvm().map(|_| 0),
        Cmd::IsolatedTests {
            timeout,
            binary,
            tests,
        } => tests::run_isolated(&binary, &tests, timeout),
    };
    match result {
        // A wedged or crashed emulated host (negative codes) is a failure, not a success.
        Ok(code) if code < 0 => ExitCode::from(125),
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
