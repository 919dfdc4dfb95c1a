//! Applying image layers: gzip, zstd or plain tar streams, bottom first, into one merged tree,
//! honouring OCI whiteouts (`.wh.NAME`) and opaque directories (`.wh..wh..opq`).
//!
//! Nothing is extracted to the host filesystem while merging: the tree holds metadata and, for
//! regular files, a reference to the tar entry that holds the data. Paths are normalised and
//! anything that climbs out of the root (`..`, hard links or relative symlinks escaping it,
//! entries below a symlink) is refused, so a hostile layer cannot reach outside the image.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read};

/// Limits that protect the host from decompression bombs and absurd layers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most decompressed bytes across all layers.
    pub max_bytes: u64,
    /// Most entries in the merged tree.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 32 << 30,
            max_entries: 2_000_000,
        }
    }
}

/// Why a layer cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The compressed stream or tar archive is broken or truncated.
    #[error("layer {layer}: malformed or truncated archive: {detail}")]
    Corrupt {
        /// Layer index, bottom first.
        layer: usize,
        /// What went wrong.
        detail: String,
    },
    /// A path or link leaves the image's root.
    #[error("layer {layer}: {path:?} escapes the image root ({why}); refusing the image")]
    Escape {
        /// Layer index.
        layer: usize,
        /// The offending entry.
        path: String,
        /// How it escapes.
        why: &'static str,
    },
    /// The image is larger than the limits allow.
    #[error("image exceeds the limit of {limit} {what} after decompression")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
    /// A hard link to something that is not a regular file in the image.
    #[error("layer {layer}: hard link {path:?} points to {target:?}, which is not a file")]
    BadHardLink {
        /// Layer index.
        layer: usize,
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
}

/// Where a regular file's data is: entry `entry` (0-based, in tar order) of layer `layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataRef {
    /// Layer index, bottom first.
    pub layer: usize,
    /// Entry index within the layer's tar.
    pub entry: usize,
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory.
    Dir,
    /// A regular file.
    File {
        /// Where its data is.
        data: DataRef,
        /// Its size.
        size: u64,
    },
    /// A symbolic link.
    Symlink(String),
    /// A character device.
    Char(u32, u32),
    /// A block device.
    Block(u32, u32),
    /// A named pipe.
    Fifo,
}

/// A node of the merged tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// What it is.
    pub kind: NodeKind,
    /// Permission bits (including setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

impl Node {
    fn implicit_dir() -> Node {
        Node {
            kind: NodeKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
        }
    }
}

/// The merged root filesystem: paths relative to `/` (no leading slash; `""` is the root).
#[derive(Debug, Clone, Default)]
pub struct Tree {
    /// Nodes by path; a parent sorts before its children.
    pub nodes: BTreeMap<String, Node>,
    bytes: u64,
}

/// Opens a layer blob: gzip and zstd by their magic numbers, anything else as plain tar.
pub fn decompress<'a>(reader: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut r = BufReader::with_capacity(1 << 16, reader);
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
    } else {
        Box::new(r)
    })
}

/// Normalises a tar path: drops `./`, leading `/` and `.` components; refuses `..`.
pub fn normalize(path: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

/// True if a relative symlink at `path` pointing to `target` climbs above the root.
fn symlink_escapes(path: &str, target: &str) -> bool {
    if target.starts_with('/') {
        return false; // absolute targets resolve inside the guest's root
    }
    let mut depth = parent_of(path).split('/').filter(|c| !c.is_empty()).count() as i64;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

enum Change {
    Whiteout(String),
    Opaque(String),
    Put(String, Node),
}

impl Tree {
    /// An empty tree with a root directory.
    pub fn new() -> Tree {
        let mut nodes = BTreeMap::new();
        nodes.insert(String::new(), Node::implicit_dir());
        Tree { nodes, bytes: 0 }
    }

    fn remove_below(&mut self, dir: &str) {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let doomed: Vec<String> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    fn remove(&mut self, path: &str) {
        if self.nodes.remove(path).is_some() {
            self.remove_below(path);
        }
    }

    fn ensure_parents(&mut self, layer: usize, path: &str) -> Result<(), LayerError> {
        let mut at = String::new();
        let parent = parent_of(path);
        if parent.is_empty() {
            return Ok(());
        }
        for c in parent.split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(c);
            match self.nodes.get(&at) {
                Some(n) if n.kind == NodeKind::Dir => {}
                Some(_) => {
                    return Err(LayerError::Escape {
                        layer,
                        path: path.into(),
                        why: "a parent is a symlink or a file",
                    })
                }
                None => {
                    self.nodes.insert(at.clone(), Node::implicit_dir());
                }
            }
        }
        Ok(())
    }

    /// Applies one decompressed layer tar on top of the tree.
    pub fn apply_layer(
        &mut self,
        layer: usize,
        tar: impl Read,
        limits: &Limits,
    ) -> Result<(), LayerError> {
        let corrupt = |e: io::Error| LayerError::Corrupt {
            layer,
            detail: e.to_string(),
        };
        let mut archive = tar::Archive::new(tar);
        let mut changes = Vec::new();
        // Hard links may point at files of this same layer, not yet in the tree.
        let mut this_layer: HashMap<String, Node> = HashMap::new();
        for (index, entry) in archive.entries().map_err(corrupt)?.enumerate() {
            let mut entry = entry.map_err(corrupt)?;
            let raw_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let path = normalize(&raw_path).ok_or(LayerError::Escape {
                layer,
                path: raw_path.clone(),
                why: "contains ..",
            })?;
            let header = entry.header();
            let meta = |kind| Node {
                kind,
                mode: header.mode().unwrap_or(0o644) & 0o7777,
                uid: header.uid().unwrap_or(0) as u32,
                gid: header.gid().unwrap_or(0) as u32,
                mtime: header.mtime().unwrap_or(0),
            };
            let name = path.rsplit('/').next().unwrap_or("");
            if name == ".wh..wh..opq" {
                changes.push(Change::Opaque(parent_of(&path).to_string()));
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                let parent = parent_of(&path);
                let target = if parent.is_empty() {
                    hidden.to_string()
                } else {
                    format!("{parent}/{hidden}")
                };
                changes.push(Change::Whiteout(target));
                continue;
            }
            use tar::EntryType as T;
            let kind = match header.entry_type() {
                T::Directory => NodeKind::Dir,
                T::Regular | T::Continuous | T::GNUSparse => {
                    let size = entry.size();
                    self.bytes = self.bytes.saturating_add(size);
                    if self.bytes > limits.max_bytes {
                        return Err(LayerError::TooLarge {
                            what: "bytes",
                            limit: limits.max_bytes,
                        });
                    }
                    let data = DataRef {
                        layer,
                        entry: index,
                    };
                    let node = meta(NodeKind::File { data, size });
                    this_layer.insert(path.clone(), node.clone());
                    io::copy(&mut entry, &mut io::sink()).map_err(corrupt)?;
                    changes.push(Change::Put(path, node));
                    continue;
                }
                T::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    if symlink_escapes(&path, &target) {
                        return Err(LayerError::Escape {
                            layer,
                            path,
                            why: "symlink climbs above the root",
                        });
                    }
                    NodeKind::Symlink(target)
                }
                T::Link => {
                    let raw = entry
                        .link_name_bytes()
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    let target = normalize(&raw).ok_or(LayerError::Escape {
                        layer,
                        path: path.clone(),
                        why: "hard link target contains ..",
                    })?;
                    let found = this_layer
                        .get(&target)
                        .or_else(|| self.nodes.get(&target))
                        .filter(|n| matches!(n.kind, NodeKind::File { .. }))
                        .cloned();
                    let Some(node) = found else {
                        return Err(LayerError::BadHardLink {
                            layer,
                            path,
                            target,
                        });
                    };
                    // A hard link shares its target's data and metadata.
                    this_layer.insert(path.clone(), node.clone());
                    changes.push(Change::Put(path, node));
                    continue;
                }
                T::Char => NodeKind::Char(
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0),
                ),
                T::Block => NodeKind::Block(
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0),
                ),
                T::Fifo => NodeKind::Fifo,
                // PAX/GNU metadata entries are consumed by the tar reader; others are skipped.
                _ => continue,
            };
            let node = meta(kind);
            // Drain the data now: the archive is read sequentially.
            io::copy(&mut entry, &mut io::sink()).map_err(corrupt)?;
            changes.push(Change::Put(path, node));
        }
        // Whiteouts and opaque markers hide what lower layers had, whatever their order in
        // this layer's archive; then this layer's entries go in.
        for c in &changes {
            match c {
                Change::Opaque(dir) => self.remove_below(dir),
                Change::Whiteout(p) => self.remove(p),
                Change::Put(..) => {}
            }
        }
        for c in changes {
            if let Change::Put(path, node) = c {
                if path.is_empty() {
                    // The root's own entry: keep it a directory, take its metadata.
                    if node.kind == NodeKind::Dir {
                        self.nodes.insert(path, node);
                    }
                    continue;
                }
                self.ensure_parents(layer, &path)?;
                let replaces_dir =
                    matches!(self.nodes.get(&path), Some(n) if n.kind == NodeKind::Dir);
                if replaces_dir && node.kind != NodeKind::Dir {
                    self.remove_below(&path);
                }
                self.nodes.insert(path, node);
                if self.nodes.len() > limits.max_entries {
                    return Err(LayerError::TooLarge {
                        what: "entries",
                        limit: limits.max_entries as u64,
                    });
                }
            }
        }
        Ok(())
    }

    /// The file data references still in the tree, by layer.
    pub fn data_refs(&self) -> BTreeMap<usize, Vec<usize>> {
        let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for n in self.nodes.values() {
            if let NodeKind::File { data, .. } = n.kind {
                by_layer.entry(data.layer).or_default().push(data.entry);
            }
        }
        for v in by_layer.values_mut() {
            v.sort_unstable();
            v.dedup();
        }
        by_layer
    }
}

/// Copies the data of the tar entries `wanted` (sorted) out of a decompressed layer, calling
/// `sink(entry_index, reader)` for each.
pub fn extract_entries(
    layer: usize,
    tar: impl Read,
    wanted: &[usize],
    mut sink: impl FnMut(usize, &mut dyn Read) -> io::Result<()>,
) -> Result<(), LayerError> {
    let corrupt = |e: io::Error| LayerError::Corrupt {
        layer,
        detail: e.to_string(),
    };
    let mut archive = tar::Archive::new(tar);
    let mut next = wanted.iter().peekable();
    for (index, entry) in archive.entries().map_err(corrupt)?.enumerate() {
        let Some(&&want) = next.peek() else { break };
        let mut entry = entry.map_err(corrupt)?;
        if index == want {
            sink(index, &mut entry).map_err(corrupt)?;
            next.next();
        }
    }
    if next.peek().is_some() {
        return Err(LayerError::Corrupt {
            layer,
            detail: "the archive changed between reads".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a tar layer from (path, kind) specs.
    pub enum E<'a> {
        Dir(&'a str, u32),
        File(&'a str, &'a [u8], u32, u32),
        Link(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Char(&'a str, u32, u32),
    }

    pub fn layer(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            match e {
                E::Dir(p, mode) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, p, &[][..]).unwrap();
                }
                E::File(p, data, uid, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_uid(u64::from(*uid));
                    h.set_gid(u64::from(*uid));
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, p, *data).unwrap();
                }
                E::Link(p, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, p, target).unwrap();
                }
                E::Hard(p, target) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    b.append_link(&mut h, p, target).unwrap();
                }
                E::Char(p, maj, min) => {
                    h.set_entry_type(tar::EntryType::Char);
                    h.set_mode(0o666);
                    h.set_size(0);
                    h.set_device_major(*maj).unwrap();
                    h.set_device_minor(*min).unwrap();
                    b.append_data(&mut h, p, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    /// A tar entry whose name is written verbatim (the tar builder refuses `..`).
    pub fn raw_entry(name: &str, data: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn apply(layers: &[Vec<u8>]) -> Result<Tree, LayerError> {
        let mut t = Tree::new();
        for (i, l) in layers.iter().enumerate() {
            t.apply_layer(i, decompress(&l[..]).unwrap(), &Limits::default())?;
        }
        Ok(t)
    }

    fn paths(t: &Tree) -> Vec<&str> {
        t.nodes.keys().map(String::as_str).collect()
    }

    #[test]
    fn whiteouts_and_opaque_directories_hide_lower_layers() {
        let l0 = layer(&[
            E::Dir("etc", 0o755),
            E::File("etc/passwd", b"root", 0, 0o644),
            E::File("etc/gone", b"x", 0, 0o644),
            E::Dir("opt/app", 0o755),
            E::File("opt/app/old", b"old", 0, 0o644),
            E::File("opt/app/sub/deep", b"d", 0, 0o644),
        ]);
        let l1 = layer(&[
            E::File("etc/.wh.gone", b"", 0, 0o644),
            E::File("opt/app/new", b"new", 0, 0o644),
            E::File("opt/app/.wh..wh..opq", b"", 0, 0o644),
        ]);
        let l2 = layer(&[E::File("etc/passwd", b"root2", 1000, 0o600)]);
        let t = apply(&[l0, l1, l2]).unwrap();
        assert_eq!(
            paths(&t),
            ["", "etc", "etc/passwd", "opt", "opt/app", "opt/app/new"]
        );
        let p = &t.nodes["etc/passwd"];
        assert_eq!((p.uid, p.mode), (1000, 0o600));
        assert!(matches!(
            p.kind,
            NodeKind::File {
                data: DataRef { layer: 2, .. },
                size: 5
            }
        ));
    }

    #[test]
    fn a_file_replacing_a_directory_takes_its_children_away() {
        let l0 = layer(&[E::File("a/b", b"x", 0, 0o644)]);
        let l1 = layer(&[E::File("a", b"now a file", 0, 0o644)]);
        let t = apply(&[l0, l1]).unwrap();
        assert_eq!(paths(&t), ["", "a"]);
    }

    #[test]
    fn links_devices_and_hard_links() {
        let l0 = layer(&[
            E::File("bin/busybox", b"elf", 0, 0o755),
            E::Link("bin/sh", "busybox"),
            E::Link("usr/bin/env", "/bin/busybox"),
            E::Hard("bin/ls", "bin/busybox"),
            E::Char("dev/null", 1, 3),
        ]);
        let t = apply(&[l0]).unwrap();
        assert_eq!(t.nodes["bin/sh"].kind, NodeKind::Symlink("busybox".into()));
        assert_eq!(t.nodes["dev/null"].kind, NodeKind::Char(1, 3));
        assert_eq!(
            t.nodes["bin/ls"].kind, t.nodes["bin/busybox"].kind,
            "a hard link shares its target's data"
        );
        assert_eq!(t.nodes["bin/ls"].mode, 0o755);
    }

    #[test]
    fn escapes_are_refused() {
        let slip = raw_entry("../etc/passwd", b"pwned");
        assert!(matches!(apply(&[slip]), Err(LayerError::Escape { .. })));
        let slip = raw_entry("a/../../x", b"pwned");
        assert!(matches!(apply(&[slip]), Err(LayerError::Escape { .. })));
        let up = layer(&[E::Link("a/b/evil", "../../../etc/passwd")]);
        assert!(matches!(apply(&[up]), Err(LayerError::Escape { .. })));
        let ok = layer(&[E::Link("a/b/fine", "../../etc/passwd")]);
        assert!(apply(&[ok]).is_ok());
        // Writing through a symlink planted by a lower layer.
        let l0 = layer(&[E::Link("etc", "/host-etc")]);
        let l1 = layer(&[E::File("etc/shadow", b"x", 0, 0o600)]);
        assert!(matches!(apply(&[l0, l1]), Err(LayerError::Escape { .. })));
        let dangling = layer(&[E::Hard("x", "nonexistent")]);
        assert!(matches!(
            apply(&[dangling]),
            Err(LayerError::BadHardLink { .. })
        ));
    }

    #[test]
    fn truncated_and_oversized_layers_are_clear_errors() {
        let l = layer(&[E::File("big", &[7u8; 4096], 0, 0o644)]);
        let cut = &l[..1000];
        let mut t = Tree::new();
        assert!(matches!(
            t.apply_layer(0, cut, &Limits::default()),
            Err(LayerError::Corrupt { .. })
        ));
        let mut t = Tree::new();
        let small = Limits {
            max_bytes: 100,
            max_entries: 10,
        };
        assert!(matches!(
            t.apply_layer(0, &l[..], &small),
            Err(LayerError::TooLarge { .. })
        ));
    }

    #[test]
    fn gzip_and_zstd_layers_decompress() {
        use std::io::Write;
        let l = layer(&[E::File("f", b"data", 0, 0o644)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&l).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&l[..], 1).unwrap();
        for blob in [gz, zs, l.clone()] {
            let t = apply(&[blob]).unwrap();
            assert_eq!(paths(&t), ["", "f"]);
        }
    }

    #[test]
    fn extracts_only_wanted_entries() {
        let l = layer(&[
            E::File("a", b"A", 0, 0o644),
            E::File("b", b"BB", 0, 0o644),
            E::File("c", b"CCC", 0, 0o644),
        ]);
        let mut got = Vec::new();
        extract_entries(0, &l[..], &[0, 2], |i, r| {
            let mut s = String::new();
            r.read_to_string(&mut s)?;
            got.push((i, s));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, [(0, "A".to_string()), (2, "CCC".to_string())]);
    }
}
