//! The buffers of a descriptor chain: collected once (each checked to lie in guest memory),
//! then read and written at byte offsets across buffer boundaries. Shared by the devices whose
//! messages span buffers (vsock packets, network frames).

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_core::GuestMemory;

/// The chain's buffers of one direction, in order, each checked to lie in guest memory (`None`
/// if one does not). A device-readable chain stops at its first device-writable buffer; a
/// device-writable one skips device-readable buffers. Empty buffers are left out.
pub fn chain_buffers(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    writable: bool,
    out: &mut Vec<(GuestAddress, u32)>,
) -> Option<()> {
    out.clear();
    // The queue's iterator stops at loops, out-of-table indices and over-long chains.
    for d in chain {
        if d.is_write_only() != writable {
            if writable {
                continue;
            }
            break;
        }
        if d.len() == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return None;
        }
        out.push((d.addr(), d.len()));
    }
    Some(())
}

/// A read or write does not fit the buffers, or they lie outside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest buffers too short or outside guest memory")]
pub struct BufferError;

/// Total length of `bufs`.
pub fn total_len(bufs: &[(GuestAddress, u32)]) -> u64 {
    bufs.iter().map(|&(_, len)| u64::from(len)).sum()
}

/// Reads `out.len()` bytes starting `offset` bytes into `bufs`. Fails if they are not all there
/// or not all in guest memory.
pub fn read_at(
    mem: &GuestMemory,
    bufs: &[(GuestAddress, u32)],
    mut offset: u64,
    out: &mut [u8],
) -> Result<(), BufferError> {
    let mut done = 0usize;
    for &(addr, len) in bufs {
        if done == out.len() {
            break;
        }
        let len = u64::from(len);
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = ((len - offset) as usize).min(out.len() - done);
        let at = addr.0.checked_add(offset).ok_or(BufferError)?;
        mem.read_slice(&mut out[done..done + n], GuestAddress(at))
            .map_err(|_| BufferError)?;
        done += n;
        offset = 0;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(BufferError)
    }
}

/// Writes `data` starting `offset` bytes into `bufs`. Fails if they do not hold it all or lie
/// outside guest memory.
pub fn write_at(
    mem: &GuestMemory,
    bufs: &[(GuestAddress, u32)],
    mut offset: u64,
    data: &[u8],
) -> Result<(), BufferError> {
    let mut done = 0usize;
    for &(addr, len) in bufs {
        if done == data.len() {
            break;
        }
        let len = u64::from(len);
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = ((len - offset) as usize).min(data.len() - done);
        let at = addr.0.checked_add(offset).ok_or(BufferError)?;
        mem.write_slice(&data[done..done + n], GuestAddress(at))
            .map_err(|_| BufferError)?;
        done += n;
        offset = 0;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err(BufferError)
    }
}
