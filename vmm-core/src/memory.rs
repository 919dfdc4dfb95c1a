//! Guest memory: anonymous, lazily faulted mappings placed around the MMIO window.

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The guest memory type every crate of the VMM shares.
pub type GuestMemory = GuestMemoryMmap<()>;

/// The smallest guest we build (room for the boot structures and a kernel).
pub const MIN_MEMORY_MIB: u32 = 16;
/// The largest guest we build.
pub const MAX_MEMORY_MIB: u32 = 1024 * 1024;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is outside what we support.
    #[error("guest memory of {mib} MiB is out of range ({min}..={max} MiB)")]
    OutOfRange {
        /// Requested size.
        mib: u32,
        /// Smallest allowed.
        min: u32,
        /// Largest allowed.
        max: u32,
    },
    /// The host could not map the memory.
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        /// Requested size.
        mib: u32,
        /// The mapping error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Guest RAM ranges for `size` bytes starting at 0, leaving `[gap_start, gap_end)` free for MMIO.
pub fn ram_ranges(size: u64, gap_start: u64, gap_end: u64) -> Vec<(GuestAddress, usize)> {
    if size <= gap_start {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), gap_start as usize),
            (GuestAddress(gap_end), (size - gap_start) as usize),
        ]
    }
}

/// Maps `mib` MiB of guest RAM in this architecture's layout.
pub fn create_guest_memory(mib: u32) -> Result<GuestMemory, MemoryError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(MemoryError::OutOfRange {
            mib,
            min: MIN_MEMORY_MIB,
            max: MAX_MEMORY_MIB,
        });
    }
    let size = u64::from(mib) << 20;
    let ranges = crate::arch::host::ram_ranges(size);
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib, source })
}

/// Maps guest RAM copy-on-write from `file`: each (guest address, length, file offset) becomes
/// a private mapping, so pages are read from the file only when the guest touches them, and
/// writes stay in this process (many VMs can share one file).
#[cfg(unix)]
pub fn guest_memory_from_file(
    file: &std::fs::File,
    regions: &[(u64, u64, u64)],
) -> Result<GuestMemory, std::io::Error> {
    use vm_memory::mmap::MmapRegion;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let mut mapped = Vec::with_capacity(regions.len());
    for &(guest_addr, len, offset) in regions {
        let fo = FileOffset::new(file.try_clone()?, offset);
        let region = MmapRegion::build(
            Some(fo),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| std::io::Error::other(format!("mapping guest memory: {e}")))?;
        let region = GuestRegionMmap::new(region, GuestAddress(guest_addr))
            .ok_or_else(|| std::io::Error::other("guest memory region out of range"))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped)
        .map_err(|e| std::io::Error::other(format!("guest memory layout: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        let r = ram_ranges(256 << 20, 0xd000_0000, 1 << 32);
        assert_eq!(r, vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30, 0xd000_0000, 1 << 32);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), 0xd000_0000));
        assert_eq!(r[1].0, GuestAddress(1 << 32));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn absurd_sizes_are_refused() {
        assert!(matches!(
            create_guest_memory(1),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            create_guest_memory(u32::MAX),
            Err(MemoryError::OutOfRange { .. })
        ));
    }
}
