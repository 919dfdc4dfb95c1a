//! A private copy of each request. The guest's driver can rewrite a request in its memory at
//! any time (another vCPU, or the same one while the device thread works), so checking the
//! request in guest memory and then letting the server read it again would let a guest swap a
//! checked request for another: a `READ` turned into a `WRITE` on a read-only share. Every
//! request's readable part is copied here first; the checks and the server read the copy.
//!
//! The copy is served through a one-entry virtqueue in this private memory, because the FUSE
//! server reads requests from descriptor chains only.

use fuse_backend_rs::transport::Reader;
use virtio_queue_fuse::{Queue, QueueT};
use vm_memory_fuse::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::device::Chain;

/// The descriptor table (one descriptor), the available and the used ring.
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
/// Where the copy starts.
const DATA: u64 = 0x1000;
/// The longest request copied: a write of the most data the device allows (1 MiB) and its
/// headers, with room to spare for names and extended attributes.
pub(crate) const CAPACITY: usize = (1 << 20) + (64 << 10);

/// The private memory, its queue and the copy's length.
pub(crate) struct Bounce {
    mem: GuestMemoryMmap<()>,
    queue: Queue,
    avail_idx: u16,
    len: usize,
}

impl Bounce {
    pub(crate) fn new() -> std::io::Result<Bounce> {
        let other = |e: String| std::io::Error::other(e);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), DATA as usize + CAPACITY)])
            .map_err(|e| other(format!("request copy memory: {e}")))?;
        let mut queue = Queue::new(1).map_err(|e| other(format!("request copy queue: {e}")))?;
        queue.set_size(1);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        Ok(Bounce {
            mem,
            queue,
            avail_idx: 0,
            len: 0,
        })
    }

    /// Copies the readable part of `chain` (in guest memory `view`) here. Fails with the errno
    /// the request then gets: `E2BIG` past [`CAPACITY`], `EFAULT` outside guest memory.
    pub(crate) fn copy_in(
        &mut self,
        view: &GuestMemoryMmap<()>,
        chain: Chain<'_>,
    ) -> Result<(), i32> {
        let mut len = 0usize;
        for desc in chain.readable() {
            let n = desc.len() as usize;
            if n > CAPACITY - len {
                return Err(libc::E2BIG);
            }
            let from = view.get_slice(desc.addr(), n).map_err(|_| libc::EFAULT)?;
            let to = self
                .mem
                .get_slice(GuestAddress(DATA + len as u64), n)
                .map_err(|_| libc::EFAULT)?;
            from.copy_to_volatile_slice(to);
            len += n;
        }
        self.len = len;
        Ok(())
    }

    /// The copy, to check and amend.
    pub(crate) fn request(&mut self) -> Option<&mut [u8]> {
        let host = self
            .mem
            .find_region(GuestAddress(DATA))?
            .get_host_address(vm_memory_fuse::MemoryRegionAddress(DATA))
            .ok()?;
        // SAFETY: `host..host + len` lies inside this private anonymous mapping (len <=
        // CAPACITY, the region is DATA + CAPACITY long), which `self.mem` keeps mapped; the
        // guest cannot see it, and `&mut self` makes this the only reference while it lives.
        Some(unsafe { std::slice::from_raw_parts_mut(host, self.len) })
    }

    /// A reader of the copy for the FUSE server.
    pub(crate) fn reader(&mut self) -> Option<Reader<'_>> {
        // One descriptor: the copy, device-readable, no next.
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&DATA.to_le_bytes());
        desc[8..12].copy_from_slice(&(self.len as u32).to_le_bytes());
        self.mem.write_slice(&desc, GuestAddress(DESC_TABLE)).ok()?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL_RING + 4))
            .ok()?;
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .ok()?;
        let chain = self.queue.pop_descriptor_chain(&self.mem)?;
        Reader::from_descriptor_chain(&self.mem, chain).ok()
    }
}
