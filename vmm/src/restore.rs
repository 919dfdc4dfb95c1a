//! Restoring a machine from a snapshot and running it to the end.

use std::sync::{Arc, Mutex};

use devices::legacy::SerialConsole;
use vmm_core::{GuestMemory, VmBuilder};

use crate::slots::{attach_consoles, attach_disk, attach_net, attach_vsock, forward_input};
use crate::{open_hypervisor, BootError, BootOutcome, DiskSpec, RestoreOptions};

/// Restores a snapshot and runs the VM to the end. Guest memory is mapped from the snapshot's
/// memory file copy-on-write: nothing is read until the guest touches it.
pub fn restore(opts: RestoreOptions) -> Result<BootOutcome, BootError> {
    let loaded =
        crate::snapshot::load(&opts.dir, opts.kernel.as_deref(), opts.initramfs.as_deref())?;
    restore_loaded(opts, loaded)
}

/// The first step of a restore: the hypervisor's VM over the snapshot's memory. It needs
/// nothing else, so a caller can make it on another thread while it sets up the rest (ports,
/// sockets) and hand it to [`restore_prepared`].
pub struct RestoreVm {
    builder: VmBuilder,
    /// When the restore began (for the restore-call timing).
    started: std::time::Instant,
}

/// Makes the VM of a restore of a snapshot loaded with [`crate::snapshot::load`] (see
/// [`RestoreVm`]): `memory` and the vCPU count are the snapshot's.
pub fn create_restore_vm(memory: &GuestMemory, vcpus: u8) -> Result<RestoreVm, BootError> {
    let started = std::time::Instant::now();
    crate::timings::mark("restore_started");
    let hypervisor = open_hypervisor()?;
    crate::timings::mark("hypervisor_opened");
    let builder = VmBuilder::from_memory(hypervisor.as_ref(), memory.clone(), vcpus)?;
    crate::timings::mark("restore_vm_created");
    Ok(RestoreVm { builder, started })
}

/// [`restore`] of a snapshot already read with [`crate::snapshot::load`].
pub fn restore_loaded(
    opts: RestoreOptions,
    loaded: crate::snapshot::LoadedSnapshot,
) -> Result<BootOutcome, BootError> {
    let vm = create_restore_vm(&loaded.memory, loaded.state.vcpus.len() as u8)?;
    restore_prepared(opts, loaded, vm)
}

/// [`restore_loaded`] with its VM made already ([`create_restore_vm`] of the same `loaded`).
pub fn restore_prepared(
    opts: RestoreOptions,
    loaded: crate::snapshot::LoadedSnapshot,
    vm: RestoreVm,
) -> Result<BootOutcome, BootError> {
    use crate::snapshot::DeviceKind;
    let RestoreVm {
        mut builder,
        started,
    } = vm;
    let state = loaded.state;
    let incompatible = |why: String| crate::snapshot::SnapshotError::Incompatible {
        dir: opts.dir.clone(),
        why,
    };
    let control = opts.control.clone().unwrap_or_default();
    let serial = SerialConsole::restore(
        builder.irq_trigger(crate::arch::SERIAL_IRQ)?,
        opts.console,
        &state.serial,
    )
    .map_err(incompatible)?;
    let serial = Arc::new(Mutex::new(serial));
    crate::arch::add_legacy_devices(&mut builder, serial.clone(), &control)?;
    let mut event_loop =
        devices::event_loop::EventLoop::new().map_err(|e| BootError::Device(e.to_string()))?;
    let mut consoles = opts.consoles.into_iter();
    let mut vsock_socket = opts.vsock;
    let mut net_backend = opts.net;
    let mut live = Vec::new();
    for d in &state.devices {
        let slot = d.slot as usize;
        let from = Some(&d.transport);
        let device = match &d.kind {
            DeviceKind::Block {
                path,
                read_only,
                sectors,
            } => {
                if let Some(why) = opts.disks.refuses(path, *read_only) {
                    return Err(incompatible(why).into());
                }
                let block = devices::virtio::block::Block::open(path, *read_only)?;
                if block.sectors() != *sectors {
                    return Err(incompatible(format!(
                        "disk {} has {} sectors, the snapshot was taken with {sectors}",
                        path.display(),
                        block.sectors()
                    ))
                    .into());
                }
                let spec = DiskSpec {
                    path: path.clone(),
                    read_only: *read_only,
                };
                attach_disk(&mut builder, &mut event_loop, slot, &spec, block, from)?
            }
            DeviceKind::Console => {
                let Some(spec) = consoles.next() else {
                    return Err(incompatible("it has more consoles than were given".into()).into());
                };
                attach_consoles(&mut builder, &mut event_loop, slot, vec![spec], from)?
                    .pop()
                    .ok_or_else(|| BootError::Device("console".into()))?
            }
            DeviceKind::Vsock { .. } => {
                let Some(socket) = vsock_socket.take() else {
                    return Err(incompatible(
                        "it has a vsock device and no socket was given".into(),
                    )
                    .into());
                };
                attach_vsock(&mut builder, &mut event_loop, slot, socket, from)?
            }
            DeviceKind::Net { mac } => {
                let Some(backend) = net_backend.take() else {
                    return Err(incompatible(
                        "it has a network device and no network was given (it was baked with a network: run it with one)".into(),
                    )
                    .into());
                };
                attach_net(&mut builder, &mut event_loop, slot, *mac, backend, from)?
            }
            DeviceKind::Fs { dir, .. } => {
                return Err(incompatible(format!(
                    "it shares the host directory {} (virtio-fs): shared directories are not part of a snapshot",
                    dir.display()
                ))
                .into());
            }
        };
        live.push(device);
    }
    let vm = builder.restore(&state.vm, &state.vcpus)?;
    crate::timings::mark("restore_state_set");
    // Now that the interrupt controllers hold their saved state, devices may interrupt.
    for device in &live {
        device
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finish_restore();
    }
    if let Some(input) = opts.console_input {
        forward_input(input, serial.clone(), control.clone());
    }
    crate::timings::mark("restore_devices_attached");
    let devices = event_loop
        .start()
        .map_err(|e| BootError::Device(e.to_string()))?;
    if let Some(on_started) = opts.on_started {
        on_started(crate::snapshot::Snapshotter {
            control: control.clone(),
            serial,
            devices: live,
            identity: state.identity.clone(),
            memory_mib: state.memory_mib,
        });
    }
    if std::env::var_os("SUPERMACHINE_TIMINGS").is_some() {
        eprintln!(
            "timings: restore={:.2}",
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    crate::seccomp::install_if_enabled()?;
    if let Some(setup) = crate::seccomp::vcpu_thread_setup() {
        control.set_vcpu_thread_setup(setup);
    }
    let exit = vmm_core::runner::run(vm, &control);
    devices.stop();
    Ok(BootOutcome { exit: exit? })
}
