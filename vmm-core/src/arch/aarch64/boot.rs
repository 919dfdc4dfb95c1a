//! Loading an arm64 `Image` per the arm64 boot protocol (Documentation/arm64/booting.rst): the
//! kernel at `text_offset` from a 2 MiB-aligned base, the device tree and the initrd in RAM,
//! and the boot vCPU entering the kernel at EL1 with MMU and caches off, `x0` = the device tree.

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use super::fdt::{create_fdt, FdtConfig};
use super::layout::{RAM_START, UART_ADDR, UART_SPI};
use crate::builder::{DeclaredDevice, InitramfsPart};
use crate::memory::GuestMemory;

/// The `magic` field of an arm64 `Image` header ("ARM\x64").
pub const IMAGE_MAGIC: u32 = 0x644d_5241;
/// Where the header's magic is.
const MAGIC_OFFSET: usize = 56;
/// The header's length.
const HEADER_LEN: usize = 64;
/// The most room the device tree gets (the boot protocol's limit).
pub const FDT_MAX: u64 = 2 << 20;

/// Errors preparing an arm64 guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be read.
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        /// The kernel path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an arm64 `Image` (an x86 kernel, a compressed one, something else).
    #[error("{path} is not an arm64 kernel Image (no \"ARM\\x64\" magic in its header; give the uncompressed arch/arm64/boot/Image)")]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// The kernel, initrd and device tree do not fit in guest RAM.
    #[error("{what} does not fit in guest memory; give the guest more memory")]
    TooLarge {
        /// What did not fit.
        what: &'static str,
    },
    /// An initramfs part could not be read.
    #[error("cannot read initramfs {path}: {source}")]
    InitramfsRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The device tree could not be built.
    #[error("cannot build the device tree: {0}")]
    Fdt(String),
    /// Writing into guest memory failed.
    #[error("cannot write {what} into guest memory: {detail}")]
    Write {
        /// What.
        what: &'static str,
        /// The error.
        detail: String,
    },
}

/// Where the kernel went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedImage {
    /// Its first byte, where the boot vCPU starts.
    pub entry: u64,
    /// The first byte after the memory it may use (`image_size`).
    pub end: u64,
}

/// Checks `bytes` is an arm64 `Image` and returns its (text_offset, image_size).
pub fn parse_header(bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.len() < HEADER_LEN {
        return None;
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
    let magic = u32::from_le_bytes(
        bytes[MAGIC_OFFSET..MAGIC_OFFSET + 4]
            .try_into()
            .unwrap_or([0; 4]),
    );
    if magic != IMAGE_MAGIC {
        return None;
    }
    let (text_offset, image_size) = (u64_at(8), u64_at(16));
    // A zero image_size is a kernel older than 3.17: its text_offset is 0x80000.
    Some(if image_size == 0 {
        (0x8_0000, bytes.len() as u64)
    } else {
        (text_offset, image_size)
    })
}

/// Loads the `Image` at `path` into `mem` at `text_offset` from the start of RAM.
pub fn load_image(mem: &GuestMemory, path: &Path) -> Result<LoadedImage, BootError> {
    let bytes = std::fs::read(path).map_err(|source| BootError::KernelRead {
        path: path.into(),
        source,
    })?;
    let (text_offset, image_size) =
        parse_header(&bytes).ok_or_else(|| BootError::NotAKernel { path: path.into() })?;
    let entry = RAM_START
        .checked_add(text_offset)
        .ok_or(BootError::TooLarge { what: "the kernel" })?;
    let end = entry
        .checked_add(image_size.max(bytes.len() as u64))
        .ok_or(BootError::TooLarge { what: "the kernel" })?;
    mem.write_slice(&bytes, GuestAddress(entry))
        .map_err(|_| BootError::TooLarge { what: "the kernel" })?;
    Ok(LoadedImage { entry, end })
}

/// Writes the initramfs parts (each 4-byte aligned) and the device tree at the top of RAM, and
/// returns the device tree's address.
pub fn configure_boot(
    mem: &GuestMemory,
    kernel: &LoadedImage,
    ram: (u64, u64),
    cmdline: &str,
    initramfs: &[InitramfsPart],
    vcpus: u8,
    devices: &[DeclaredDevice],
) -> Result<u64, BootError> {
    let ram_end = ram.0 + ram.1;
    // The device tree in the last 2 MiB, the initrd right below it.
    let fdt_addr = ram_end
        .checked_sub(FDT_MAX)
        .filter(|&a| a >= kernel.end)
        .ok_or(BootError::TooLarge {
            what: "the device tree",
        })?;
    let mut initrd = Vec::new();
    for part in initramfs {
        while initrd.len() % 4 != 0 {
            initrd.push(0);
        }
        match part {
            InitramfsPart::File(path) => {
                let bytes = std::fs::read(path).map_err(|source| BootError::InitramfsRead {
                    path: path.clone(),
                    source,
                })?;
                initrd.extend_from_slice(&bytes);
            }
            InitramfsPart::Bytes(bytes) => initrd.extend_from_slice(bytes),
        }
    }
    let initrd_at = if initrd.is_empty() {
        None
    } else {
        let start = fdt_addr
            .checked_sub(initrd.len() as u64)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= kernel.end)
            .ok_or(BootError::TooLarge {
                what: "the initramfs",
            })?;
        mem.write_slice(&initrd, GuestAddress(start))
            .map_err(|e| BootError::Write {
                what: "the initramfs",
                detail: e.to_string(),
            })?;
        Some((start, initrd.len() as u64))
    };
    let virtio: Vec<(u64, u64, u32)> = devices.iter().map(|d| (d.addr, d.len, d.irq)).collect();
    let blob = create_fdt(&FdtConfig {
        vcpus,
        memory: ram,
        cmdline,
        initrd: initrd_at,
        uart: (UART_ADDR, UART_SPI),
        virtio: &virtio,
    })
    .map_err(|e| BootError::Fdt(e.to_string()))?;
    if blob.len() as u64 > FDT_MAX {
        return Err(BootError::TooLarge {
            what: "the device tree",
        });
    }
    mem.write_slice(&blob, GuestAddress(fdt_addr))
        .map_err(|e| BootError::Write {
            what: "the device tree",
            detail: e.to_string(),
        })?;
    Ok(fdt_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(text_offset: u64, image_size: u64) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[8..16].copy_from_slice(&text_offset.to_le_bytes());
        b[16..24].copy_from_slice(&image_size.to_le_bytes());
        b[56..60].copy_from_slice(&IMAGE_MAGIC.to_le_bytes());
        b
    }

    #[test]
    fn headers_are_checked_and_old_kernels_get_the_legacy_offset() {
        assert_eq!(parse_header(&image(0, 1 << 20)), Some((0, 1 << 20)));
        assert_eq!(parse_header(&image(0x1234, 0)), Some((0x8_0000, 4096)));
        let mut x86 = image(0, 1 << 20);
        x86[56..60].copy_from_slice(b"HdrS");
        assert_eq!(parse_header(&x86), None);
        assert_eq!(parse_header(&[0u8; 10]), None);
    }

    #[test]
    fn kernel_initrd_and_device_tree_land_in_ram_in_order() {
        let size = 64u64 << 20;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(RAM_START), size as usize)]).unwrap();
        let dir = std::env::temp_dir().join(format!("sm-arm64-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel_path = dir.join("Image");
        std::fs::write(&kernel_path, image(0, 2 << 20)).unwrap();
        let kernel = load_image(&mem, &kernel_path).unwrap();
        assert_eq!(kernel.entry, RAM_START);
        let magic: u32 = mem.read_obj(GuestAddress(RAM_START + 56)).unwrap();
        assert_eq!(magic, IMAGE_MAGIC);
        let fdt = configure_boot(
            &mem,
            &kernel,
            (RAM_START, size),
            "console=ttyS0",
            &[InitramfsPart::Bytes(b"070701".to_vec())],
            1,
            &[DeclaredDevice {
                addr: 0x4000_2000,
                len: 0x1000,
                irq: 1,
            }],
        )
        .unwrap();
        assert_eq!(fdt, RAM_START + size - FDT_MAX);
        let fdt_magic: u32 = mem.read_obj(GuestAddress(fdt)).unwrap();
        assert_eq!(u32::from_be(fdt_magic), 0xd00d_feed);
        // Too little RAM for the kernel and the device tree is a clear error.
        let small = GuestMemory::from_ranges(&[(GuestAddress(RAM_START), 3 << 20)]).unwrap();
        let k = load_image(&small, &kernel_path).unwrap();
        let r = configure_boot(&small, &k, (RAM_START, 3 << 20), "", &[], 1, &[]);
        assert!(matches!(r, Err(BootError::TooLarge { .. })), "{r:?}");
        // An x86 kernel is refused by name.
        std::fs::write(
            &kernel_path,
            b"\x7fELF not an arm64 image at all, long enough to have a header........",
        )
        .unwrap();
        let e = load_image(&mem, &kernel_path).unwrap_err();
        assert!(
            e.to_string().contains("is not an arm64 kernel Image"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
