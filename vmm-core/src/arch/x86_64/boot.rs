//! Loading a kernel and initramfs and preparing the boot CPU, for the two x86-64 boot protocols
//! we speak: PVH (an ELF with a PVH entry note, entered in 32-bit protected mode) and the Linux
//! 64-bit boot protocol (an ELF `vmlinux` without that note, or a `bzImage`).

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, Error as LoaderError, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::*;
use super::mptable::{self, MPTABLE_END, MPTABLE_START};
use super::regs::*;
pub use crate::builder::InitramfsPart;
use crate::memory::GuestMemory;

/// Errors preparing a guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        /// The kernel path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither an ELF kernel nor a bzImage.
    #[error("{path} is not a kernel image (neither an x86-64 ELF vmlinux nor a bzImage)")]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// The kernel image is malformed or does not fit in guest memory.
    #[error("cannot load kernel {path}: {detail}")]
    KernelLoad {
        /// The file.
        path: PathBuf,
        /// What the loader reported.
        detail: String,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// An initramfs part could not be read.
    #[error("cannot read initramfs {path}: {source}")]
    InitramfsRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the top of low memory.
    #[error("initramfs of {size} bytes does not fit in guest memory above the kernel; give the guest more memory")]
    InitramfsTooLarge {
        /// Its total size.
        size: u64,
    },
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write {what} into guest memory: {detail}")]
    Write {
        /// The structure.
        what: &'static str,
        /// The error.
        detail: String,
    },
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit: long mode, identity-mapped, `rsi` = `boot_params`.
    Linux64,
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The protocol to boot it with.
    pub protocol: BootProtocol,
    /// Its entry point (guest physical).
    pub entry: u64,
    /// First byte after the loaded image.
    pub end: u64,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// The boot vCPU's initial registers.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootCpuState {
    /// General-purpose registers.
    pub regs: StandardRegisters,
    /// Segment and control registers.
    pub sregs: SpecialRegisters,
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let read_err = |source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    if file.metadata().map_err(read_err)?.is_dir() {
        return Err(BootError::NotAKernel {
            path: path.to_owned(),
        });
    }
    let load_err = |e: LoaderError| BootError::KernelLoad {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let mut head = [0u8; 0x206];
    let head_len = read_up_to(&mut file, &mut head).map_err(read_err)?;
    file.rewind().map_err(read_err)?;
    if head_len >= 4 && &head[..4] == b"\x7fELF" {
        let res =
            Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        let (protocol, entry) = match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (BootProtocol::Pvh, addr.raw_value()),
            _ => (BootProtocol::Linux64, res.kernel_load.raw_value()),
        };
        Ok(LoadedKernel {
            protocol,
            entry,
            end: res.kernel_end,
            setup_header: None,
        })
    } else if head_len == head.len() && &head[0x202..0x206] == b"HdrS" {
        let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(load_err)?;
        Ok(LoadedKernel {
            protocol: BootProtocol::Linux64,
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            entry: res.kernel_load.raw_value() + 0x200,
            end: res.kernel_end,
            setup_header: res.setup_header,
        })
    } else {
        Err(BootError::NotAKernel {
            path: path.to_owned(),
        })
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The e820 map: RAM below the MP table, the reserved MP table, RAM from 1 MiB up to the
/// MMIO window, and RAM above 4 GiB.
pub fn e820_map(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    const RAM: u32 = 1;
    const RESERVED: u32 = 2;
    let mut map = vec![
        (0, MPTABLE_START, RAM),
        (MPTABLE_START, MPTABLE_END - MPTABLE_START, RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start, RAM));
        }
    }
    map
}

/// Highest usable address + 1 below the MMIO window (and below 2 GiB, the initramfs limit of
/// kernels that do not say otherwise).
fn low_ram_end(mem: &GuestMemory) -> u64 {
    let first = mem
        .iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map(|r| r.len())
        .unwrap_or(0);
    first.min(MMIO_GAP_START)
}

/// Writes the initramfs parts contiguously at the top of low memory; returns (address, size).
fn load_initramfs(
    mem: &GuestMemory,
    parts: &[InitramfsPart],
    kernel: &LoadedKernel,
) -> Result<Option<(u64, u64)>, BootError> {
    if parts.is_empty() {
        return Ok(None);
    }
    let mut sizes = Vec::with_capacity(parts.len());
    for part in parts {
        sizes.push(match part {
            InitramfsPart::File(path) => std::fs::metadata(path)
                .map_err(|source| BootError::InitramfsRead {
                    path: path.clone(),
                    source,
                })?
                .len(),
            InitramfsPart::Bytes(b) => b.len() as u64,
        });
    }
    let total: u64 = sizes.iter().map(|s| s.next_multiple_of(4)).sum();
    let max_addr = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max) + 1)
        .unwrap_or(0x8000_0000);
    let top = low_ram_end(mem).min(max_addr);
    let addr = top
        .checked_sub(total)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel.end.next_multiple_of(0x1000))
        .ok_or(BootError::InitramfsTooLarge { size: total })?;
    let mut at = addr;
    for (part, size) in parts.iter().zip(sizes) {
        match part {
            InitramfsPart::File(path) => {
                let mut f = File::open(path).map_err(|source| BootError::InitramfsRead {
                    path: path.clone(),
                    source,
                })?;
                mem.read_exact_volatile_from(GuestAddress(at), &mut f, size as usize)
                    .map_err(|e| BootError::InitramfsRead {
                        path: path.clone(),
                        source: std::io::Error::other(e.to_string()),
                    })?;
            }
            InitramfsPart::Bytes(b) => mem
                .write_slice(b, GuestAddress(at))
                .map_err(|e| write_err("initramfs", e))?,
        }
        let padded = size.next_multiple_of(4);
        if padded > size {
            let zeros = [0u8; 4];
            mem.write_slice(&zeros[..(padded - size) as usize], GuestAddress(at + size))
                .map_err(|e| write_err("initramfs", e))?;
        }
        at += padded;
    }
    Ok(Some((addr, total)))
}

fn write_err(what: &'static str, e: impl std::fmt::Display) -> BootError {
    BootError::Write {
        what,
        detail: e.to_string(),
    }
}

/// Writes the command line, initramfs, boot information, MP table, GDT and page tables, and
/// returns the boot vCPU's registers.
pub fn configure_boot(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &str,
    initramfs: &[InitramfsPart],
    vcpus: u8,
) -> Result<BootCpuState, BootError> {
    let mut cl = linux_loader::cmdline::Cmdline::new(CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !cmdline.trim().is_empty() {
        cl.insert_str(cmdline)
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cl
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();

    let initrd = load_initramfs(mem, initramfs, kernel)?;
    mptable::setup_mptable(mem, vcpus)?;
    let e820 = e820_map(mem);

    match kernel.protocol {
        BootProtocol::Pvh => write_pvh_info(mem, &e820, initrd)?,
        BootProtocol::Linux64 => write_zero_page(mem, kernel, &e820, initrd, cmdline_len)?,
    }
    boot_cpu_state(mem, kernel)
}

fn write_pvh_info(
    mem: &GuestMemory,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|e| write_err("PVH start info", e))
}

fn write_zero_page(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
) -> Result<(), BootError> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if e820.len() > params.e820_table.len() {
        return Err(write_err("e820 map", "too many entries"));
    }
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| write_err("boot_params", e))
}

/// GDT entries: null, null, code (0x10), data (0x18), TSS (0x20), as the Linux boot protocol
/// expects `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18.
fn gdt(protocol: BootProtocol) -> [u64; 5] {
    let code = match protocol {
        BootProtocol::Pvh => 0x00cf_9b00_0000_ffff, // 32-bit, 4 GiB flat, exec/read
        BootProtocol::Linux64 => 0x00af_9b00_0000_ffff, // 64-bit
    };
    let data = 0x00cf_9300_0000_ffff; // 4 GiB flat, read/write
    let tss = 0x0080_8b00_0000_0067; // 64-bit busy TSS at 0, 104 bytes
    [0, 0, code, data, tss]
}

fn boot_cpu_state(mem: &GuestMemory, kernel: &LoadedKernel) -> Result<BootCpuState, BootError> {
    let gdt = gdt(kernel.protocol);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|e| write_err("GDT", e))?;
    }
    let code = Segment::from_gdt_entry(gdt[2], 0x10);
    let data = Segment::from_gdt_entry(gdt[3], 0x18);
    let mut sregs = SpecialRegisters {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment::from_gdt_entry(gdt[4], 0x20),
        ldt: Segment {
            type_: 2,
            present: true,
            limit: 0xffff,
            ..Default::default()
        },
        gdt: DescriptorTable {
            base: GDT_ADDR,
            limit: (gdt.len() * 8 - 1) as u16,
        },
        idt: DescriptorTable { base: 0, limit: 0 },
        cr0: CR0_PE | CR0_ET,
        ..Default::default()
    };
    let mut regs = StandardRegisters {
        rip: kernel.entry,
        ..Default::default()
    };
    match kernel.protocol {
        BootProtocol::Pvh => {
            regs.rbx = PVH_INFO_ADDR;
        }
        BootProtocol::Linux64 => {
            write_identity_map(mem)?;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_ADDR;
        }
    }
    Ok(BootCpuState { regs, sregs })
}

/// Identity-maps the first GiB with 2 MiB pages, enough for the kernel's early boot.
fn write_identity_map(mem: &GuestMemory) -> Result<(), BootError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| write_err("page tables", e))
    };
    w(PDPT_ADDR | PRESENT_WRITABLE, PML4_ADDR)?;
    w(PD_ADDR | PRESENT_WRITABLE, PDPT_ADDR)?;
    let mut pd = [0u8; 4096];
    for (i, chunk) in pd.chunks_exact_mut(8).enumerate() {
        let entry = ((i as u64) << 21) | PRESENT_WRITABLE | HUGE;
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR))
        .map_err(|e| write_err("page tables", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-core-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn missing_kernel_is_a_read_error() {
        let mem = create_guest_memory(64).unwrap();
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(err, BootError::KernelRead { .. }), "{err}");
    }

    #[test]
    fn random_file_is_not_a_kernel() {
        let mem = create_guest_memory(64).unwrap();
        let p = temp_file("notakernel", &[0x5a; 8192]);
        let err = load_kernel(&mem, &p).unwrap_err();
        std::fs::remove_file(&p).ok();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        let p = temp_file("empty", &[]);
        let err = load_kernel(&mem, &p).unwrap_err();
        std::fs::remove_file(&p).ok();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
    }

    #[test]
    fn e820_reserves_the_mp_table_and_skips_the_legacy_hole() {
        let mem = create_guest_memory(128).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map[0], (0, MPTABLE_START, 1));
        assert_eq!(map[1].2, 2);
        assert_eq!(map[2], (HIMEM_START, (128 << 20) - HIMEM_START, 1));
    }

    #[test]
    fn initramfs_parts_are_padded_and_placed_below_the_top() {
        let mem = create_guest_memory(64).unwrap();
        let kernel = LoadedKernel {
            protocol: BootProtocol::Pvh,
            entry: 0x100000,
            end: 0x200000,
            setup_header: None,
        };
        let parts = [
            InitramfsPart::Bytes(vec![1, 2, 3]),
            InitramfsPart::Bytes(vec![4; 4]),
        ];
        let (addr, size) = load_initramfs(&mem, &parts, &kernel).unwrap().unwrap();
        assert_eq!(size, 8);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20);
        let mut got = [0u8; 8];
        mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
        assert_eq!(got, [1, 2, 3, 0, 4, 4, 4, 4]);
    }

    #[test]
    fn oversized_initramfs_is_refused() {
        let mem = create_guest_memory(16).unwrap();
        let kernel = LoadedKernel {
            protocol: BootProtocol::Pvh,
            entry: 0x100000,
            end: 0x200000,
            setup_header: None,
        };
        let parts = [InitramfsPart::Bytes(vec![0; 15 << 20])];
        assert!(matches!(
            load_initramfs(&mem, &parts, &kernel),
            Err(BootError::InitramfsTooLarge { .. })
        ));
    }

    #[test]
    fn linux64_state_enters_long_mode_with_boot_params() {
        let mem = create_guest_memory(64).unwrap();
        let kernel = LoadedKernel {
            protocol: BootProtocol::Linux64,
            entry: 0x1000000,
            end: 0x2000000,
            setup_header: None,
        };
        let st = configure_boot(&mem, &kernel, "console=ttyS0", &[], 2).unwrap();
        assert_eq!(st.regs.rip, 0x1000000);
        assert_eq!(st.regs.rsi, ZERO_PAGE_ADDR);
        assert!(st.sregs.cs.l);
        assert_eq!(st.sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!(params.e820_entries, 3);
    }

    #[test]
    fn pvh_state_is_32bit_flat_with_start_info() {
        let mem = create_guest_memory(64).unwrap();
        let kernel = LoadedKernel {
            protocol: BootProtocol::Pvh,
            entry: 0x100000,
            end: 0x101000,
            setup_header: None,
        };
        let parts = [InitramfsPart::Bytes(b"070701".to_vec())];
        let st = configure_boot(&mem, &kernel, "", &parts, 1).unwrap();
        assert_eq!(st.regs.rbx, PVH_INFO_ADDR);
        assert!(st.sregs.cs.db && !st.sregs.cs.l);
        assert_eq!(st.sregs.cr0 & CR0_PG, 0);
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.nr_modules, 1);
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let mem = create_guest_memory(64).unwrap();
        let kernel = LoadedKernel {
            protocol: BootProtocol::Pvh,
            entry: 0x100000,
            end: 0x101000,
            setup_header: None,
        };
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            configure_boot(&mem, &kernel, &long, &[], 1),
            Err(BootError::Cmdline(_))
        ));
    }
}
