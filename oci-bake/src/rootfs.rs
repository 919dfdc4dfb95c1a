//! The root filesystem image: the merged layer tree written as one squashfs (zstd) image, cached
//! in the store under a key derived from the layer digests.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::Path;

use backhand::compression::Compressor;
use backhand::{FilesystemCompressor, FilesystemWriter, NodeHeader};

use crate::digest::Digest;
use crate::layers::{decompress, extract_entries, LayerError, Limits, NodeKind, Tree};
use crate::store::{Store, StoreError};

/// Bump when the image format or writer settings change (the cache key includes it).
const FORMAT: &str = "squashfs-zstd-v1";

/// Errors building a root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A layer could not be applied.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the image failed.
    #[error("cannot write the root filesystem image: {0}")]
    Write(String),
    /// The image configuration's `rootfs.diff_ids` do not list one digest per layer.
    #[error("the image configuration lists {diff_ids} uncompressed layer digests (rootfs.diff_ids) for {layers} layers")]
    DiffIdCount {
        /// Digests in the configuration.
        diff_ids: usize,
        /// Layers in the manifest.
        layers: usize,
    },
    /// A layer's uncompressed content is not what the image configuration says it is.
    #[error("layer {digest} does not hold what the image configuration says: its uncompressed digest is {found}, the configuration's diff_id is {expected}")]
    DiffIdMismatch {
        /// The layer blob.
        digest: Digest,
        /// Its uncompressed digest.
        found: Digest,
        /// The configuration's `diff_id` for it.
        expected: Digest,
    },
    /// Reading a layer blob failed.
    #[error("cannot read layer {digest}: {source}")]
    ReadLayer {
        /// The layer.
        digest: Digest,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The cache key of the root filesystem made of `layers`.
pub fn key(layers: &[Digest]) -> String {
    let mut s = String::from(FORMAT);
    for l in layers {
        s.push('\n');
        s.push_str(&l.to_string());
    }
    Digest::of(s.as_bytes()).hex()[..32].to_string()
}

fn open_layer(store: &Store, digest: &Digest) -> Result<Box<dyn io::Read>, RootfsError> {
    let err = |source| RootfsError::ReadLayer {
        digest: digest.clone(),
        source,
    };
    let f = File::open(store.blob_path(digest)).map_err(err)?;
    decompress(f).map_err(err)
}

/// Applies `layers` (bottom first) from the store into a tree, checking that each layer's
/// uncompressed content has the digest `diff_ids` gives for it (as containerd does: the image
/// configuration, which the manifest pins, commits to the layers' content).
pub fn merge(
    store: &Store,
    layers: &[Digest],
    diff_ids: &[Digest],
    limits: &Limits,
) -> Result<Tree, RootfsError> {
    if diff_ids.len() != layers.len() {
        return Err(RootfsError::DiffIdCount {
            diff_ids: diff_ids.len(),
            layers: layers.len(),
        });
    }
    let mut tree = Tree::new();
    for (i, (d, expected)) in layers.iter().zip(diff_ids).enumerate() {
        let mut tar = crate::digest::HashingReader::new(open_layer(store, d)?);
        tree.apply_layer(i, &mut tar, limits)?;
        // The tar reader stops at the end-of-archive blocks: what follows counts too.
        io::copy(&mut tar, &mut io::sink()).map_err(|source| RootfsError::ReadLayer {
            digest: d.clone(),
            source,
        })?;
        let found = tar.finish();
        if found != *expected {
            return Err(RootfsError::DiffIdMismatch {
                digest: d.clone(),
                found,
                expected: expected.clone(),
            });
        }
    }
    Ok(tree)
}

/// Builds (if not cached) the root filesystem of `layers`, whose uncompressed digests must be
/// `diff_ids`; returns its key.
pub fn bake(
    store: &Store,
    layers: &[Digest],
    diff_ids: &[Digest],
    limits: &Limits,
) -> Result<String, RootfsError> {
    let key = key(layers);
    let dest = store.rootfs_path(&key);
    if dest.is_file() {
        return Ok(key);
    }
    let tree = merge(store, layers, diff_ids, limits)?;
    let staging = store.temp_path("staging");
    let result = write_image(store, layers, &tree, &staging, &dest);
    let _ = fs::remove_dir_all(&staging);
    result.map(|_| key)
}

fn device_number(major: u32, minor: u32) -> u32 {
    // Linux's new_encode_dev, which squashfs stores.
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn write_image(
    store: &Store,
    layers: &[Digest],
    tree: &Tree,
    staging: &Path,
    dest: &Path,
) -> Result<(), RootfsError> {
    let w_err = |e: &dyn std::fmt::Display| RootfsError::Write(e.to_string());
    fs::create_dir_all(staging).map_err(|e| w_err(&e))?;
    // File data: copy the surviving entries out of each layer, one sequential pass per layer.
    for (layer, wanted) in tree.data_refs() {
        extract_entries(
            layer,
            open_layer(store, &layers[layer])?,
            &wanted,
            |entry, r| {
                let mut f = BufWriter::new(File::create(staging.join(format!("{layer}-{entry}")))?);
                io::copy(r, &mut f)?;
                Ok(())
            },
        )?;
    }
    let mut fs_writer = FilesystemWriter::default();
    fs_writer
        .set_compressor(FilesystemCompressor::new(Compressor::Zstd, None).map_err(|e| w_err(&e))?);
    if let Some(root) = tree.nodes.get("") {
        fs_writer.set_root_mode(root.mode as u16);
        fs_writer.set_root_uid(root.uid);
        fs_writer.set_root_gid(root.gid);
    }
    for (path, node) in tree.nodes.iter().filter(|(p, _)| !p.is_empty()) {
        let header = NodeHeader {
            permissions: (node.mode & 0o7777) as u16,
            uid: node.uid,
            gid: node.gid,
            mtime: node.mtime.min(u64::from(u32::MAX)) as u32,
        };
        let r = match &node.kind {
            NodeKind::Dir => fs_writer.push_dir(path, header),
            NodeKind::File { data, .. } => fs_writer.push_file_from_path(
                staging.join(format!("{}-{}", data.layer, data.entry)),
                path,
                header,
            ),
            NodeKind::Symlink(target) => fs_writer.push_symlink(target.as_str(), path, header),
            NodeKind::Char(maj, min) => {
                fs_writer.push_char_device(device_number(*maj, *min), path, header)
            }
            NodeKind::Block(maj, min) => {
                fs_writer.push_block_device(device_number(*maj, *min), path, header)
            }
            NodeKind::Fifo => fs_writer.push_fifo(path, header),
        };
        r.map_err(|e| RootfsError::Write(format!("{path}: {e}")))?;
    }
    let tmp = store.temp_path("rootfs");
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| w_err(&e))?;
        let mut out = BufWriter::new(file);
        fs_writer.write(&mut out).map_err(|e| w_err(&e))?;
        let file = out.into_inner().map_err(|e| w_err(&e.into_error()))?;
        file.sync_all().map_err(|e| w_err(&e))?;
        fs::rename(&tmp, dest).map_err(|e| w_err(&e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A listing of a squashfs image for comparisons: one line per entry with type, mode, owner,
/// link target or device, and a sha256 of file contents.
pub fn listing(image: &Path) -> Result<Vec<String>, RootfsError> {
    use backhand::{FilesystemReader, InnerNode};
    use std::io::Read;
    let r_err =
        |e: &dyn std::fmt::Display| RootfsError::Write(format!("reading {}: {e}", image.display()));
    let file = io::BufReader::new(File::open(image).map_err(|e| r_err(&e))?);
    let fs = FilesystemReader::from_reader(file).map_err(|e| r_err(&e))?;
    let mut out = Vec::new();
    for node in fs.files() {
        let h = node.header;
        let what = match &node.inner {
            InnerNode::Dir(_) => "dir".to_string(),
            InnerNode::File(f) => {
                let mut data = Vec::new();
                fs.file(f)
                    .reader()
                    .read_to_end(&mut data)
                    .map_err(|e| r_err(&e))?;
                format!("file {}", Digest::of(&data))
            }
            InnerNode::Symlink(l) => format!("symlink {}", l.link.display()),
            InnerNode::CharacterDevice(d) => format!("char {}", d.device_number),
            InnerNode::BlockDevice(d) => format!("block {}", d.device_number),
            InnerNode::NamedPipe => "fifo".into(),
            InnerNode::Socket => "socket".into(),
        };
        out.push(format!(
            "{} {:o} {}:{} {what}",
            node.fullpath.display(),
            h.permissions,
            h.uid,
            h.gid
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::tests::{layer, E};

    #[test]
    fn bakes_a_squashfs_that_reads_back_identically_and_is_cached() {
        let root = std::env::temp_dir().join(format!("oci-rootfs-{}", std::process::id()));
        let store = Store::open(&root).unwrap();
        let l0 = store
            .put_bytes(&layer(&[
                E::Dir("etc", 0o755),
                E::File("etc/hostname", b"box\n", 0, 0o644),
                E::File("bin/busybox", &[0x7f; 100_000], 0, 0o4755),
                E::Link("bin/sh", "busybox"),
                E::Char("dev/null", 1, 3),
            ]))
            .unwrap();
        let l1 = store
            .put_bytes(&layer(&[
                E::File("etc/.wh.hostname", b"", 0, 0o644),
                E::File("home/user/notes", b"hi", 1000, 0o600),
            ]))
            .unwrap();
        // Plain tars: each layer's uncompressed digest is its blob's.
        let diff_ids = [l0.clone(), l1.clone()];
        let k = bake(
            &store,
            &[l0.clone(), l1.clone()],
            &diff_ids,
            &Limits::default(),
        )
        .unwrap();
        let list = listing(&store.rootfs_path(&k)).unwrap();
        let text = list.join("\n");
        assert!(text.contains("/bin/busybox 4755 0:0 file"), "{text}");
        assert!(text.contains("/bin/sh 777 0:0 symlink busybox"), "{text}");
        assert!(
            text.contains(&format!("/dev/null 666 0:0 char {}", device_number(1, 3))),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "/home/user/notes 600 1000:1000 file {}",
                Digest::of(b"hi")
            )),
            "{text}"
        );
        assert!(!text.contains("hostname"), "{text}");
        // Cached: the second bake does no work and returns the same key.
        let modified = fs::metadata(store.rootfs_path(&k))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(
            bake(&store, &[l0, l1], &diff_ids, &Limits::default()).unwrap(),
            k
        );
        assert_eq!(
            fs::metadata(store.rootfs_path(&k))
                .unwrap()
                .modified()
                .unwrap(),
            modified
        );
        fs::remove_dir_all(root).ok();
    }

    #[test]
    fn a_layer_whose_content_is_not_its_diff_id_is_refused() {
        let root = std::env::temp_dir().join(format!("oci-diffid-{}", std::process::id()));
        let store = Store::open(&root).unwrap();
        let plain = layer(&[E::File("etc/motd", b"hello\n", 0, 0o644)]);
        let gz = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&plain).unwrap();
            e.finish().unwrap()
        };
        let blob = store.put_bytes(&gz).unwrap();
        let other = Digest::of(b"another layer");
        let e = bake(
            &store,
            std::slice::from_ref(&blob),
            std::slice::from_ref(&other),
            &Limits::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!(
                "its uncompressed digest is {}",
                Digest::of(&plain)
            )) && e.contains(&format!("the configuration's diff_id is {other}")),
            "{e}"
        );
        // One digest per layer, no fewer.
        let e = bake(&store, std::slice::from_ref(&blob), &[], &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("lists 0 uncompressed layer digests"), "{e}");
        // The right one (the gzip stream's content, not the blob's digest): baked.
        assert!(bake(&store, &[blob], &[Digest::of(&plain)], &Limits::default()).is_ok());
        fs::remove_dir_all(root).ok();
    }
}
