//! Boots a kernel and initramfs with the serial console on this terminal and exits with the
//! guest's status: the machine layer alone, without images or the CLI (how the arm64 backend
//! is first tried in the emulated arm64 host).
//!
//! `boot KERNEL [INITRAMFS] [--cpus N] [--memory MIB] [-- KERNEL PARAMETERS...]`

use std::path::PathBuf;
use std::process::ExitCode;

use vmm_core::builder::InitramfsPart;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let (mut vcpus, mut memory_mib, mut cmdline) = (1u8, 256u32, String::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cpus" => vcpus = args.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--memory" => memory_mib = args.next().and_then(|v| v.parse().ok()).unwrap_or(256),
            "--" => cmdline = args.by_ref().collect::<Vec<_>>().join(" "),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let Some(kernel) = positional.first().cloned() else {
        eprintln!("usage: boot KERNEL [INITRAMFS] [--cpus N] [--memory MIB] [-- PARAMS...]");
        return ExitCode::from(2);
    };
    let initramfs = positional
        .get(1)
        .map(|p| vec![InitramfsPart::File(p.clone())])
        .unwrap_or_default();
    let outcome = vmm::boot(vmm::MachineConfig {
        kernel,
        initramfs,
        cmdline,
        memory_mib,
        vcpus,
        console: Box::new(std::io::stdout()),
        console_input: None,
        disks: Vec::new(),
        consoles: Vec::new(),
        control: None,
        vsock: None,
        net: None,
        shares: Vec::new(),
        snapshot: None,
        on_started: None,
    });
    match outcome {
        Ok(o) => {
            eprintln!("boot: the guest ended: {:?}", o.exit);
            ExitCode::from(o.status().map(|s| s as u8).unwrap_or(125))
        }
        Err(e) => {
            eprintln!("boot: {e}");
            ExitCode::from(125)
        }
    }
}
