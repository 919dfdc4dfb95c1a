//! arm64: the 16550 UART and the exit-status register on the MMIO bus (no port I/O), virtio-mmio
//! slots with SPIs, declared to the guest in the device tree.

use std::sync::{Arc, Mutex};

use devices::legacy::{ExitStatusPort, SerialConsole};
use vmm_core::arch::aarch64::layout::{
    EXIT_STATUS_ADDR, RAM_START, UART_ADDR, UART_SPI, VIRTIO_MMIO_START, VIRTIO_SPI_START,
};
use vmm_core::{VmBuilder, VmControl};

use crate::BootError;

/// The kernel parameters every guest gets: console on the UART, reboot on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

/// The UART's interrupt line (an SPI number, counted from the first SPI).
pub const SERIAL_IRQ: u32 = UART_SPI;

/// The UART and the exit-status register, on the MMIO bus. (Reset and power-off come through
/// PSCI, which the backend turns into VM exits.)
pub fn add_legacy_devices(
    builder: &mut VmBuilder,
    serial: Arc<Mutex<SerialConsole>>,
    control: &VmControl,
) -> Result<(), BootError> {
    builder.add_mmio_device(serial, UART_ADDR, 8)?;
    builder.add_mmio_device(
        Arc::new(Mutex::new(ExitStatusPort::new(control.clone()))),
        EXIT_STATUS_ADDR,
        4,
    )?;
    Ok(())
}

/// Virtio-mmio slot `slot`'s base address and SPI; `Err` with the number of slots when there
/// is no such slot.
pub fn virtio_slot(slot: usize, slot_size: u64) -> Result<(u64, u32), usize> {
    let max = ((RAM_START - VIRTIO_MMIO_START) / slot_size).min(64) as usize;
    if slot >= max {
        return Err(max);
    }
    Ok((
        VIRTIO_MMIO_START + slot as u64 * slot_size,
        VIRTIO_SPI_START + slot as u32,
    ))
}

/// Lists a virtio-mmio device in the device tree the guest boots with.
pub fn declare_virtio(builder: &mut VmBuilder, addr: u64, irq: u32) {
    builder.declare_mmio_device(vmm_core::builder::DeclaredDevice {
        addr,
        len: devices::virtio::MMIO_SLOT_SIZE,
        irq,
    });
}
