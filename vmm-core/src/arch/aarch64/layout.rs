//! The arm64 guest physical layout: devices and the GIC in the first GiB, RAM from 2 GiB (so a
//! 32-bit DMA-capable region exists and kernels find RAM where they expect it).
//!
//! ```text
//! 0x0000_0000 ..                 unused (catches null-pointer accesses as MMIO faults)
//! GICR_BASE   .. GICD_BASE       GICv3 redistributors, 128 KiB per vCPU
//! GICD_BASE   .. + 64 KiB        GICv3 distributor
//! MMIO_START  ..                 UART, exit-status register, virtio-mmio devices
//! RAM_START   ..                 guest RAM
//! ```

/// The first byte of guest RAM.
pub const RAM_START: u64 = 0x8000_0000;
/// The GICv3 distributor.
pub const GICD_BASE: u64 = 0x3fff_0000;
/// Its size.
pub const GICD_SIZE: u64 = 0x1_0000;
/// One redistributor's frames (RD_base and SGI_base).
pub const GICR_SIZE_PER_CPU: u64 = 0x2_0000;
/// The most vCPUs: as many redistributors as fit below the distributor in the space we give
/// them.
pub const MAX_VCPUS: u8 = 64;
/// The redistributors, one after another, ending at the distributor.
pub const GICR_BASE: u64 = GICD_BASE - GICR_SIZE_PER_CPU * MAX_VCPUS as u64;
/// Where MMIO devices start.
pub const MMIO_START: u64 = 0x4000_0000;
/// The 16550 UART.
pub const UART_ADDR: u64 = MMIO_START;
/// The register guest-init writes its exit status to before powering off (arm64 has no port
/// I/O).
pub const EXIT_STATUS_ADDR: u64 = MMIO_START + 0x1000;
/// The first virtio-mmio device.
pub const VIRTIO_MMIO_START: u64 = MMIO_START + 0x2000;
/// The first shared peripheral interrupt (SPI) devices get; 0-31 are per CPU (SGIs and PPIs).
pub const SPI_BASE: u32 = 32;
/// The UART's SPI, as an offset from [`SPI_BASE`] (device trees count SPIs from 0).
pub const UART_SPI: u32 = 0;
/// The first SPI for virtio-mmio devices, as an offset from [`SPI_BASE`].
pub const VIRTIO_SPI_START: u32 = 1;

// The regions do not overlap: checked when this compiles.
const _: () = {
    assert!(GICR_BASE > 0);
    assert!(GICR_BASE + GICR_SIZE_PER_CPU * MAX_VCPUS as u64 == GICD_BASE);
    assert!(GICD_BASE + GICD_SIZE <= MMIO_START);
    assert!(UART_ADDR < EXIT_STATUS_ADDR && EXIT_STATUS_ADDR < VIRTIO_MMIO_START);
    assert!(VIRTIO_MMIO_START < RAM_START);
};
