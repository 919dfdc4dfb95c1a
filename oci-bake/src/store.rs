//! The content-addressed store: blobs by digest, image records, root filesystem images.
//!
//! ```text
//! $SUPERMACHINE_HOME (or ~/.local/share/supermachine)
//!   blobs/sha256/<hex>     manifests, configs, layers: verified, immutable
//!   images/<hash>.json     one record per image name
//!   rootfs/<key>.squashfs  merged root filesystems, keyed by their layers
//!   tmp/                   partial downloads and builds (renamed into place when complete)
//! ```
//! Every file appears atomically (written to `tmp/`, fsynced, renamed), so a crash or a bad
//! download never leaves a half-written blob where a good one is expected, and concurrent
//! pulls of the same blob each write their own temporary file.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::digest::{Digest, HashingWriter};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Content did not match its digest.
    #[error("content of {expected} does not match its digest (got {actual}): corrupt or tampered")]
    DigestMismatch {
        /// The digest it should have.
        expected: Digest,
        /// The digest it has.
        actual: Digest,
    },
    /// Content is larger than allowed.
    #[error("blob {digest} is larger than {limit} bytes")]
    TooLarge {
        /// The blob.
        digest: Digest,
        /// The limit.
        limit: u64,
    },
    /// Content is shorter than its descriptor says.
    #[error("blob {digest} is truncated: {got} of {expected} bytes")]
    Truncated {
        /// The blob.
        digest: Digest,
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// An image record is unreadable.
    #[error("image record {path} is corrupt: {detail}")]
    CorruptRecord {
        /// The file.
        path: PathBuf,
        /// The parse error.
        detail: String,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What the store knows about a pulled image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The normalised reference it was pulled by.
    pub name: String,
    /// The manifest digest (for archives without one, the digest of our synthesized manifest).
    pub manifest: Digest,
    /// The configuration blob.
    pub config: Digest,
    /// Layer blobs, bottom first.
    pub layers: Vec<Digest>,
    /// Compressed size of the layers.
    pub size: u64,
    /// The root filesystem image's key (file `rootfs/<key>.squashfs`).
    pub rootfs: String,
    /// How to run it.
    pub run_config: RunConfig,
    /// Seconds since the epoch when it was pulled.
    pub pulled_at: u64,
}

/// The store at a root directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// `$SUPERMACHINE_HOME`, else `$XDG_DATA_HOME/supermachine`, else
    /// `~/.local/share/supermachine`.
    pub fn default_root() -> PathBuf {
        if let Some(h) = std::env::var_os("SUPERMACHINE_HOME") {
            return PathBuf::from(h);
        }
        if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
            return PathBuf::from(d).join("supermachine");
        }
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".local/share/supermachine")
    }

    /// Opens (creating) the store at `root`. The store is private to its user (0700): bakes
    /// under it hold guest memory, and guest memory holds secrets. A store of this user's
    /// made more open by an older version is closed again.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io_err("cannot create", &root))?;
        let meta = fs::metadata(&root).map_err(io_err("cannot read", &root))?;
        // SAFETY: geteuid has no preconditions.
        if meta.uid() == unsafe { libc::geteuid() } && meta.mode() & 0o077 != 0 {
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
                .map_err(io_err("cannot make private", &root))?;
        }
        for dir in ["blobs/sha256", "images", "rootfs", "tmp"] {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(io_err("cannot create", &p))?;
        }
        Ok(Store { root })
    }

    /// Takes the store's lock, shared (`exclusive` false: pulls, which add files no record
    /// names yet) or exclusive (prune, which deletes what no record names); held until the
    /// guard drops. Waits for the other kind to be released.
    pub fn lock(&self, exclusive: bool) -> Result<StoreLock, StoreError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.root.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("cannot open", &path))?;
        let how = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
                return Ok(StoreLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("cannot lock", &path)(e));
            }
        }
    }

    /// The store's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// A fresh path in `tmp/` (not created).
    pub fn temp_path(&self, hint: &str) -> PathBuf {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{hint}.{}.{n}", std::process::id()))
    }

    /// Streams `reader` into the blob `expected`, verifying size (`expected_size`, if known,
    /// also the limit) and digest before it becomes visible.
    pub fn put_blob(
        &self,
        expected: &Digest,
        expected_size: Option<u64>,
        limit: u64,
        reader: impl Read,
    ) -> Result<PathBuf, StoreError> {
        let dest = self.blob_path(expected);
        if dest.is_file() {
            return Ok(dest);
        }
        let tmp = self.temp_path(expected.hex());
        let result = self.write_verified(expected, expected_size, limit, reader, &tmp, &dest);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|_| dest)
    }

    fn write_verified(
        &self,
        expected: &Digest,
        expected_size: Option<u64>,
        limit: u64,
        reader: impl Read,
        tmp: &Path,
        dest: &Path,
    ) -> Result<(), StoreError> {
        let file = File::create(tmp).map_err(io_err("cannot create", tmp))?;
        let mut w = HashingWriter::new(io::BufWriter::new(file));
        let max = expected_size.unwrap_or(limit).min(limit);
        // Read one byte past the limit to tell "exactly at the limit" from "over it".
        let copied = io::copy(&mut reader.take(max.saturating_add(1)), &mut w)
            .map_err(io_err("cannot download into", tmp))?;
        if copied > max {
            return Err(StoreError::TooLarge {
                digest: expected.clone(),
                limit: max,
            });
        }
        if let Some(size) = expected_size {
            if copied < size {
                return Err(StoreError::Truncated {
                    digest: expected.clone(),
                    got: copied,
                    expected: size,
                });
            }
        }
        let (actual, buf) = w.finish();
        if &actual != expected {
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let file = buf.into_inner().map_err(|e| StoreError::Io {
            what: "cannot write",
            path: tmp.to_owned(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err("cannot sync", tmp))?;
        fs::rename(tmp, dest).map_err(io_err("cannot install", dest))
    }

    /// Streams `reader` into the store under the digest of its content (for sources that do not
    /// name their blobs by digest, like `docker save` archives); returns (digest, size).
    pub fn import(&self, reader: impl Read, limit: u64) -> Result<(Digest, u64), StoreError> {
        let tmp = self.temp_path("import");
        let result = (|| {
            let file = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
            let mut w = HashingWriter::new(io::BufWriter::new(file));
            let copied = io::copy(&mut reader.take(limit.saturating_add(1)), &mut w)
                .map_err(io_err("cannot import into", &tmp))?;
            let (digest, buf) = w.finish();
            if copied > limit {
                return Err(StoreError::TooLarge { digest, limit });
            }
            let file = buf.into_inner().map_err(|e| StoreError::Io {
                what: "cannot write",
                path: tmp.clone(),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(io_err("cannot sync", &tmp))?;
            let dest = self.blob_path(&digest);
            fs::rename(&tmp, &dest).map_err(io_err("cannot install", &dest))?;
            Ok((digest, copied))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Stores `bytes` and returns their digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let d = Digest::of(bytes);
        self.put_blob(&d, Some(bytes.len() as u64), bytes.len() as u64, bytes)?;
        Ok(d)
    }

    /// Reads a (small) blob, at most `limit` bytes.
    pub fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        let mut f = File::open(&path).map_err(io_err("cannot open", &path))?;
        let mut v = Vec::new();
        Read::by_ref(&mut f)
            .take(limit.saturating_add(1))
            .read_to_end(&mut v)
            .map_err(io_err("cannot read", &path))?;
        if v.len() as u64 > limit {
            return Err(StoreError::TooLarge {
                digest: digest.clone(),
                limit,
            });
        }
        Ok(v)
    }

    /// Writes `bytes` to `dest` atomically (via `tmp/`, fsync, rename).
    pub fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let tmp = self.temp_path("write");
        let result = (|| {
            let mut f = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
            f.write_all(bytes).map_err(io_err("cannot write", &tmp))?;
            f.sync_all().map_err(io_err("cannot sync", &tmp))?;
            fs::rename(&tmp, dest).map_err(io_err("cannot install", dest))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Where the root filesystem image `key` lives.
    pub fn rootfs_path(&self, key: &str) -> PathBuf {
        self.root.join("rootfs").join(format!("{key}.squashfs"))
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", &Digest::of(name.as_bytes()).hex()[..32]))
    }

    /// Saves (replaces) the record for `record.name`.
    pub fn save_image(&self, record: &ImageRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(record).unwrap_or_default();
        self.write_atomic(&self.record_path(&record.name), &json)
    }

    /// The record for `name`, if pulled.
    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        let path = self.record_path(name);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::CorruptRecord {
                        path,
                        detail: e.to_string(),
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("cannot read", &path)(e)),
        }
    }

    /// Every image record, sorted by name (unreadable records are skipped).
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("cannot list", &dir))? {
            let Ok(entry) = entry else { continue };
            if let Ok(bytes) = fs::read(entry.path()) {
                if let Ok(r) = serde_json::from_slice::<ImageRecord>(&bytes) {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Forgets the image `name`; returns whether it existed. Blobs stay until [`Store::prune`].
    pub fn remove_image(&self, name: &str) -> Result<bool, StoreError> {
        let path = self.record_path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("cannot remove", &path)(e)),
        }
    }

    /// Deletes blobs and root filesystems no image refers to, and stale temporary files and
    /// staging directories; returns (entries removed, bytes freed). Holds the store's lock
    /// exclusively, so a pull in progress (whose files no record names yet) loses nothing.
    pub fn prune(&self) -> Result<(usize, u64), StoreError> {
        let _lock = self.lock(true)?;
        let images = self.images()?;
        let mut keep_blobs = std::collections::HashSet::new();
        let mut keep_rootfs = std::collections::HashSet::new();
        for r in &images {
            keep_blobs.insert(r.manifest.hex().to_string());
            keep_blobs.insert(r.config.hex().to_string());
            keep_blobs.extend(r.layers.iter().map(|d| d.hex().to_string()));
            keep_rootfs.insert(format!("{}.squashfs", r.rootfs));
        }
        let mut removed = 0;
        let mut freed = 0;
        let mut sweep = |dir: PathBuf, keep: &dyn Fn(&str) -> bool| -> Result<(), StoreError> {
            for entry in fs::read_dir(&dir).map_err(io_err("cannot list", &dir))? {
                let Ok(entry) = entry else { continue };
                let name = entry.file_name().to_string_lossy().into_owned();
                if keep(&name) {
                    continue;
                }
                // Not following symlinks: a link is removed, never what it points to.
                let Ok(meta) = fs::symlink_metadata(entry.path()) else {
                    continue;
                };
                let (gone, size) = if meta.is_dir() {
                    let size = tree_size(&entry.path());
                    (fs::remove_dir_all(entry.path()).is_ok(), size)
                } else {
                    (fs::remove_file(entry.path()).is_ok(), meta.len())
                };
                if gone {
                    removed += 1;
                    freed += size;
                }
            }
            Ok(())
        };
        sweep(self.root.join("blobs/sha256"), &|n| keep_blobs.contains(n))?;
        sweep(self.root.join("rootfs"), &|n| keep_rootfs.contains(n))?;
        // Temporary files of processes that are gone (ours carry the pid).
        sweep(self.root.join("tmp"), &|n| {
            n.split('.')
                .rev()
                .nth(1)
                .and_then(|pid| pid.parse::<i32>().ok())
                // SAFETY: kill with signal 0 only checks whether the process exists.
                .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0)
        })?;
        Ok((removed, freed))
    }
}

/// The store's lock, held while this lives (see [`Store::lock`]).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// Bytes of the regular files under `dir` (symlinks not followed).
fn tree_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match fs::symlink_metadata(e.path()) {
            Ok(m) if m.is_dir() => tree_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        let dir = std::env::temp_dir().join(format!(
            "oci-store-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        Store::open(dir).unwrap()
    }

    #[test]
    fn blobs_are_verified_before_they_appear() {
        let s = store();
        let good = Digest::of(b"hello");
        let p = s.put_blob(&good, Some(5), 1 << 20, &b"hello"[..]).unwrap();
        assert_eq!(fs::read(p).unwrap(), b"hello");
        let other = Digest::of(b"other");
        let err = s
            .put_blob(&other, Some(5), 1 << 20, &b"hellx"[..])
            .unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!s.has_blob(&other));
        let err = s
            .put_blob(&other, Some(10), 1 << 20, &b"other"[..])
            .unwrap_err();
        assert!(matches!(err, StoreError::Truncated { .. }), "{err}");
        let err = s.put_blob(&other, None, 3, &b"other"[..]).unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
        // Nothing half-written is left behind.
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
        fs::remove_dir_all(s.root()).ok();
    }

    #[test]
    fn concurrent_pulls_of_one_blob_do_not_corrupt_it() {
        let s = store();
        let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        let d = Digest::of(&data);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    s.put_blob(&d, Some(data.len() as u64), u64::MAX, &data[..])
                        .unwrap();
                });
            }
        });
        assert_eq!(fs::read(s.blob_path(&d)).unwrap(), data);
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
        fs::remove_dir_all(s.root()).ok();
    }

    #[test]
    fn records_round_trip_and_prune_keeps_what_is_referenced() {
        let s = store();
        let layer = s.put_bytes(b"layer").unwrap();
        let config = s.put_bytes(b"config").unwrap();
        let manifest = s.put_bytes(b"manifest").unwrap();
        let orphan = s.put_bytes(b"orphan").unwrap();
        fs::write(s.rootfs_path("k1"), b"fs").unwrap();
        fs::write(s.rootfs_path("old"), b"fs").unwrap();
        let rec = ImageRecord {
            name: "docker.io/library/x:latest".into(),
            manifest,
            config,
            layers: vec![layer.clone()],
            size: 5,
            rootfs: "k1".into(),
            run_config: RunConfig::default(),
            pulled_at: 0,
        };
        s.save_image(&rec).unwrap();
        assert_eq!(s.image(&rec.name).unwrap(), Some(rec.clone()));
        assert_eq!(s.images().unwrap(), vec![rec.clone()]);
        let (removed, _) = s.prune().unwrap();
        assert_eq!(removed, 2);
        assert!(s.has_blob(&layer) && !s.has_blob(&orphan));
        assert!(s.rootfs_path("k1").exists() && !s.rootfs_path("old").exists());
        assert!(s.remove_image(&rec.name).unwrap());
        assert!(!s.remove_image(&rec.name).unwrap());
        s.prune().unwrap();
        assert!(!s.has_blob(&layer));
        fs::remove_dir_all(s.root()).ok();
    }

    #[test]
    fn prune_removes_stale_staging_directories_and_waits_for_pulls() {
        let s = store();
        // A staging tree left by a pull that died (pid 0x7fff_fffe is never a live process),
        // with a symlink out of the store that must not be followed.
        let stale = s.root().join("tmp/staging.2147483646.0");
        fs::create_dir_all(stale.join("usr/bin")).unwrap();
        fs::write(stale.join("usr/bin/tool"), b"12345").unwrap();
        let outside = s.root().with_extension("outside");
        fs::write(&outside, b"keep me").unwrap();
        std::os::unix::fs::symlink(&outside, stale.join("link")).unwrap();
        // Ours, still running: kept.
        let live = s.temp_path("staging");
        fs::create_dir_all(&live).unwrap();
        let (removed, freed) = s.prune().unwrap();
        assert_eq!(removed, 1);
        assert!(freed >= 5, "{freed}");
        assert!(!stale.exists() && live.exists());
        assert_eq!(fs::read(&outside).unwrap(), b"keep me");

        // A pull holds the lock shared: prune waits for it.
        let pulling = s.lock(false).unwrap();
        let root = s.root().to_path_buf();
        let pruned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = pruned.clone();
        let pruner = std::thread::spawn(move || {
            Store::open(root).unwrap().prune().unwrap();
            flag.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!pruned.load(Ordering::SeqCst), "prune ran during a pull");
        drop(pulling);
        pruner.join().unwrap();
        assert!(pruned.load(Ordering::SeqCst));
        fs::remove_dir_all(s.root()).ok();
        fs::remove_file(&outside).ok();
    }
}
