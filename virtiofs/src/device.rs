//! The virtio-fs device (virtio 1.2, 5.11): one high-priority and one request queue, both
//! served by the same FUSE server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use devices::virtio::{features, ActivateError, Interrupt, VirtioDevice};
use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::{Queue, QueueState};
use virtio_queue_fuse::QueueT as _;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_core::GuestMemory;

use crate::bounce::Bounce;
use crate::policy::Policy;

/// The virtio device type of a file system device.
const DEVICE_TYPE: u32 = 26;
/// Bytes of the tag in the configuration space (NUL-padded UTF-8).
pub const TAG_LEN: usize = 36;
/// Room for a whole [`REQUEST_PAGES`] request (a descriptor per page, no indirect tables).
const QUEUE_SIZE: u16 = 1024;
/// The high-priority queue and one request queue.
const NUM_QUEUES: usize = 2;

/// Errors creating a file system device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty, longer than [`TAG_LEN`] bytes, or has a NUL byte.
    #[error("bad virtio-fs tag {0:?}: 1 to {TAG_LEN} bytes, no NUL")]
    BadTag(String),
    /// The shared path is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// The directory could not be opened for sharing.
    #[error("cannot share {path}: {source}")]
    Share {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The guest memory and rings as `fuse-backend-rs` sees them (its own `vm-memory` and
/// `virtio-queue` versions, over the same mappings).
struct Active {
    /// Keeps the mappings the view points into alive.
    _mem: GuestMemory,
    view: vm_memory_fuse::GuestMemoryMmap<()>,
    queues: Vec<virtio_queue_fuse::Queue>,
    interrupt: Arc<Interrupt>,
}

/// A virtio-fs device sharing one host directory (see the [crate docs](crate)).
pub struct Fs {
    tag: [u8; TAG_LEN],
    server: Server<Arc<PassthroughFs<()>>>,
    policy: Policy,
    /// Each request's private copy (see `bounce`).
    bounce: Bounce,
    acked_features: u64,
    active: Option<Active>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// How long the guest may trust cached attributes and names: short, so edits made on the host
/// show in the guest about as soon as a container engine's bind mount would.
const CACHE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl Fs {
    /// A device sharing `dir` under `tag` (the name the guest mounts); `read_only` refuses
    /// every modifying request. On a writable share device nodes are refused and setuid and
    /// setgid bits stripped (see [`Fs::allow_special_files`]).
    pub fn new(tag: &str, dir: &Path, read_only: bool) -> Result<Fs, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
            return Err(FsError::BadTag(tag.into()));
        }
        let share = |source| FsError::Share {
            path: dir.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(dir).map_err(share)?;
        if !meta.is_dir() {
            return Err(FsError::NotADirectory(dir.to_path_buf()));
        }
        let config = Config {
            root_dir: dir.to_string_lossy().into_owned(),
            do_import: true,
            xattr: false,
            cache_policy: CachePolicy::Auto,
            attr_timeout: CACHE_TIMEOUT,
            entry_timeout: CACHE_TIMEOUT,
            ..Default::default()
        };
        let fs = PassthroughFs::<()>::new(config).map_err(share)?;
        fs.import().map_err(share)?;
        let mut t = [0u8; TAG_LEN];
        t[..tag.len()].copy_from_slice(tag.as_bytes());
        Ok(Fs {
            tag: t,
            server: Server::new(Arc::new(fs)),
            policy: Policy {
                read_only,
                special_files: false,
            },
            bounce: Bounce::new().map_err(share)?,
            acked_features: 0,
            active: None,
        })
    }

    /// Lets the guest make device nodes and setuid/setgid files in a writable share (off by
    /// default: with the VMM running as root they would be root's on the host).
    pub fn allow_special_files(mut self, allow: bool) -> Self {
        self.policy.special_files = allow;
        self
    }

    /// Serves every request waiting on queue `index`; whether to interrupt.
    fn serve(&mut self, index: usize) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let Some(q) = a.queues.get_mut(index) else {
            return false;
        };
        let mut used = false;
        loop {
            if q.disable_notification(&a.view).is_err() {
                break;
            }
            let mut progressed = false;
            while let Some(chain) = q.pop_descriptor_chain(&a.view) {
                progressed = true;
                let head = chain.head_index();
                let len = handle(&self.server, self.policy, &mut self.bounce, &a.view, chain);
                if q.add_used(&a.view, head, len).is_err() {
                    break;
                }
                used = true;
            }
            match q.enable_notification(&a.view) {
                Ok(true) if progressed => continue,
                _ => break,
            }
        }
        used && q.needs_notification(&a.view).unwrap_or(true)
    }
}

pub(crate) type Chain<'a> =
    virtio_queue_fuse::DescriptorChain<&'a vm_memory_fuse::GuestMemoryMmap<()>>;

/// Answers one request; the bytes written to the chain. The request is copied first, and
/// the policy and the server see only the copy.
fn handle(
    server: &Server<Arc<PassthroughFs<()>>>,
    policy: Policy,
    bounce: &mut Bounce,
    view: &vm_memory_fuse::GuestMemoryMmap<()>,
    chain: Chain<'_>,
) -> u32 {
    if let Err(errno) = bounce.copy_in(view, chain.clone()) {
        return reply_error(view, chain, errno);
    }
    let Some(request) = bounce.request() else {
        return reply_error(view, chain, libc::EIO);
    };
    if let Some(errno) = policy.apply(request) {
        return reply_error(view, chain, errno);
    }
    let init_flags = init_request_flags(request);
    let Some(reader) = bounce.reader() else {
        return reply_error(view, chain, libc::EIO);
    };
    let Ok(writer) = VirtioFsWriter::new(view, chain.clone()) else {
        return 0;
    };
    let len = match server.handle_message(reader, writer.into(), None, None) {
        Ok(n) => u32::try_from(n).unwrap_or(0),
        Err(e) => {
            tracing::debug!("virtio-fs: request failed: {e}");
            0
        }
    };
    if let Some(capable) = init_flags {
        allow_big_writes(view, chain, len, capable);
    }
    len
}

/// `FUSE_BIG_WRITES` and `FUSE_MAX_PAGES` in `fuse_init_in.flags`.
const BIG_WRITES: u32 = 1 << 5;
const MAX_PAGES: u32 = 1 << 22;
/// Pages per request (1 MiB): requests are round trips through the event loop, so fewer and
/// bigger ones carry more; the server accepts up to 1 MiB of data per request.
const REQUEST_PAGES: u16 = 256;

/// The flags the guest offers, if `request` is its `FUSE_INIT`.
fn init_request_flags(request: &[u8]) -> Option<u32> {
    let h: InHeader = crate::policy::get(request, 0)?;
    if h.opcode != Opcode::Init as u32 {
        return None;
    }
    let init: fuse_backend_rs::abi::fuse_abi::InitIn =
        crate::policy::get(request, std::mem::size_of::<InHeader>())?;
    Some(init.flags)
}

/// The passthrough filesystem does not ask for big writes, so the guest would send every
/// write a page at a time (a request per 4 KiB). Its `FUSE_INIT` reply is amended here to
/// allow requests of [`REQUEST_PAGES`] pages when the guest offers that.
fn allow_big_writes(
    view: &vm_memory_fuse::GuestMemoryMmap<()>,
    chain: Chain<'_>,
    reply_len: u32,
    capable: u32,
) {
    use vm_memory_fuse::Bytes;
    // fuse_out_header (16 bytes), then fuse_init_out: flags at 12, max_write at 20,
    // max_pages at 28.
    const FLAGS: usize = 16 + 12;
    const MAX_WRITE: usize = 16 + 20;
    const MAX_PAGES_AT: usize = 16 + 28;
    if (reply_len as usize) < MAX_PAGES_AT + 2 || capable & (BIG_WRITES | MAX_PAGES) == 0 {
        return;
    }
    let mut reply = vec![0u8; reply_len as usize];
    let bufs: Vec<(vm_memory_fuse::GuestAddress, usize)> = chain
        .writable()
        .map(|d| (d.addr(), d.len() as usize))
        .collect();
    // Read the reply back, amend it, write it again (it may span buffers).
    let copy = |write: bool, reply: &mut [u8]| -> bool {
        let mut done = 0;
        for &(addr, len) in &bufs {
            if done == reply.len() {
                break;
            }
            let n = len.min(reply.len() - done);
            let part = &mut reply[done..done + n];
            let ok = if write {
                view.write_slice(part, addr).is_ok()
            } else {
                view.read_slice(part, addr).is_ok()
            };
            if !ok {
                return false;
            }
            done += n;
        }
        done == reply.len()
    };
    if !copy(false, &mut reply) {
        return;
    }
    let error = i32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
    if error != 0 {
        return;
    }
    let mut flags = u32::from_le_bytes([
        reply[FLAGS],
        reply[FLAGS + 1],
        reply[FLAGS + 2],
        reply[FLAGS + 3],
    ]);
    flags |= capable & (BIG_WRITES | MAX_PAGES);
    reply[FLAGS..FLAGS + 4].copy_from_slice(&flags.to_le_bytes());
    let max_write = u32::from(REQUEST_PAGES) * 4096;
    reply[MAX_WRITE..MAX_WRITE + 4].copy_from_slice(&max_write.to_le_bytes());
    if capable & MAX_PAGES != 0 {
        reply[MAX_PAGES_AT..MAX_PAGES_AT + 2].copy_from_slice(&REQUEST_PAGES.to_le_bytes());
    }
    copy(true, &mut reply);
}

fn reply_error(view: &vm_memory_fuse::GuestMemoryMmap<()>, chain: Chain<'_>, errno: i32) -> u32 {
    let unique = Reader::from_descriptor_chain(view, chain.clone())
        .ok()
        .and_then(|mut r| r.read_obj::<InHeader>().ok())
        .map(|h| h.unique)
        .unwrap_or(0);
    let out = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    let Ok(mut w) = VirtioFsWriter::new(view, chain) else {
        return 0;
    };
    match w.write_obj(out) {
        Ok(()) => out.len,
        Err(_) => 0,
    }
}

/// `mem` as `fuse-backend-rs`' `vm-memory` version sees it: the same host mappings, borrowed.
fn fuse_view(mem: &GuestMemory) -> Option<vm_memory_fuse::GuestMemoryMmap<()>> {
    let mut regions = Vec::new();
    for r in mem.iter() {
        let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
        let len = usize::try_from(r.len()).ok()?;
        // SAFETY: `host..host + len` is a live mapping of guest memory that `Active` keeps
        // alive (it holds `mem`) for as long as the view exists; a raw region does not unmap it.
        let mapping = unsafe {
            vm_memory_fuse::MmapRegion::<()>::build_raw(
                host,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .ok()?;
        let region = vm_memory_fuse::GuestRegionMmap::new(
            mapping,
            vm_memory_fuse::GuestAddress(r.start_addr().0),
        )?;
        regions.push(region);
    }
    vm_memory_fuse::GuestMemoryMmap::from_regions(regions).ok()
}

/// A ring as `fuse-backend-rs`' `virtio-queue` version sees it, where ours left it.
fn fuse_queue(q: &Queue) -> Option<virtio_queue_fuse::Queue> {
    let s = q.state();
    virtio_queue_fuse::Queue::try_from(virtio_queue_fuse::QueueState {
        max_size: s.max_size,
        next_avail: s.next_avail,
        next_used: s.next_used,
        event_idx_enabled: s.event_idx_enabled,
        size: s.size,
        ready: s.ready,
        desc_table: s.desc_table,
        avail_ring: s.avail_ring,
        used_ring: s.used_ring,
    })
    .ok()
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; TAG_LEN + 4];
        config[..TAG_LEN].copy_from_slice(&self.tag);
        config[TAG_LEN..].copy_from_slice(&(NUM_QUEUES as u32 - 1).to_le_bytes());
        devices::virtio::read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let view = fuse_view(&mem).ok_or(ActivateError::InvalidQueue(0))?;
        let mut fuse_queues = Vec::new();
        for (i, q) in queues.iter().enumerate() {
            fuse_queues.push(fuse_queue(q).ok_or(ActivateError::InvalidQueue(i))?);
        }
        self.active = Some(Active {
            _mem: mem,
            view,
            queues: fuse_queues,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        if self.serve(index) {
            if let Some(a) = &self.active {
                a.interrupt.signal_used_queue();
            }
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map(|a| {
                a.queues
                    .iter()
                    .map(|q| {
                        let s = q.state();
                        QueueState {
                            max_size: s.max_size,
                            next_avail: s.next_avail,
                            next_used: s.next_used,
                            event_idx_enabled: s.event_idx_enabled,
                            size: s.size,
                            ready: s.ready,
                            desc_table: s.desc_table,
                            avail_ring: s.avail_ring,
                            used_ring: s.used_ring,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::test_utils::{interrupt, memory, DriverQueue, BUF_BASE};
    use fuse_backend_rs::abi::fuse_abi::{EntryOut, InitIn, MkdirIn, OpenIn, OpenOut, ReadIn};
    use vm_memory::{Bytes, GuestAddress};
    use vm_memory_fuse::ByteValued;

    /// Request buffer at BUF_BASE, reply buffer after it.
    const REQ: u64 = BUF_BASE;
    const REPLY: u64 = BUF_BASE + 0x1_0000;
    const REPLY_LEN: u32 = 0x1_0000;

    struct Driver {
        mem: GuestMemory,
        fs: Fs,
        q: DriverQueue,
        unique: u64,
        _dir: TempDir,
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn driver(read_only: bool, setup: impl FnOnce(&Path)) -> Driver {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let root = std::env::temp_dir().join(format!("virtiofs-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let share = root.join("share");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(root.join("secret"), "outside").unwrap();
        setup(&share);
        let mut fs = Fs::new("share", &share, read_only).unwrap();
        fs.ack_features(fs.features());
        let mem = memory();
        let (_, hiprio) = DriverQueue::new(&mem, 0, QUEUE_SIZE);
        let (q, request) = DriverQueue::new(&mem, 0x8000, QUEUE_SIZE);
        let (irq, _) = interrupt();
        fs.activate(mem.clone(), vec![hiprio, request], irq)
            .unwrap();
        let mut d = Driver {
            mem,
            fs,
            q,
            unique: 0,
            _dir: TempDir(root),
        };
        let (err, init) = d.call(
            26,
            0,
            InitIn {
                major: 7,
                minor: 31,
                max_readahead: 0x2_0000,
                flags: BIG_WRITES | MAX_PAGES,
            }
            .as_slice(),
        );
        assert_eq!(err, 0, "FUSE_INIT");
        // Requests of 256 pages, not one: the reply was amended.
        let u32_at = |i: usize| u32::from_le_bytes(init[i..i + 4].try_into().unwrap());
        assert_eq!(
            u32_at(12) & (BIG_WRITES | MAX_PAGES),
            BIG_WRITES | MAX_PAGES
        );
        assert_eq!(u32_at(20), 256 * 4096, "max_write");
        assert_eq!(u16::from_le_bytes([init[28], init[29]]), 256, "max_pages");
        d
    }

    impl Driver {
        /// Sends one request on the request queue; its error and reply body.
        fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
            self.unique += 1;
            let header = InHeader {
                len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
                opcode,
                unique: self.unique,
                nodeid,
                ..Default::default()
            };
            let mut req = header.as_slice().to_vec();
            req.extend_from_slice(body);
            self.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
            self.q.add(
                &self.mem,
                &[(REQ, req.len() as u32, false), (REPLY, REPLY_LEN, true)],
            );
            self.fs.process_queue(1);
            let used = self.q.take_used(&self.mem);
            assert_eq!(used.len(), 1, "one reply");
            let len = used[0].1 as usize;
            assert!(len >= 16, "reply of {len} bytes");
            let mut reply = vec![0u8; len];
            self.mem
                .read_slice(&mut reply, GuestAddress(REPLY))
                .unwrap();
            let out = OutHeader::from_slice(&reply[..16]).copied().unwrap();
            assert_eq!(out.unique, self.unique);
            (-out.error, reply[16..].to_vec())
        }

        fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
            let mut body = name.as_bytes().to_vec();
            body.push(0);
            match self.call(1, parent, &body) {
                (0, r) => Ok(EntryOut::from_slice(&r[..std::mem::size_of::<EntryOut>()])
                    .copied()
                    .unwrap()),
                (e, _) => Err(e),
            }
        }

        fn read_file(&mut self, node: u64) -> Result<Vec<u8>, i32> {
            let open = OpenIn {
                flags: libc::O_RDONLY as u32,
                fuse_flags: 0,
            };
            let (e, r) = self.call(14, node, open.as_slice());
            if e != 0 {
                return Err(e);
            }
            let fh = OpenOut::from_slice(&r[..16]).unwrap().fh;
            let read = ReadIn {
                fh,
                offset: 0,
                size: 4096,
                ..Default::default()
            };
            match self.call(15, node, read.as_slice()) {
                (0, data) => Ok(data),
                (e, _) => Err(e),
            }
        }
    }

    #[test]
    fn lookup_open_and_read_a_shared_file() {
        let mut d = driver(false, |dir| {
            std::fs::write(dir.join("hello.txt"), "hello from the host\n").unwrap();
        });
        let e = d.lookup(1, "hello.txt").unwrap();
        assert_eq!(e.attr.size, 20);
        assert_eq!(d.read_file(e.nodeid).unwrap(), b"hello from the host\n");
        assert_eq!(d.lookup(1, "missing").unwrap_err(), libc::ENOENT);
        // A directory made through the share appears on the host.
        let mut body = MkdirIn {
            mode: 0o755,
            umask: 0,
        }
        .as_slice()
        .to_vec();
        body.extend_from_slice(b"made-in-guest\0");
        assert_eq!(d.call(9, 1, &body).0, 0);
        assert!(d._dir.0.join("share/made-in-guest").is_dir());
    }

    #[test]
    fn nothing_outside_the_shared_directory_is_reachable() {
        let mut d = driver(false, |dir| {
            std::os::unix::fs::symlink("/etc", dir.join("etc")).unwrap();
            std::os::unix::fs::symlink("../secret", dir.join("up")).unwrap();
        });
        // `..` of the root is the root (or refused), never its parent.
        if let Ok(e) = d.lookup(1, "..") {
            assert!(d.lookup(e.nodeid, "secret").is_err(), "`..` left the share");
        }
        // Symlinks are links to the guest, never followed on the host.
        let etc = d.lookup(1, "etc").unwrap();
        assert_eq!(etc.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        let (e, target) = d.call(5, etc.nodeid, &[]);
        assert_eq!((e, target.as_slice()), (0, b"/etc".as_slice()));
        assert!(d.lookup(etc.nodeid, "passwd").is_err());
        let up = d.lookup(1, "up").unwrap();
        assert_eq!(up.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        assert!(
            d.read_file(up.nodeid).is_err(),
            "a symlink was opened on the host"
        );
        // Names with a slash are not paths.
        assert!(d.lookup(1, "../secret").is_err());
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_after_lookup_does_not_lead_outside() {
        let mut d = driver(false, |dir| {
            std::fs::create_dir(dir.join("d")).unwrap();
            std::fs::write(dir.join("d/inside"), "in").unwrap();
        });
        let sub = d.lookup(1, "d").unwrap();
        assert!(d.lookup(sub.nodeid, "inside").is_ok());
        // The race: between the guest's lookup of `d` and its use, `d` becomes a symlink to
        // the directory holding `secret` (outside the share).
        let share = d._dir.0.join("share");
        std::fs::rename(share.join("d"), d._dir.0.join("moved-away")).unwrap();
        std::os::unix::fs::symlink(&d._dir.0, share.join("d")).unwrap();
        // The guest's inode is still the old directory, wherever it went; `secret` is not in it.
        assert_eq!(d.lookup(sub.nodeid, "secret").unwrap_err(), libc::ENOENT);
        // A fresh lookup finds a symlink, which the host never follows.
        let again = d.lookup(1, "d").unwrap();
        assert_eq!(again.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        assert!(d.lookup(again.nodeid, "secret").is_err());
    }

    #[test]
    fn a_read_only_share_refuses_every_change_on_the_host_side() {
        let mut d = driver(true, |dir| {
            std::fs::write(dir.join("f"), "keep").unwrap();
        });
        let f = d.lookup(1, "f").unwrap();
        assert_eq!(d.read_file(f.nodeid).unwrap(), b"keep");
        let write_open = OpenIn {
            flags: libc::O_WRONLY as u32,
            fuse_flags: 0,
        };
        assert_eq!(d.call(14, f.nodeid, write_open.as_slice()).0, libc::EROFS);
        let trunc = OpenIn {
            flags: (libc::O_RDONLY | libc::O_TRUNC) as u32,
            fuse_flags: 0,
        };
        assert_eq!(d.call(14, f.nodeid, trunc.as_slice()).0, libc::EROFS);
        let mut body = MkdirIn {
            mode: 0o755,
            umask: 0,
        }
        .as_slice()
        .to_vec();
        body.extend_from_slice(b"new\0");
        assert_eq!(d.call(9, 1, &body).0, libc::EROFS);
        assert_eq!(d.call(10, 1, b"f\0").0, libc::EROFS);
        assert_eq!(std::fs::read(d._dir.0.join("share/f")).unwrap(), b"keep");
        assert!(!d._dir.0.join("share/new").exists());
        // Undefined opcodes are refused before the server sees them.
        assert_eq!(d.call(7, 1, &[]).0, libc::ENOSYS);
        assert_eq!(d.call(19, 1, &[]).0, libc::ENOSYS);
    }

    #[test]
    fn a_writable_share_makes_no_device_nodes_and_no_setuid_files() {
        use fuse_backend_rs::abi::fuse_abi::{CreateIn, MknodIn, SetattrIn};
        use std::os::unix::fs::PermissionsExt;
        let mut d = driver(false, |_| {});
        let share = d._dir.0.join("share");
        let named = |args: &[u8], name: &str| {
            let mut body = args.to_vec();
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body
        };
        // A block device (8:0, a host disk): refused, nothing made.
        let mknod = MknodIn {
            mode: libc::S_IFBLK | 0o666,
            rdev: 0x0800,
            umask: 0,
            padding: 0,
        };
        assert_eq!(d.call(8, 1, &named(mknod.as_slice(), "sda")).0, libc::EPERM);
        assert!(std::fs::symlink_metadata(share.join("sda")).is_err());
        // A setuid, setgid file: made, without those bits.
        let create = CreateIn {
            flags: (libc::O_CREAT | libc::O_WRONLY) as u32,
            mode: libc::S_IFREG | 0o6755,
            umask: 0,
            fuse_flags: 0,
        };
        assert_eq!(d.call(35, 1, &named(create.as_slice(), "prog")).0, 0);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&share.join("prog")), 0o755);
        // chmod u+s afterwards: stripped too.
        let prog = d.lookup(1, "prog").unwrap();
        let chmod = SetattrIn {
            valid: 1, // FATTR_MODE
            mode: 0o4755,
            ..Default::default()
        };
        assert_eq!(d.call(4, prog.nodeid, chmod.as_slice()).0, 0);
        assert_eq!(mode(&share.join("prog")), 0o755);
        // Opcode 0 is not FUSE's: refused before the server converts it.
        assert_eq!(d.call(0, 1, &[]).0, libc::ENOSYS);
    }

    #[test]
    fn bad_tags_and_paths_are_refused() {
        let dir = std::env::temp_dir();
        assert!(matches!(Fs::new("", &dir, false), Err(FsError::BadTag(_))));
        assert!(matches!(
            Fs::new(&"x".repeat(37), &dir, false),
            Err(FsError::BadTag(_))
        ));
        let file = dir.join(format!("virtiofs-not-a-dir-{}", std::process::id()));
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            Fs::new("t", &file, false),
            Err(FsError::NotADirectory(_))
        ));
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(
            Fs::new("t", Path::new("/nonexistent/dir"), false),
            Err(FsError::Share { .. })
        ));
    }
}
