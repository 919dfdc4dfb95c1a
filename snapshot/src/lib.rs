//! The on-disk format of a supermachine snapshot, and nothing about what is in it.
//!
//! A snapshot is one directory:
//! - `state`: `MAGIC` (8 bytes), format version (u32 LE), payload length (u64 LE), CRC-32 of the
//!   payload (u32 LE), then the payload: any `serde` value, encoded with `bincode`. The VMM
//!   decides what the value is (vCPU, VM and device state, configuration, identity); this crate
//!   only guarantees that what is read back is exactly what was written, or an error.
//! - `memory`: guest RAM, region after region, each starting page-aligned; all-zero pages are
//!   holes, so the file is as small as the memory the guest used and a restore can map it
//!   (`MAP_PRIVATE`) instead of reading it.
//!
//! Writing is atomic: everything goes into a temporary directory beside the target, is synced,
//! and is renamed over it; a crash leaves the old snapshot or the new one, never a mix.
//!
//! Does not own: what the state means, how memory is mapped into a VM, or compatibility checks
//! beyond the format version (the VMM compares identities it stores in the payload).
//!
//! ```no_run
//! use snapshot::{MemoryRegion, SnapshotWriter};
//!
//! # fn main() -> Result<(), snapshot::SnapshotError> {
//! let dir = std::path::Path::new("my-snapshot");
//! let ram = vec![0u8; 1 << 20];
//! let regions = MemoryRegion::layout(&[(0, ram.len() as u64)]);
//! let mut writer = SnapshotWriter::create(dir)?;
//! writer.write_memory(&regions[0], &ram)?;
//! writer.commit(&("any serde state", 42u32))?; // atomically replaces `dir`
//! let (what, n): (String, u32) = snapshot::read_state(dir)?;
//! # let _ = (what, n);
//! # Ok(()) }
//! ```

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bincode::Options as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// First bytes of a state file.
pub const MAGIC: [u8; 8] = *b"SMSNAPST";
/// The format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Alignment of regions in the memory file, and the granularity of holes.
pub const PAGE_SIZE: u64 = 4096;
/// The largest state payload accepted (guards allocation on a corrupt length).
pub const MAX_STATE_LEN: u64 = 256 << 20;

const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The state file is not a supermachine snapshot.
    #[error("{0} is not a supermachine snapshot state file")]
    NotASnapshot(PathBuf),
    /// Written by another format version.
    #[error("{path} is snapshot format version {found}; this supermachine reads version {FORMAT_VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// Shorter than its header says, or corrupt.
    #[error("{path} is damaged: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The memory file is shorter than the regions the state describes.
    #[error("{path} is truncated: {len} bytes, the snapshot needs {needed}")]
    TruncatedMemory {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// What the regions need.
        needed: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One guest RAM region's place in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Length in bytes (a multiple of [`PAGE_SIZE`]).
    pub len: u64,
    /// Where it starts in the memory file (page-aligned).
    pub file_offset: u64,
}

impl MemoryRegion {
    /// Lays out regions of these (guest address, length) one after another, page-aligned.
    pub fn layout(regions: &[(u64, u64)]) -> Vec<MemoryRegion> {
        let mut offset = 0;
        regions
            .iter()
            .map(|&(guest_addr, len)| {
                let r = MemoryRegion {
                    guest_addr,
                    len,
                    file_offset: offset,
                };
                offset += len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
                r
            })
            .collect()
    }
}

/// Encodes `state` as a state file's bytes.
pub fn encode_state<T: Serialize>(state: &T) -> Vec<u8> {
    // bincode of plain structs only fails on a writer error, and a Vec never fails.
    let payload = bincode::serialize(state).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a state file's bytes; `path` is for messages.
pub fn decode_state<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, SnapshotError> {
    decode_checked(bytes, path, false)
}

/// Like [`read_state`], but decodes only the first fields of the payload, as `T`: for a state
/// whose layout changed, to read the field that says which layout it has.
pub fn read_state_prefix<T: DeserializeOwned>(dir: &Path) -> Result<T, SnapshotError> {
    let (path, bytes) = read_state_bytes(dir)?;
    decode_checked(&bytes, &path, true)
}

/// The header, length and checksum checks, then the payload as `T` (its start only with
/// `prefix`).
fn decode_checked<T: DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
    prefix: bool,
) -> Result<T, SnapshotError> {
    let corrupt = |why: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    if bytes.len() < 8 || bytes[..8] != MAGIC {
        return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(corrupt("its header is cut short".into()));
    }
    let found = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if found != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found,
        });
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(bytes[20..24].try_into().unwrap_or_default());
    let payload = &bytes[HEADER_LEN..];
    if len > MAX_STATE_LEN || payload.len() as u64 != len {
        return Err(corrupt(format!(
            "the header says {len} bytes of state, the file has {}",
            payload.len()
        )));
    }
    if crc32fast::hash(payload) != crc {
        return Err(corrupt("the state's checksum does not match".into()));
    }
    // The encoding `bincode::serialize` uses, with a bound on what a length may allocate.
    let options = bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(MAX_STATE_LEN);
    let decoded = if prefix {
        options.allow_trailing_bytes().deserialize(payload)
    } else {
        options.reject_trailing_bytes().deserialize(payload)
    };
    decoded.map_err(|e| corrupt(format!("the state does not decode: {e}")))
}

/// Reads and checks `DIR/state`.
pub fn read_state<T: DeserializeOwned>(dir: &Path) -> Result<T, SnapshotError> {
    let (path, bytes) = read_state_bytes(dir)?;
    decode_state(&bytes, &path)
}

/// `DIR/state` and its bytes.
fn read_state_bytes(dir: &Path) -> Result<(PathBuf, Vec<u8>), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let mut f = File::open(&path).map_err(io_err(&path))?;
    let mut bytes = Vec::new();
    // Bounded: a huge file is corrupt, not something to load.
    Read::by_ref(&mut f)
        .take(MAX_STATE_LEN + HEADER_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(&path))?;
    Ok((path, bytes))
}

/// Checks that `DIR/memory` holds every region; returns the open file.
pub fn open_memory(dir: &Path, regions: &[MemoryRegion]) -> Result<File, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let f = File::open(&path).map_err(io_err(&path))?;
    check_memory_len(&f, dir, regions)?;
    Ok(f)
}

/// Checks that the open memory file `f` of snapshot `dir` (still) holds every region. Check
/// again after mapping it: a file cut short under a mapping makes the pages past its end
/// fault with SIGBUS when touched, so a shrink in between must be an error first.
pub fn check_memory_len(
    f: &File,
    dir: &Path,
    regions: &[MemoryRegion],
) -> Result<(), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let len = f.metadata().map_err(io_err(&path))?.len();
    let needed = regions
        .iter()
        .map(|r| r.file_offset.saturating_add(r.len))
        .max()
        .unwrap_or(0);
    if len < needed {
        return Err(SnapshotError::TruncatedMemory { path, len, needed });
    }
    Ok(())
}

/// Creates (truncating) a file only its owner can read or write.
fn private_file(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Writes one region's bytes at its offset, leaving all-zero pages as holes.
fn write_sparse(f: &mut File, region: &MemoryRegion, bytes: &[u8]) -> io::Result<()> {
    let zero = [0u8; PAGE_SIZE as usize];
    let mut offset = region.file_offset;
    for page in bytes.chunks(PAGE_SIZE as usize) {
        if page != &zero[..page.len()] {
            f.seek(SeekFrom::Start(offset))?;
            f.write_all(page)?;
        }
        offset += page.len() as u64;
    }
    Ok(())
}

/// A snapshot being written: [`SnapshotWriter::commit`] makes it appear at its path.
pub struct SnapshotWriter {
    target: PathBuf,
    tmp: PathBuf,
    memory: File,
    memory_len: u64,
}

impl SnapshotWriter {
    /// Starts a snapshot that will replace `dir` (its parent is created if missing).
    pub fn create(dir: &Path) -> Result<Self, SnapshotError> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "snapshot".into());
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        // Guest memory holds the guest's secrets: the user's alone.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io_err(&tmp))?;
        let mpath = tmp.join(MEMORY_FILE);
        let memory = private_file(&mpath).map_err(io_err(&mpath))?;
        Ok(SnapshotWriter {
            target: dir.to_path_buf(),
            tmp,
            memory,
            memory_len: 0,
        })
    }

    /// Writes one memory region's contents (`bytes.len() == region.len`).
    pub fn write_memory(
        &mut self,
        region: &MemoryRegion,
        bytes: &[u8],
    ) -> Result<(), SnapshotError> {
        let path = self.tmp.join(MEMORY_FILE);
        write_sparse(&mut self.memory, region, bytes).map_err(io_err(&path))?;
        self.memory_len = self
            .memory_len
            .max(region.file_offset + region.len.div_ceil(PAGE_SIZE) * PAGE_SIZE);
        Ok(())
    }

    /// Writes the state file, syncs everything and renames the snapshot into place.
    pub fn commit<T: Serialize>(self, state: &T) -> Result<PathBuf, SnapshotError> {
        let mpath = self.tmp.join(MEMORY_FILE);
        // Trailing holes still count: the file must be as long as its regions.
        self.memory
            .set_len(self.memory_len)
            .and_then(|_| self.memory.sync_all())
            .map_err(io_err(&mpath))?;
        let spath = self.tmp.join(STATE_FILE);
        (|| {
            let mut f = private_file(&spath)?;
            f.write_all(&encode_state(state))?;
            f.sync_all()
        })()
        .map_err(io_err(&spath))?;
        // Replace: move the old snapshot aside, the new one in, then drop the old.
        let old = self.tmp.with_extension("old");
        let had_old = self.target.exists();
        if had_old {
            std::fs::rename(&self.target, &old).map_err(io_err(&self.target))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.target) {
            if had_old {
                let _ = std::fs::rename(&old, &self.target);
            }
            return Err(io_err(&self.target)(e));
        }
        if had_old {
            let _ = std::fs::remove_dir_all(&old);
        }
        if let Some(parent) = self.target.parent() {
            if let Ok(d) = File::open(if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            }) {
                let _ = d.sync_all();
            }
        }
        Ok(self.target.clone())
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        // Uncommitted (or committed: then the temporary is gone already).
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Example {
        name: String,
        regs: Vec<u64>,
        memory: Vec<MemoryRegion>,
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sm-snapshot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write_example(dir: &Path) -> (Example, Vec<u8>) {
        let regions = MemoryRegion::layout(&[(0, 64 << 10), (1 << 32, 8 << 10)]);
        let mut ram = vec![0u8; 64 << 10];
        ram[5000] = 7; // page 1
        ram[(64 << 10) - 1] = 9; // last page
        let high = vec![0u8; 8 << 10];
        let state = Example {
            name: "x".into(),
            regs: vec![1, 2, 3],
            memory: regions.clone(),
        };
        let mut w = SnapshotWriter::create(dir).unwrap();
        w.write_memory(&regions[0], &ram).unwrap();
        w.write_memory(&regions[1], &high).unwrap();
        w.commit(&state).unwrap();
        (state, ram)
    }

    #[test]
    fn state_and_sparse_memory_round_trip() {
        let base = scratch("roundtrip");
        let dir = base.join("snap");
        let (state, ram) = write_example(&dir);
        let back: Example = read_state(&dir).unwrap();
        assert_eq!(back, state);
        let mut f = open_memory(&dir, &state.memory).unwrap();
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), (64 << 10) + (8 << 10));
        assert_eq!(&all[..64 << 10], &ram[..]);
        assert!(all[64 << 10..].iter().all(|b| *b == 0));
        // Only the two pages with data take space (filesystems allocate in blocks ≥ 4 KiB).
        let used = std::fs::metadata(dir.join(MEMORY_FILE)).unwrap().blocks() * 512;
        assert!(used <= 4 * PAGE_SIZE, "{used} bytes allocated");
        // No temporary left beside it.
        let names: Vec<_> = std::fs::read_dir(&base)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("snap")]);
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn damaged_state_files_are_refused_with_the_reason() {
        let base = scratch("damaged");
        let dir = base.join("snap");
        write_example(&dir);
        let good = std::fs::read(dir.join(STATE_FILE)).unwrap();
        let path = Path::new("state");
        // Every single flipped byte is caught (header or payload).
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(decode_state::<Example>(&bad, path).is_err(), "byte {i}");
        }
        // Every truncation is caught.
        for cut in 0..good.len() {
            assert!(
                decode_state::<Example>(&good[..cut], path).is_err(),
                "cut {cut}"
            );
        }
        let mut other = good.clone();
        other[8..12].copy_from_slice(&2u32.to_le_bytes());
        let e = decode_state::<Example>(&other, path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("format version 2"), "{e}");
        let e = decode_state::<Example>(b"\x7fELF....", path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a supermachine snapshot"), "{e}");
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_truncated_memory_file_is_refused() {
        let base = scratch("truncated");
        let dir = base.join("snap");
        let (state, _) = write_example(&dir);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(MEMORY_FILE))
            .unwrap();
        f.set_len(10 << 10).unwrap();
        let e = open_memory(&dir, &state.memory).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_new_snapshot_replaces_the_old_one_whole() {
        let base = scratch("replace");
        let dir = base.join("snap");
        write_example(&dir);
        let mut w = SnapshotWriter::create(&dir).unwrap();
        let r = MemoryRegion::layout(&[(0, 4096)]);
        w.write_memory(&r[0], &[1u8; 4096]).unwrap();
        w.commit(&42u32).unwrap();
        assert_eq!(read_state::<u32>(&dir).unwrap(), 42);
        assert_eq!(
            std::fs::metadata(dir.join(MEMORY_FILE)).unwrap().len(),
            4096
        );
        // An abandoned writer leaves the snapshot as it was.
        let w = SnapshotWriter::create(&dir).unwrap();
        drop(w);
        assert_eq!(read_state::<u32>(&dir).unwrap(), 42);
        assert_eq!(std::fs::read_dir(&base).unwrap().count(), 1);
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_snapshot_is_private_to_its_user() {
        use std::os::unix::fs::PermissionsExt;
        let base = scratch("private");
        let dir = base.join("snap");
        write_example(&dir);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(MEMORY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(STATE_FILE)), 0o600);
        std::fs::remove_dir_all(base).unwrap();
    }
}
