//! Parsing a virtio-blk request out of a descriptor chain, trusting nothing in it.
//!
//! Layout (virtio 1.2, 5.2.6): a 16-byte device-readable header `{type, reserved, sector}`, then
//! the data (device-writable for reads and GET_ID, device-readable otherwise), then one
//! device-writable status byte. Buffers may be split across descriptors in any way.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_core::GuestMemory;

use super::SECTOR_SIZE;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_T_DISCARD: u32 = 11;
const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
const HEADER_LEN: u32 = 16;
/// Largest data transfer of one request (a hostile guest cannot make us allocate more).
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make written data durable.
    Flush,
    /// Return the device ID string.
    GetId,
    /// Discard ranges (the data buffer holds segments).
    Discard,
    /// Zero ranges (the data buffer holds segments).
    WriteZeroes,
    /// A type we do not implement.
    Unsupported(u32),
}

/// A parsed request: what to do, where, and where to put the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: RequestKind,
    /// First sector.
    pub sector: u64,
    /// Data buffers, in order (guest address, length).
    pub data: Vec<(GuestAddress, u32)>,
    /// Total length of `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No descriptors at all, or none writable at the end for the status.
    #[error("descriptor chain has no status byte")]
    NoStatus,
    /// The header is shorter than 16 bytes, writable, or unreadable.
    #[error("invalid request header")]
    BadHeader,
    /// A data buffer has the wrong direction for the request type.
    #[error("data buffer has the wrong direction")]
    WrongDirection,
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer at {0:#x} is outside guest memory")]
    OutOfMemory(u64),
    /// The data length is not a whole number of sectors, or too large.
    #[error("invalid data length {0}")]
    BadLength(u64),
    /// The chain loops or is longer than the queue (reported by the queue as an early end).
    #[error("descriptor chain is malformed")]
    Malformed,
}

fn check_range(mem: &GuestMemory, addr: GuestAddress, len: u32) -> Result<(), RequestError> {
    if len == 0 {
        return Ok(());
    }
    if mem.check_range(addr, len as usize) {
        Ok(())
    } else {
        Err(RequestError::OutOfMemory(addr.raw_value()))
    }
}

/// Parses the request in `chain`. On error, also returns where the status byte is if it could be
/// found, so the caller can still report `IOERR` to the guest.
pub fn parse_request(
    chain: DescriptorChain<&GuestMemory>,
) -> Result<Request, (RequestError, Option<GuestAddress>)> {
    let mem: &GuestMemory = chain.memory();
    // The queue's iterator stops at loops, out-of-table indices and over-long chains.
    let descs: Vec<Descriptor> = chain.clone().collect();
    let Some(last) = descs.last() else {
        return Err((RequestError::NoStatus, None));
    };
    if !last.is_write_only() || last.len() == 0 {
        return Err((RequestError::NoStatus, None));
    }
    // The status byte is the last byte of the last buffer.
    let status_addr = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .filter(|a| mem.check_range(*a, 1))
        .ok_or((RequestError::NoStatus, None))?;
    let fail = |e| Err((e, Some(status_addr)));

    // Gather the device-readable prefix to find the header (it may be split).
    let mut header = [0u8; HEADER_LEN as usize];
    let mut got = 0usize;
    let mut idx = 0usize;
    let mut first_data: Option<(GuestAddress, u32)> = None;
    while got < header.len() {
        let Some(d) = descs.get(idx) else {
            return fail(RequestError::BadHeader);
        };
        if d.is_write_only() {
            return fail(RequestError::BadHeader);
        }
        if let Err(e) = check_range(mem, d.addr(), d.len()) {
            return fail(e);
        }
        let take = (header.len() - got).min(d.len() as usize);
        if mem
            .read_slice(&mut header[got..got + take], d.addr())
            .is_err()
        {
            return fail(RequestError::OutOfMemory(d.addr().raw_value()));
        }
        got += take;
        if take < d.len() as usize {
            // The rest of this buffer is data.
            first_data = Some((d.addr().unchecked_add(take as u64), d.len() - take as u32));
        }
        idx += 1;
    }
    let kind_raw = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let kind = match kind_raw {
        VIRTIO_BLK_T_IN => RequestKind::In,
        VIRTIO_BLK_T_OUT => RequestKind::Out,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
        other => RequestKind::Unsupported(other),
    };
    let device_writes = matches!(kind, RequestKind::In | RequestKind::GetId);

    // Data: everything between the header and the status byte.
    let mut data = Vec::new();
    let mut data_len = 0u64;
    let mut push = |addr: GuestAddress, len: u32, writable: bool| {
        if len == 0 {
            return Ok(());
        }
        if writable != device_writes && !matches!(kind, RequestKind::Unsupported(_)) {
            return Err(RequestError::WrongDirection);
        }
        check_range(mem, addr, len)?;
        data.push((addr, len));
        data_len += u64::from(len);
        Ok(())
    };
    if let Some((addr, len)) = first_data {
        if idx == descs.len() {
            // Header and status cannot share a device-readable buffer.
            return fail(RequestError::NoStatus);
        }
        if let Err(e) = push(addr, len, false) {
            return fail(e);
        }
    }
    let data_descs = descs.len().saturating_sub(1);
    for d in descs.iter().take(data_descs).skip(idx) {
        if let Err(e) = push(d.addr(), d.len(), d.is_write_only()) {
            return fail(e);
        }
    }
    // The status buffer may carry data before its last byte.
    if last.len() > 1 && descs.len() > idx {
        if let Err(e) = push(last.addr(), last.len() - 1, true) {
            return fail(e);
        }
    } else if descs.len() <= idx {
        return fail(RequestError::NoStatus);
    }
    if data_len > MAX_REQUEST_BYTES
        || (matches!(kind, RequestKind::In | RequestKind::Out) && data_len % SECTOR_SIZE != 0)
    {
        return fail(RequestError::BadLength(data_len));
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status_addr,
    })
}
