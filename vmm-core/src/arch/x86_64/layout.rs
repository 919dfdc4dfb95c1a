//! Where things live in guest physical memory on x86-64.
//!
//! ```text
//! 0x0000_0500  GDT                     0x0000_7000  boot_params (zero page)
//! 0x0000_6000  PVH start_info + map    0x0000_9000  PML4, PDPT, PD (identity map of 1 GiB)
//! 0x0002_0000  kernel command line     0x0009_fc00  MP table (last KiB of base memory)
//! 0x0010_0000  kernel (or its ELF p_paddr)           ... initramfs at the top of low RAM
//! 0xd000_0000  MMIO window for virtio devices        0xfec0_0000 IOAPIC, 0xfee0_0000 LAPIC
//! 0x1_0000_0000  RAM above 4 GiB, when the guest has more than fits below the MMIO window
//! ```

/// Guest GDT.
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memory map, right after the start info.
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_ADDR: u64 = 0x6400;
/// The Linux zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Page-map level 4 of the boot identity map.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table of the boot identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory of the boot identity map (2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// The initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest kernel command line we write (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: the MP table lives in its last KiB.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy video/BIOS hole.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO window (no RAM from here to 4 GiB).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO window.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio devices are placed, one 4 KiB slot each.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// The first interrupt line free for devices (0-15 are the legacy ISA lines).
pub const IRQ_BASE: u32 = 5;
/// The last interrupt line the IOAPIC routes.
pub const IRQ_MAX: u32 = 23;
/// COM1's I/O port base.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// The i8042 command port (a write of 0xfe resets the machine).
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The exit-status port: a 32-bit write powers the guest off with that status. The same port
/// QEMU's `isa-debug-exit,iobase=0xf4,iosize=4` uses, and clear of QEMU's fw_cfg at 0x510.
pub const EXIT_STATUS_PORT: u16 = 0x00f4;
