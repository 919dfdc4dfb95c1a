//! Booting a machine from its configuration and running it to the end.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::legacy::SerialConsole;
use vmm_core::builder::InitramfsPart;
use vmm_core::{VmBuilder, VmResources};

use crate::slots::{
    attach_consoles, attach_disks, attach_net, attach_virtio, attach_vsock, forward_input,
};
use crate::{open_hypervisor, BootError, BootOutcome, MachineConfig, DEFAULT_CMDLINE, GUEST_MAC};

/// Boots the machine and runs it to the end.
pub fn boot(opts: MachineConfig) -> Result<BootOutcome, BootError> {
    if !opts.kernel.exists() {
        return Err(BootError::KernelMissing(opts.kernel));
    }
    for part in &opts.initramfs {
        if let InitramfsPart::File(path) = part {
            if !path.exists() {
                return Err(BootError::InitramfsMissing(path.clone()));
            }
        }
    }
    let base_initramfs = opts.initramfs.iter().find_map(|p| match p {
        InitramfsPart::File(path) => Some(path.clone()),
        InitramfsPart::Bytes(_) => None,
    });
    let mut cmdline = DEFAULT_CMDLINE.to_string();
    if !opts.cmdline.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(opts.cmdline.trim());
    }

    let hypervisor = open_hypervisor()?;
    let resources = VmResources {
        kernel: opts.kernel,
        initramfs: opts.initramfs,
        cmdline,
        memory_mib: opts.memory_mib,
        vcpus: opts.vcpus,
    };
    let control = opts.control.clone().unwrap_or_default();
    let memory_mib = resources.memory_mib;
    let identity =
        crate::snapshot::Identity::here(Some(&resources.kernel), base_initramfs.as_deref());
    let mut builder = VmBuilder::new(hypervisor.as_ref(), resources)?;
    let marker_seen = crate::snapshot::MarkerSeen::default();
    let console: Box<dyn Write + Send> = match &opts.snapshot {
        Some(req) => Box::new(crate::snapshot::MarkerWatch {
            inner: opts.console,
            marker: req.when_output.as_bytes().to_vec(),
            tail: Vec::new(),
            seen: marker_seen.clone(),
            done: false,
        }),
        None => opts.console,
    };
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        builder.irq_trigger(crate::arch::SERIAL_IRQ)?,
        console,
    )));
    crate::arch::add_legacy_devices(&mut builder, serial.clone(), &control)?;
    let mut event_loop =
        devices::event_loop::EventLoop::new().map_err(|e| BootError::Device(e.to_string()))?;
    let mut live = attach_disks(&mut builder, &mut event_loop, &opts.disks)?;
    let consoles = opts.consoles.len();
    live.extend(attach_consoles(
        &mut builder,
        &mut event_loop,
        opts.disks.len(),
        opts.consoles,
        None,
    )?);
    let mut next_slot = opts.disks.len() + consoles;
    if let Some(socket) = opts.vsock {
        live.push(attach_vsock(
            &mut builder,
            &mut event_loop,
            next_slot,
            socket,
            None,
        )?);
        next_slot += 1;
    }
    if let Some(spec) = opts.net {
        live.push(attach_net(
            &mut builder,
            &mut event_loop,
            next_slot,
            GUEST_MAC,
            spec,
            None,
        )?);
        next_slot += 1;
    }
    for share in &opts.shares {
        let fs = share_device(share)?;
        live.push(attach_virtio(
            &mut builder,
            &mut event_loop,
            next_slot,
            crate::snapshot::DeviceKind::Fs {
                tag: share.tag.clone(),
                dir: share.dir.clone(),
            },
            fs,
            None,
        )?);
        next_slot += 1;
    }
    let vm = builder.build()?;
    let snapshotter = crate::snapshot::Snapshotter {
        control: control.clone(),
        serial: serial.clone(),
        devices: live,
        identity,
        memory_mib,
    };
    if let Some(input) = opts.console_input {
        forward_input(input, serial.clone(), control.clone());
    }
    let devices = event_loop
        .start()
        .map_err(|e| BootError::Device(e.to_string()))?;
    if let Some(on_started) = opts.on_started {
        on_started(snapshotter.clone());
    }
    let marker_snapshot = opts.snapshot.map(|req| {
        let control = control.clone();
        std::thread::spawn(move || {
            if !marker_seen.wait(|| control.is_stopping()) {
                return None;
            }
            Some(snapshotter.take(&req.dir, None, crate::snapshot::AfterSnapshot::Stop))
        })
    });
    crate::seccomp::install_if_enabled()?;
    if let Some(setup) = crate::seccomp::vcpu_thread_setup() {
        control.set_vcpu_thread_setup(setup);
    }
    let exit = vmm_core::runner::run(vm, &control);
    devices.stop();
    let exit = exit?;
    if let Some(thread) = marker_snapshot {
        match thread.join() {
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) | Err(_) => return Err(BootError::NoSnapshot(exit)),
        }
    }
    Ok(BootOutcome { exit })
}

/// The virtio-fs device sharing `share`'s directory.
#[cfg(feature = "virtiofs")]
fn share_device(
    share: &crate::ShareSpec,
) -> Result<Box<dyn devices::virtio::VirtioDevice>, BootError> {
    let fs = virtiofs::Fs::new(&share.tag, &share.dir, share.read_only)
        .map_err(|e| BootError::Device(e.to_string()))?
        .allow_special_files(share.special_files);
    Ok(Box::new(fs))
}

/// Shares need virtio-fs, which this build leaves out.
#[cfg(not(feature = "virtiofs"))]
fn share_device(
    share: &crate::ShareSpec,
) -> Result<Box<dyn devices::virtio::VirtioDevice>, BootError> {
    Err(BootError::Device(format!(
        "cannot share {}: this build has no virtio-fs (the `virtiofs` feature)",
        share.dir.display()
    )))
}
