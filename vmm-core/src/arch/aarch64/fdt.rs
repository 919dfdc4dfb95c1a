//! The flattened device tree an arm64 guest boots with: memory, the CPUs (PSCI), the GICv3,
//! the architected timer, the 16550 UART and every virtio-mmio device with its SPI, and
//! `/chosen` with the command line and the initrd.

use vm_fdt::{FdtWriter, FdtWriterResult};

use super::layout::{GICD_BASE, GICD_SIZE, GICR_BASE, GICR_SIZE_PER_CPU};

/// The GIC's phandle (every interrupt in the tree refers to it).
const GIC_PHANDLE: u32 = 1;
/// Interrupt specifier: a shared peripheral interrupt (SPI).
const IRQ_SPI: u32 = 0;
/// Interrupt specifier: a per-CPU peripheral interrupt (PPI).
const IRQ_PPI: u32 = 1;
/// Trigger: rising edge (what an irqfd raises).
const IRQ_EDGE_RISING: u32 = 1;
/// Trigger: high level (the architected timer).
const IRQ_LEVEL_HIGH: u32 = 4;
/// The timer's PPIs: secure physical, non-secure physical, virtual, hypervisor.
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];

/// What the device tree describes.
#[derive(Debug, Clone)]
pub struct FdtConfig<'a> {
    /// vCPUs (their MPIDRs follow KVM's default numbering).
    pub vcpus: u8,
    /// Guest RAM: (start, size).
    pub memory: (u64, u64),
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The initrd, if any: (start, size).
    pub initrd: Option<(u64, u64)>,
    /// The UART: (base address, SPI number counted from the first SPI).
    pub uart: (u64, u32),
    /// Each virtio-mmio device: (base address, size of its window, SPI number).
    pub virtio: &'a [(u64, u64, u32)],
}

/// A vCPU's MPIDR affinity as KVM assigns it by default (Aff0 = id % 16, Aff1 = id / 16).
pub fn mpidr(id: u8) -> u64 {
    (u64::from(id >> 4) << 8) | u64::from(id & 0xf)
}

/// Writes the device tree blob.
pub fn create_fdt(cfg: &FdtConfig<'_>) -> FdtWriterResult<Vec<u8>> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", cfg.cmdline)?;
    fdt.property_string("stdout-path", &format!("/uart@{:x}", cfg.uart.0))?;
    if let Some((start, size)) = cfg.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", start + size)?;
    }
    fdt.end_node(chosen)?;

    let memory = fdt.begin_node(&format!("memory@{:x}", cfg.memory.0))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[cfg.memory.0, cfg.memory.1])?;
    fdt.end_node(memory)?;

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for id in 0..cfg.vcpus {
        let cpu = fdt.begin_node(&format!("cpu@{:x}", mpidr(id)))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", mpidr(id))?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    let gic = fdt.begin_node(&format!("intc@{GICD_BASE:x}"))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_null("ranges")?;
    fdt.property_array_u64(
        "reg",
        &[
            GICD_BASE,
            GICD_SIZE,
            GICR_BASE,
            GICR_SIZE_PER_CPU * u64::from(cfg.vcpus),
        ],
    )?;
    fdt.property_phandle(GIC_PHANDLE)?;
    fdt.end_node(gic)?;

    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let irqs: Vec<u32> = TIMER_PPIS
        .iter()
        .flat_map(|&ppi| [IRQ_PPI, ppi, IRQ_LEVEL_HIGH])
        .collect();
    fdt.property_array_u32("interrupts", &irqs)?;
    fdt.end_node(timer)?;

    let uart = fdt.begin_node(&format!("uart@{:x}", cfg.uart.0))?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[cfg.uart.0, 0x1000])?;
    fdt.property_u32("clock-frequency", 1_843_200)?;
    fdt.property_array_u32("interrupts", &[IRQ_SPI, cfg.uart.1, IRQ_EDGE_RISING])?;
    fdt.end_node(uart)?;

    for &(addr, size, spi) in cfg.virtio {
        let dev = fdt.begin_node(&format!("virtio_mmio@{addr:x}"))?;
        fdt.property_string("compatible", "virtio,mmio")?;
        fdt.property_array_u64("reg", &[addr, size])?;
        fdt.property_array_u32("interrupts", &[IRQ_SPI, spi, IRQ_EDGE_RISING])?;
        fdt.property_null("dma-coherent")?;
        fdt.end_node(dev)?;
    }

    fdt.end_node(root)?;
    fdt.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_tree_is_a_valid_blob_naming_every_device() {
        let virtio = [(0x4000_2000, 0x1000, 1), (0x4000_3000, 0x1000, 2)];
        let blob = create_fdt(&FdtConfig {
            vcpus: 2,
            memory: (0x8000_0000, 256 << 20),
            cmdline: "console=ttyS0 panic=-1",
            initrd: Some((0x8f00_0000, 4096)),
            uart: (0x4000_0000, 0),
            virtio: &virtio,
        })
        .unwrap();
        // The FDT header: magic, total size.
        assert_eq!(&blob[..4], &0xd00d_feed_u32.to_be_bytes());
        let total = u32::from_be_bytes(blob[4..8].try_into().unwrap()) as usize;
        assert_eq!(total, blob.len());
        for name in [
            &b"memory@80000000"[..],
            b"cpu@0",
            b"cpu@1",
            b"arm,gic-v3",
            b"arm,armv8-timer",
            b"arm,psci-0.2",
            b"uart@40000000",
            b"virtio_mmio@40002000",
            b"virtio_mmio@40003000",
            b"console=ttyS0 panic=-1",
            b"linux,initrd-start",
        ] {
            assert!(contains(&blob, name), "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn mpidrs_follow_kvms_default_affinity() {
        assert_eq!(mpidr(0), 0);
        assert_eq!(mpidr(15), 15);
        assert_eq!(mpidr(16), 0x100);
        assert_eq!(mpidr(33), 0x201);
    }
}
