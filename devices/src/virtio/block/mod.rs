//! virtio-blk backed by a host file: read, write, flush, get-id, discard and write-zeroes, with
//! a read-only mode. Every request is validated against the chain it came in and the disk size;
//! a bad one gets an error status, never a panic or an access outside guest memory.

mod device;
mod request;

pub use device::{Block, BlockError};
pub use request::{parse_request, Request, RequestError, RequestKind};

/// Sector size in bytes.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size the device offers.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the device ID (GET_ID).
pub const ID_LEN: usize = 20;

/// Feature bits (virtio 1.2, 5.2.3).
pub mod features {
    /// `seg_max` is valid.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The disk is read-only.
    pub const RO: u64 = 1 << 5;
    /// `blk_size` is valid.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command.
    pub const FLUSH: u64 = 1 << 9;
    /// Discard command.
    pub const DISCARD: u64 = 1 << 13;
    /// Write-zeroes command.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request status values.
pub mod req_status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error (including writes to a read-only disk and out-of-range sectors).
    pub const IOERR: u8 = 1;
    /// Unknown request type.
    pub const UNSUPP: u8 = 2;
}
