//! The vsock packet header (virtio 1.2, 5.10.6) and moving packets in and out of guest buffers.
//!
//! A packet is a 44-byte little-endian header followed by `len` payload bytes; the driver may
//! split both across descriptors in any way. Buffers are given as `(address, length)` pairs in
//! chain order; nothing in them is trusted.

use vm_memory::GuestAddress;
use vmm_core::GuestMemory;

use super::MAX_PAYLOAD;

/// Length of the packet header.
pub const HEADER_LEN: usize = 44;
/// The only socket type we offer: stream.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (or refused).
    pub const RST: u16 = 3;
    /// The sender will not receive and/or send any more (see [`super::shutdown`]).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's credit (`buf_alloc`, `fwd_cnt`) changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a CREDIT_UPDATE.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags.
pub mod shutdown {
    /// The sender will not receive any more.
    pub const RCV: u32 = 1;
    /// The sender will not send any more.
    pub const SEND: u32 = 2;
}

/// A packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (1 = stream).
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags ([`shutdown`] for SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

impl PacketHeader {
    /// Decodes a header.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        PacketHeader {
            src_cid: u64::from_le_bytes(le(b, 0)),
            dst_cid: u64::from_le_bytes(le(b, 8)),
            src_port: u32::from_le_bytes(le(b, 16)),
            dst_port: u32::from_le_bytes(le(b, 20)),
            len: u32::from_le_bytes(le(b, 24)),
            type_: u16::from_le_bytes(le(b, 28)),
            op: u16::from_le_bytes(le(b, 30)),
            flags: u32::from_le_bytes(le(b, 32)),
            buf_alloc: u32::from_le_bytes(le(b, 36)),
            fwd_cnt: u32::from_le_bytes(le(b, 40)),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a transmitted chain is not a usable packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer than 44 readable bytes: there is no header, so nobody to answer.
    #[error("descriptor chain is shorter than a packet header")]
    ShortHeader,
    /// The header lies (partly) outside guest memory.
    #[error("packet header is outside guest memory")]
    HeaderUnreadable,
    /// `len` is over [`MAX_PAYLOAD`].
    #[error("payload length {} is over the limit", .0.len)]
    Oversized(PacketHeader),
    /// `len` is more than the chain holds after the header.
    #[error("payload length {} is beyond the {available} bytes the chain holds", .header.len)]
    BeyondChain {
        /// The packet's header.
        header: PacketHeader,
        /// Readable bytes after the header.
        available: u64,
    },
    /// The payload lies (partly) outside guest memory.
    #[error("packet payload is outside guest memory")]
    PayloadUnreadable(PacketHeader),
}

impl PacketError {
    /// The header, when it could be read (so the sender can be answered with RST).
    pub fn header(&self) -> Option<&PacketHeader> {
        match self {
            PacketError::ShortHeader | PacketError::HeaderUnreadable => None,
            PacketError::Oversized(h)
            | PacketError::BeyondChain { header: h, .. }
            | PacketError::PayloadUnreadable(h) => Some(h),
        }
    }
}

pub use crate::virtio::chain::{read_at, total_len, write_at, BufferError};

/// Reads the packet in `bufs` (the device-readable buffers of a tx chain, in order). The payload
/// of an RW packet goes into `payload` (cleared first, at most [`MAX_PAYLOAD`] bytes); other
/// operations carry none we use, but their `len` is validated all the same.
pub fn read_packet(
    mem: &GuestMemory,
    bufs: &[(GuestAddress, u32)],
    payload: &mut Vec<u8>,
) -> Result<PacketHeader, PacketError> {
    payload.clear();
    let total = total_len(bufs);
    if total < HEADER_LEN as u64 {
        return Err(PacketError::ShortHeader);
    }
    let mut raw = [0u8; HEADER_LEN];
    read_at(mem, bufs, 0, &mut raw).map_err(|_| PacketError::HeaderUnreadable)?;
    let header = PacketHeader::from_bytes(&raw);
    if header.len as usize > MAX_PAYLOAD {
        return Err(PacketError::Oversized(header));
    }
    let available = total - HEADER_LEN as u64;
    if u64::from(header.len) > available {
        return Err(PacketError::BeyondChain { header, available });
    }
    if header.op == op::RW {
        payload.resize(header.len as usize, 0);
        read_at(mem, bufs, HEADER_LEN as u64, payload)
            .map_err(|_| PacketError::PayloadUnreadable(header))?;
    }
    Ok(header)
}

/// Writes a packet into `bufs` (the device-writable buffers of an rx chain); returns its length.
pub fn write_packet(
    mem: &GuestMemory,
    bufs: &[(GuestAddress, u32)],
    header: &PacketHeader,
    payload: &[u8],
) -> Result<u32, BufferError> {
    write_at(mem, bufs, 0, &header.to_bytes())?;
    write_at(mem, bufs, HEADER_LEN as u64, payload)?;
    Ok((HEADER_LEN + payload.len()) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{memory, BUF_BASE, MEM_SIZE};
    use vm_memory::Bytes;

    fn sample() -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0xdead_beef,
            buf_alloc: 256 << 10,
            fwd_cnt: 0xffff_fff0,
        }
    }

    #[test]
    fn header_round_trips_with_the_spec_layout() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &0xffff_fff0u32.to_le_bytes());
        assert_eq!(PacketHeader::from_bytes(&b), h);
    }

    #[test]
    fn header_and_payload_split_across_buffers_in_any_way() {
        let mem = memory();
        let h = sample();
        let mut packet = h.to_bytes().to_vec();
        packet.extend_from_slice(b"hello");
        // Every split point, into two or three buffers, scattered in memory.
        for a in 0..=packet.len() {
            for b in a..=packet.len() {
                let parts = [&packet[..a], &packet[a..b], &packet[b..]];
                let bufs: Vec<(GuestAddress, u32)> = parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let addr = GuestAddress(BUF_BASE + 0x1000 * (3 - i as u64));
                        mem.write_slice(p, addr).unwrap();
                        (addr, p.len() as u32)
                    })
                    .collect();
                let mut payload = Vec::new();
                assert_eq!(read_packet(&mem, &bufs, &mut payload), Ok(h), "{a}/{b}");
                assert_eq!(payload, b"hello");
                // And back out through the same split.
                let mut out = sample();
                out.op = op::RESPONSE;
                assert_eq!(write_packet(&mem, &bufs, &out, b"hello"), Ok(49));
                assert_eq!(read_packet(&mem, &bufs, &mut payload), Ok(out));
            }
        }
    }

    #[test]
    fn bad_chains_are_reported_with_the_header_when_there_is_one() {
        let mem = memory();
        let at = GuestAddress(BUF_BASE);
        let mut payload = Vec::new();
        let mut h = sample();
        mem.write_slice(&h.to_bytes(), at).unwrap();
        assert_eq!(
            read_packet(&mem, &[(at, 43)], &mut payload),
            Err(PacketError::ShortHeader)
        );
        assert_eq!(
            read_packet(&mem, &[(at, 44)], &mut payload),
            Err(PacketError::BeyondChain {
                header: h,
                available: 0
            })
        );
        h.len = MAX_PAYLOAD as u32 + 1;
        mem.write_slice(&h.to_bytes(), at).unwrap();
        let e = read_packet(&mem, &[(at, 1 << 20)], &mut payload).unwrap_err();
        assert_eq!(e, PacketError::Oversized(h));
        assert_eq!(e.header(), Some(&h));
        assert!(payload.is_empty());
        // Outside guest memory: header, then payload.
        let end = GuestAddress(MEM_SIZE as u64 - 10);
        assert_eq!(
            read_packet(&mem, &[(end, 100)], &mut payload),
            Err(PacketError::HeaderUnreadable)
        );
        h.len = 100;
        mem.write_slice(&h.to_bytes(), at).unwrap();
        assert_eq!(
            read_packet(&mem, &[(at, 44), (end, 100)], &mut payload),
            Err(PacketError::PayloadUnreadable(h))
        );
        // Lengths that would overflow a u32 when added up are fine: only what is needed is read.
        let huge = vec![(at, u32::MAX); 8];
        assert_eq!(read_packet(&mem, &huge, &mut payload), Ok(h));
        assert_eq!(payload.len(), 100);
        // A write that does not fit fails instead of truncating.
        assert!(write_packet(&mem, &[(at, 40)], &h, &[]).is_err());
        assert!(write_packet(&mem, &[(at, 50)], &h, &[0; 7]).is_err());
    }
}
