//! x86-64: COM1, the i8042 reset line and the exit-status port on the port-I/O bus; virtio-mmio
//! slots declared to the kernel on its command line.

use std::sync::{Arc, Mutex};

use devices::legacy::{ExitStatusPort, I8042ResetLine, SerialConsole};
use vmm_core::arch::x86_64::layout::{
    COM1_IRQ, COM1_PORT, EXIT_STATUS_PORT, I8042_COMMAND_PORT, IRQ_BASE, IRQ_MAX, VIRTIO_MMIO_START,
};
use vmm_core::{VmBuilder, VmControl};

use crate::BootError;

/// The kernel parameters every guest gets: console on COM1, reset through the i8042 on reboot
/// or panic, no port-0x80 delays.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 io_delay=none";

/// The serial console's interrupt line.
pub const SERIAL_IRQ: u32 = COM1_IRQ;

/// COM1, the i8042 reset line and the exit-status port, on the port-I/O bus.
pub fn add_legacy_devices(
    builder: &mut VmBuilder,
    serial: Arc<Mutex<SerialConsole>>,
    control: &VmControl,
) -> Result<(), BootError> {
    builder.add_pio_device(serial, COM1_PORT, 8)?;
    builder.add_pio_device(
        Arc::new(Mutex::new(I8042ResetLine::new(control.clone()))),
        I8042_COMMAND_PORT,
        1,
    )?;
    builder.add_pio_device(
        Arc::new(Mutex::new(ExitStatusPort::new(control.clone()))),
        EXIT_STATUS_PORT,
        4,
    )?;
    Ok(())
}

/// Virtio-mmio slot `slot`'s base address and interrupt line; `Err` with the number of slots
/// when there is no such slot.
pub fn virtio_slot(slot: usize, slot_size: u64) -> Result<(u64, u32), usize> {
    let max = (IRQ_MAX - IRQ_BASE + 1) as usize;
    if slot >= max {
        return Err(max);
    }
    Ok((
        VIRTIO_MMIO_START + slot as u64 * slot_size,
        IRQ_BASE + slot as u32,
    ))
}

/// Tells a booting kernel about a virtio-mmio device (there is no device tree or ACPI).
pub fn declare_virtio(builder: &mut VmBuilder, addr: u64, irq: u32) {
    builder.append_cmdline(&format!("virtio_mmio.device=4K@{addr:#x}:{irq}"));
}
