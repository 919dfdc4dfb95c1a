//! The virtio-blk device model.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::Bytes;
use vmm_core::GuestMemory;

use super::request::{parse_request, Request, RequestKind};
use super::{features as blk_features, req_status, ID_LEN, QUEUE_SIZE, SECTOR_SIZE};
use crate::virtio::{device_type, features, ActivateError, Interrupt, VirtioDevice};

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The file could not be opened.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is empty or not a whole number of sectors.
    #[error("disk {path} is {len} bytes: not a whole, non-zero number of 512-byte sectors")]
    Size {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
}

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// A virtio-blk device backed by a host file.
pub struct Block {
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; ID_LEN],
    acked_features: u64,
    config: Vec<u8>,
    active: Option<Active>,
}

/// Largest discard/write-zeroes range in sectors per segment.
const MAX_RANGE_SECTORS: u32 = 1 << 22;
/// Most segments in one discard/write-zeroes request.
const MAX_RANGE_SEGMENTS: u32 = 1;

impl Block {
    /// Opens `path` as a disk; `read_only` opens it without write access and advertises RO.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?
            .len();
        if len == 0 || len % SECTOR_SIZE != 0 {
            return Err(BlockError::Size {
                path: path.to_owned(),
                len,
            });
        }
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Self::from_file(file, len / SECTOR_SIZE, read_only, id))
    }

    fn from_file(file: File, sectors: u64, read_only: bool, id: [u8; ID_LEN]) -> Self {
        // struct virtio_blk_config, up to the write-zeroes fields.
        let mut config = vec![0u8; 60];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes()); // seg_max
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        config[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        config[40..44].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes()); // max_discard_seg
        config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        config[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        config[52..56].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        Block {
            file,
            read_only,
            sectors,
            id,
            acked_features: 0,
            config,
            active: None,
        }
    }

    /// Number of 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Runs one request; returns (status, bytes written into guest buffers).
    fn execute(&mut self, mem: &GuestMemory, req: &Request) -> (u8, u32) {
        let in_range = |sector: u64, bytes: u64| {
            sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(bytes))
                .is_some_and(|end| end <= self.sectors * SECTOR_SIZE)
        };
        match req.kind {
            RequestKind::In => {
                if !in_range(req.sector, req.data_len) {
                    return (req_status::IOERR, 0);
                }
                match self.transfer(mem, req, false) {
                    Ok(()) => (req_status::OK, req.data_len as u32),
                    Err(_) => (req_status::IOERR, 0),
                }
            }
            RequestKind::Out => {
                if self.read_only || !in_range(req.sector, req.data_len) {
                    return (req_status::IOERR, 0);
                }
                match self.transfer(mem, req, true) {
                    Ok(()) => (req_status::OK, 0),
                    Err(_) => (req_status::IOERR, 0),
                }
            }
            RequestKind::Flush => {
                if self.read_only {
                    return (req_status::OK, 0);
                }
                match self.file.sync_all() {
                    Ok(()) => (req_status::OK, 0),
                    Err(_) => (req_status::IOERR, 0),
                }
            }
            RequestKind::GetId => {
                let mut written = 0u32;
                let mut rest: &[u8] = &self.id;
                for &(addr, len) in &req.data {
                    let n = rest.len().min(len as usize);
                    if n == 0 || mem.write_slice(&rest[..n], addr).is_err() {
                        break;
                    }
                    rest = &rest[n..];
                    written += n as u32;
                }
                (req_status::OK, written)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if self.read_only {
                    return (req_status::IOERR, 0);
                }
                match self.ranges(mem, req) {
                    Ok(()) => (req_status::OK, 0),
                    Err(_) => (req_status::IOERR, 0),
                }
            }
            RequestKind::Unsupported(_) => (req_status::UNSUPP, 0),
        }
    }

    fn transfer(&mut self, mem: &GuestMemory, req: &Request, to_disk: bool) -> std::io::Result<()> {
        let mut offset = req.sector * SECTOR_SIZE;
        for &(addr, len) in &req.data {
            self.file.seek(SeekFrom::Start(offset))?;
            let res = if to_disk {
                mem.write_all_volatile_to(addr, &mut self.file, len as usize)
            } else {
                mem.read_exact_volatile_from(addr, &mut self.file, len as usize)
            };
            res.map_err(|e| std::io::Error::other(e.to_string()))?;
            offset += u64::from(len);
        }
        Ok(())
    }

    /// Discard and write-zeroes: segments of `{le64 sector, le32 num_sectors, le32 flags}`.
    fn ranges(&mut self, mem: &GuestMemory, req: &Request) -> std::io::Result<()> {
        let bad = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
        if req.data_len == 0
            || req.data_len % 16 != 0
            || req.data_len / 16 > u64::from(MAX_RANGE_SEGMENTS)
        {
            return Err(bad());
        }
        let mut seg = [0u8; 16];
        let (addr, len) = req.data[0];
        if len < 16 {
            return Err(bad());
        }
        mem.read_slice(&mut seg, addr).map_err(|_| bad())?;
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let count = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        if count > MAX_RANGE_SECTORS
            || sector
                .checked_add(u64::from(count))
                .is_none_or(|end| end > self.sectors)
        {
            return Err(bad());
        }
        let mode = if req.kind == RequestKind::Discard {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate on our own open file descriptor with in-range offsets.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                (sector * SECTOR_SIZE) as libc::off_t,
                (u64::from(count) * SECTOR_SIZE) as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = features::VERSION_1
            | features::RING_EVENT_IDX
            | blk_features::SEG_MAX
            | blk_features::BLK_SIZE
            | blk_features::FLUSH;
        if self.read_only {
            f |= blk_features::RO;
        } else {
            f |= blk_features::DISCARD | blk_features::WRITE_ZEROES;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let queue = queues.remove(0);
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        if index != 0 {
            return;
        }
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mem = active.mem.clone();
        let notify = crate::virtio::queue::drain(&mut active.queue, &mem, |chain| {
            match parse_request(chain) {
                Ok(req) => {
                    let (status, written) = self.execute(&mem, &req);
                    if mem.write_obj(status, req.status_addr).is_ok() {
                        written + 1
                    } else {
                        0
                    }
                }
                Err((_, Some(status_addr))) => {
                    let _ = mem.write_obj(req_status::IOERR, status_addr);
                    1
                }
                Err((_, None)) => 0,
            }
        });
        if notify {
            active.interrupt.signal_used_queue();
        }
        self.active = Some(active);
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }
    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::*;
    use std::io::{Read, Write};
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    const QSIZE: u16 = 16;
    const HDR: u64 = BUF_BASE;
    const DATA: u64 = BUF_BASE + 0x1000;
    const STATUS: u64 = BUF_BASE + 0x10_0000;

    fn disk(sectors: u64) -> (File, PathBuf) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "blk-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![0u8; (sectors * SECTOR_SIZE) as usize])
            .unwrap();
        (f, path)
    }

    struct Rig {
        mem: GuestMemory,
        blk: Block,
        path: PathBuf,
        irq: Arc<CountingIrq>,
        used: u64,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            std::fs::remove_file(&self.path).ok();
        }
    }

    fn rig(read_only: bool, descs: &[virtio_queue::desc::RawDescriptor]) -> Rig {
        let (_, path) = disk(64);
        let mem = memory();
        let mut blk = Block::open(&path, read_only).unwrap();
        blk.ack_features(blk.features());
        let queue = queue_with(&mem, QSIZE, descs);
        let used = queue.used_ring();
        let (interrupt, irq) = interrupt();
        blk.activate(mem.clone(), vec![queue], interrupt).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        Rig {
            mem,
            blk,
            path,
            irq,
            used,
        }
    }

    fn header(mem: &GuestMemory, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn status(r: &Rig) -> u8 {
        r.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn three(kind_writable: bool, len: u32) -> Vec<virtio_queue::desc::RawDescriptor> {
        vec![
            desc(HDR, 16, F_NEXT, 1),
            desc(
                DATA,
                len,
                F_NEXT | if kind_writable { F_WRITE } else { 0 },
                2,
            ),
            desc(STATUS, 1, F_WRITE, 0),
        ]
    }

    #[test]
    fn write_then_read_round_trips_through_the_file() {
        let r = rig(false, &three(false, 1024));
        let mut r = r;
        header(&r.mem, 1, 3);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        r.blk.process_queue(0);
        assert_eq!(status(&r), req_status::OK);
        assert_eq!(used_entry(&r.mem, r.used, 0), (0, 1));
        assert_eq!(r.irq.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        let mut on_disk = vec![0u8; 1024];
        let mut f = File::open(&r.path).unwrap();
        f.seek(SeekFrom::Start(3 * 512)).unwrap();
        f.read_exact(&mut on_disk).unwrap();
        assert_eq!(on_disk, pattern);

        // Read it back through a second device on the same file.
        let mut r2 = rig(false, &three(true, 1024));
        std::fs::copy(&r.path, &r2.path).unwrap();
        r2.blk = Block::open(&r2.path, false).unwrap();
        let q = queue_with(&r2.mem, QSIZE, &three(true, 1024));
        r2.used = q.used_ring();
        let (i, _) = interrupt();
        r2.blk.activate(r2.mem.clone(), vec![q], i).unwrap();
        header(&r2.mem, 0, 3);
        r2.blk.process_queue(0);
        assert_eq!(status(&r2), req_status::OK);
        assert_eq!(used_entry(&r2.mem, r2.used, 0), (0, 1025));
        let mut back = vec![0u8; 1024];
        r2.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn read_only_disk_rejects_writes_with_ioerr() {
        let mut r = rig(true, &three(false, 512));
        assert_ne!(r.blk.features() & blk_features::RO, 0);
        header(&r.mem, 1, 0);
        r.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
        r.blk.process_queue(0);
        assert_eq!(status(&r), req_status::IOERR);
        let on_disk = std::fs::read(&r.path).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0));
    }

    #[test]
    fn out_of_range_and_overflowing_sectors_are_ioerr() {
        for sector in [63, 64, u64::MAX / 512, u64::MAX] {
            let mut r = rig(false, &three(true, 1024));
            header(&r.mem, 0, sector);
            r.blk.process_queue(0);
            assert_eq!(status(&r), req_status::IOERR, "sector {sector}");
        }
    }

    #[test]
    fn flush_get_id_and_unknown_types() {
        let mut r = rig(
            false,
            &[desc(HDR, 16, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)],
        );
        header(&r.mem, 4, 0);
        r.blk.process_queue(0);
        assert_eq!(status(&r), req_status::OK);

        let mut r = rig(false, &three(true, 20));
        header(&r.mem, 8, 0);
        r.blk.process_queue(0);
        assert_eq!(status(&r), req_status::OK);
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert!(id.starts_with(b"blk-test-"));

        let mut r = rig(false, &three(true, 512));
        header(&r.mem, 99, 0);
        r.blk.process_queue(0);
        assert_eq!(status(&r), req_status::UNSUPP);
    }

    #[test]
    fn discard_and_write_zeroes_clear_ranges() {
        for kind in [11u32, 13] {
            let mut r = rig(false, &three(false, 16));
            std::fs::write(&r.path, vec![0xffu8; 64 * 512]).unwrap();
            header(&r.mem, kind, 0);
            let mut seg = [0u8; 16];
            seg[0..8].copy_from_slice(&2u64.to_le_bytes());
            seg[8..12].copy_from_slice(&3u32.to_le_bytes());
            r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
            r.blk.process_queue(0);
            assert_eq!(status(&r), req_status::OK, "kind {kind}");
            let d = std::fs::read(&r.path).unwrap();
            assert!(d[..1024].iter().all(|&b| b == 0xff));
            assert!(d[1024..5 * 512].iter().all(|&b| b == 0));
            assert!(d[5 * 512..].iter().all(|&b| b == 0xff));
        }
    }

    #[test]
    fn malformed_chains_get_an_error_status_or_are_dropped_without_panicking() {
        let out_of_memory = MEM_SIZE as u64 - 256;
        let cases: Vec<(&str, Vec<virtio_queue::desc::RawDescriptor>, Option<u8>)> = vec![
            (
                "writable header",
                vec![
                    desc(HDR, 16, F_NEXT | F_WRITE, 1),
                    desc(STATUS, 1, F_WRITE, 0),
                ],
                Some(req_status::IOERR),
            ),
            (
                "short header",
                vec![desc(HDR, 8, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)],
                Some(req_status::IOERR),
            ),
            (
                "read into a device-readable buffer",
                three(false, 512).into_iter().collect(),
                None, // set per case below: header says IN
            ),
            (
                "data beyond guest memory",
                vec![
                    desc(HDR, 16, F_NEXT, 1),
                    desc(out_of_memory, 4096, F_NEXT | F_WRITE, 2),
                    desc(STATUS, 1, F_WRITE, 0),
                ],
                Some(req_status::IOERR),
            ),
            (
                "length not whole sectors",
                three(true, 100),
                Some(req_status::IOERR),
            ),
            (
                "no status: last buffer readable",
                vec![desc(HDR, 16, F_NEXT, 1), desc(DATA, 512, 0, 0)],
                Some(0xff),
            ),
            (
                "status buffer beyond memory",
                vec![desc(HDR, 16, F_NEXT, 1), desc(u64::MAX - 1, 1, F_WRITE, 0)],
                Some(0xff),
            ),
            (
                // The queue ends such a chain early: no status buffer, returned unanswered.
                "buffer longer than guest memory",
                vec![
                    desc(HDR, 16, F_NEXT, 1),
                    desc(0, u32::MAX, F_NEXT | F_WRITE, 2),
                    desc(STATUS, 1, F_WRITE, 0),
                ],
                Some(0xff),
            ),
            (
                "transfer over the per-request limit",
                vec![
                    desc(HDR, 16, F_NEXT, 1),
                    desc(0, 8 << 20, F_NEXT | F_WRITE, 2),
                    desc(8 << 20, 8 << 20, F_NEXT | F_WRITE, 3),
                    desc(0, 8 << 20, F_NEXT | F_WRITE, 4),
                    desc(8 << 20, 8 << 20, F_NEXT | F_WRITE, 5),
                    desc(0, 8 << 20, F_NEXT | F_WRITE, 6),
                    desc(8 << 20, 8 << 20, F_NEXT | F_WRITE, 7),
                    desc(0, 8 << 20, F_NEXT | F_WRITE, 8),
                    desc(8 << 20, 8 << 20, F_NEXT | F_WRITE, 9),
                    desc(0, 8 << 20, F_NEXT | F_WRITE, 10),
                    desc(STATUS, 1, F_WRITE, 0),
                ],
                Some(req_status::IOERR),
            ),
        ];
        for (name, descs, expected) in cases {
            let mut r = rig(false, &descs);
            header(&r.mem, 0, 0); // IN
            r.blk.process_queue(0);
            let expected = expected.unwrap_or(req_status::IOERR);
            assert_eq!(status(&r), expected, "{name}");
            assert_eq!(
                used_idx(&r.mem, r.used),
                1,
                "{name}: the chain must be returned"
            );
        }
    }

    #[test]
    fn an_available_index_far_ahead_does_not_spin() {
        // Found by the fuzzer: the ring claims thousands of entries the queue cannot hold;
        // popping fails, and "more available" must not loop forever.
        let mut r = rig(false, &three(true, 512));
        let avail_idx_addr = GuestAddress(u64::from(QSIZE) * 16 + 2);
        r.mem.write_obj(0x8000u16, avail_idx_addr).unwrap();
        header(&r.mem, 0, 0);
        r.blk.process_queue(0);
    }

    #[test]
    fn descriptor_loops_and_bad_indices_do_not_hang() {
        // A chain whose `next` points back at itself, and one pointing past the table.
        for descs in [
            vec![desc(HDR, 16, F_NEXT, 0)],
            vec![desc(HDR, 16, F_NEXT, QSIZE + 5)],
        ] {
            let mut r = rig(false, &descs);
            header(&r.mem, 0, 0);
            r.blk.process_queue(0);
        }
    }

    #[test]
    fn refuses_odd_sized_and_empty_files() {
        let path = std::env::temp_dir().join(format!("blk-odd-{}", std::process::id()));
        std::fs::write(&path, [0u8; 100]).unwrap();
        assert!(matches!(
            Block::open(&path, false),
            Err(BlockError::Size { .. })
        ));
        std::fs::write(&path, []).unwrap();
        assert!(matches!(
            Block::open(&path, false),
            Err(BlockError::Size { .. })
        ));
        std::fs::remove_file(&path).ok();
        assert!(matches!(
            Block::open(Path::new("/nonexistent/disk.img"), false),
            Err(BlockError::Open { .. })
        ));
    }
}
