//! Where devices go in the guest: the legacy port-I/O devices and the virtio-mmio slots, each
//! with its interrupt line, doorbells and kernel command-line declaration.

use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::legacy::SerialConsole;
use vmm_core::{VmBuilder, VmControl};

use crate::{BootError, ConsoleSpec, DiskSpec, NetSpec, GUEST_CID};

/// Puts a virtio device in MMIO slot `slot`: bus, interrupt line, ioeventfds for its queues,
/// the event loop, and (for a boot, not a restore) its declaration on the kernel command line.
/// With `from`, the transport continues from a snapshot's state.
pub(crate) fn attach_virtio(
    builder: &mut VmBuilder,
    event_loop: &mut devices::event_loop::EventLoop,
    slot: usize,
    kind: crate::snapshot::DeviceKind,
    device: Box<dyn devices::virtio::VirtioDevice>,
    from: Option<&devices::virtio::TransportState>,
) -> Result<crate::snapshot::LiveDevice, BootError> {
    use devices::virtio::{MmioTransport, MMIO_SLOT_SIZE, NOTIFY_REG_OFFSET};
    let (addr, irq) =
        crate::arch::virtio_slot(slot, MMIO_SLOT_SIZE).map_err(BootError::TooManyDevices)?;
    let memory = builder.memory().clone();
    let trigger = builder.irq_trigger(irq)?;
    let transport = match from {
        None => MmioTransport::new(device, memory, trigger),
        Some(state) => MmioTransport::restore(device, memory, trigger, state),
    }
    .map_err(|e| BootError::Device(e.to_string()))?;
    for (queue, fd) in transport.queue_events().into_iter().enumerate() {
        builder
            .vm()
            .register_ioevent(fd, addr + NOTIFY_REG_OFFSET, queue as u32)?;
    }
    let transport = Arc::new(Mutex::new(transport));
    builder.add_mmio_device(transport.clone(), addr, MMIO_SLOT_SIZE)?;
    event_loop.add_transport(transport.clone());
    if from.is_none() {
        crate::arch::declare_virtio(builder, addr, irq);
    }
    Ok(crate::snapshot::LiveDevice {
        slot: slot as u32,
        kind,
        transport,
    })
}

/// Each disk as virtio-blk, in order (`/dev/vda`, …).
pub(crate) fn attach_disks(
    builder: &mut VmBuilder,
    event_loop: &mut devices::event_loop::EventLoop,
    disks: &[DiskSpec],
) -> Result<Vec<crate::snapshot::LiveDevice>, BootError> {
    let mut live = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let block = devices::virtio::block::Block::open(&disk.path, disk.read_only)?;
        live.push(attach_disk(builder, event_loop, i, disk, block, None)?);
    }
    Ok(live)
}

pub(crate) fn attach_disk(
    builder: &mut VmBuilder,
    event_loop: &mut devices::event_loop::EventLoop,
    slot: usize,
    disk: &DiskSpec,
    block: devices::virtio::block::Block,
    from: Option<&devices::virtio::TransportState>,
) -> Result<crate::snapshot::LiveDevice, BootError> {
    let kind = crate::snapshot::DeviceKind::Block {
        path: std::fs::canonicalize(&disk.path).unwrap_or_else(|_| disk.path.clone()),
        read_only: disk.read_only,
        sectors: block.sectors(),
    };
    attach_virtio(builder, event_loop, slot, kind, Box::new(block), from)
}

/// Each console as a single-port virtio-console, in order (`/dev/hvc0`, …), from `first_slot`.
pub(crate) fn attach_consoles(
    builder: &mut VmBuilder,
    event_loop: &mut devices::event_loop::EventLoop,
    first_slot: usize,
    consoles: Vec<ConsoleSpec>,
    from: Option<&devices::virtio::TransportState>,
) -> Result<Vec<crate::snapshot::LiveDevice>, BootError> {
    let mut live = Vec::new();
    for (i, spec) in consoles.into_iter().enumerate() {
        let console = devices::virtio::console::Console::new(spec.output)
            .map_err(|e| BootError::Device(e.to_string()))?;
        if let Some(ready) = spec.on_ready {
            ready(console.input());
        }
        live.push(attach_virtio(
            builder,
            event_loop,
            first_slot + i,
            crate::snapshot::DeviceKind::Console,
            Box::new(console),
            from,
        )?);
    }
    Ok(live)
}

/// The vsock device (guest CID [`GUEST_CID`]) with its host side on `socket`.
pub(crate) fn attach_vsock(
    builder: &mut VmBuilder,
    event_loop: &mut devices::event_loop::EventLoop,
    slot: usize,
    socket: PathBuf,
    from: Option<&devices::virtio::TransportState>,
) -> Result<crate::snapshot::LiveDevice, BootError> {
    let vsock = devices::virtio::vsock::Vsock::new(GUEST_CID, socket)
        .map_err(|e| BootError::Device(e.to_string()))?;
    attach_virtio(
        builder,
        event_loop,
        slot,
        crate::snapshot::DeviceKind::Vsock { cid: GUEST_CID },
        Box::new(vsock),
        from,
    )
}

/// The virtio-net device with `spec`'s host side.
pub(crate) fn attach_net(
    builder: &mut VmBuilder,
    event_loop: &mut devices::event_loop::EventLoop,
    slot: usize,
    mac: [u8; 6],
    spec: NetSpec,
    from: Option<&devices::virtio::TransportState>,
) -> Result<crate::snapshot::LiveDevice, BootError> {
    let net = devices::virtio::net::Net::new(mac, spec.mtu, spec.backend);
    attach_virtio(
        builder,
        event_loop,
        slot,
        crate::snapshot::DeviceKind::Net { mac },
        Box::new(net),
        from,
    )
}

/// Feeds `input` to the guest console from a background thread, as fast as its FIFO drains.
pub(crate) fn forward_input(
    mut input: Box<dyn Read + Send>,
    serial: Arc<Mutex<SerialConsole>>,
    control: VmControl,
) {
    let _ = std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut rest = &buf[..n];
                while !rest.is_empty() && !control.is_stopping() {
                    let taken = serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(rest);
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        });
}
