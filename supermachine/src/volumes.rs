//! Volumes. A host file (or a named volume in the data directory) is a block volume: attached
//! as a virtio-blk disk and mounted by `guest-init` at a path in the container, created sparse
//! and formatted ext4 on first use; data the guest syncs is on the host file when its `fsync`
//! returns (virtio-blk FLUSH is an `fsync` of the file). An existing host directory is shared
//! through virtio-fs (the `virtiofs` crate): edits on either side show on the other.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where a volume's data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A file on the host (absolute or relative path).
    HostFile(PathBuf),
    /// A named volume under `$SUPERMACHINE_HOME/volumes`.
    Named(String),
}

/// `-v SOURCE:TARGET[:OPTIONS]`, options a comma-separated list of `ro`, `rw` and `special`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The data.
    pub source: VolumeSource,
    /// Where it is mounted in the container (absolute).
    pub target: String,
    /// Read-only.
    pub read_only: bool,
    /// `special`: on a shared directory, the guest may create device nodes and setuid/setgid
    /// files (refused and stripped by default); block volumes refuse it.
    pub special_files: bool,
}

/// Errors preparing volumes.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A malformed `-v` argument.
    #[error("invalid volume {0:?}: {1}")]
    Invalid(String, &'static str),
    /// Creating or formatting the file failed.
    #[error("cannot create volume {path}: {detail}")]
    Create {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// The named volume does not exist.
    #[error("no such volume: {0}")]
    NoSuchVolume(String),
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.as_bytes()[0].is_ascii_alphanumeric()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl std::str::FromStr for VolumeSpec {
    type Err = VolumeError;

    fn from_str(s: &str) -> Result<Self, VolumeError> {
        let invalid = |why| VolumeError::Invalid(s.to_string(), why);
        let (rest, options) = match s
            .rsplit_once(':')
            .and_then(|(r, o)| Some((r, vmm::parse_mount_options(o)?)))
        {
            Some((r, o)) if r.contains(':') => (r, o),
            _ => (s, vmm::MountOptions::default()),
        };
        let (source, target) = rest
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected SOURCE:TARGET[:ro|rw][,special]"))?;
        if !target.starts_with('/') || target.split('/').any(|c| c == "..") {
            return Err(invalid("the target must be an absolute path without .."));
        }
        let source = if source.contains('/') || source.starts_with('.') {
            VolumeSource::HostFile(PathBuf::from(source))
        } else if valid_name(source) {
            VolumeSource::Named(source.to_string())
        } else {
            return Err(invalid("a volume name is letters, digits, _ . -"));
        };
        Ok(VolumeSpec {
            source,
            target: target.to_string(),
            read_only: options.read_only,
            special_files: options.special_files,
        })
    }
}

/// The directory of named volumes.
pub fn volumes_dir() -> PathBuf {
    oci_bake::Store::default_root().join("volumes")
}

/// The file of named volume `name`.
pub fn named_path(name: &str) -> PathBuf {
    volumes_dir().join(format!("{name}.ext4"))
}

/// Creates a sparse ext4 image of `size` bytes at `path` (atomically: a half-made volume is
/// never left under the final name).
pub fn create(path: &Path, size: u64) -> Result<(), VolumeError> {
    let err = |detail: String| VolumeError::Create {
        path: path.to_owned(),
        detail,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    let tmp = path.with_extension(format!("creating-{}", std::process::id()));
    let result = (|| {
        let f = std::fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
        f.set_len(size).map_err(|e| err(e.to_string()))?;
        drop(f);
        let status = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg(&tmp)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| err(format!("mkfs.ext4 (e2fsprogs) is needed: {e}")))?;
        if !status.success() {
            return Err(err(format!("mkfs.ext4 failed ({status})")));
        }
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// What backs a volume in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// A disk image file (virtio-blk, ext4).
    Disk(PathBuf),
    /// A host directory (virtio-fs), canonical.
    Directory(PathBuf),
}

/// What backs `spec`: an existing host directory, or a disk image file, created (with `size`
/// bytes) if it does not exist.
pub fn prepare(spec: &VolumeSpec, size: u64) -> Result<Prepared, VolumeError> {
    let path = match &spec.source {
        VolumeSource::HostFile(p) => p.clone(),
        VolumeSource::Named(n) => named_path(n),
    };
    if path.is_dir() {
        let dir = std::fs::canonicalize(&path).map_err(|e| VolumeError::Create {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        return Ok(Prepared::Directory(dir));
    }
    if !path.exists() {
        create(&path, size)?;
    }
    Ok(Prepared::Disk(path))
}

/// Named volumes: (name, size on disk in bytes).
pub fn list() -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(volumes_dir())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e
                .file_name()
                .to_string_lossy()
                .strip_suffix(".ext4")?
                .to_string();
            use std::os::unix::fs::MetadataExt;
            let used = e.metadata().ok().map(|m| m.blocks() * 512).unwrap_or(0);
            Some((name, used))
        })
        .collect();
    out.sort();
    out
}

/// Deletes named volume `name`.
pub fn remove(name: &str) -> Result<(), VolumeError> {
    std::fs::remove_file(named_path(name)).map_err(|_| VolumeError::NoSuchVolume(name.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_volume_forms() {
        let v: VolumeSpec = "data:/var/lib/db".parse().unwrap();
        assert_eq!(v.source, VolumeSource::Named("data".into()));
        assert!(!v.read_only);
        let v: VolumeSpec = "/srv/disk.img:/data:ro".parse().unwrap();
        assert_eq!(v.source, VolumeSource::HostFile("/srv/disk.img".into()));
        assert_eq!((v.target.as_str(), v.read_only), ("/data", true));
        let v: VolumeSpec = "./rel.img:/x".parse().unwrap();
        assert_eq!(v.source, VolumeSource::HostFile("./rel.img".into()));
        assert!(!v.special_files);
        let v: VolumeSpec = "/srv/share:/data:rw,special".parse().unwrap();
        assert_eq!(v.source, VolumeSource::HostFile("/srv/share".into()));
        assert!(!v.read_only && v.special_files);
        let v: VolumeSpec = "/srv/share:/data:special,ro".parse().unwrap();
        assert!(v.read_only && v.special_files);
        for bad in [
            "/srv/share:/data:bogus",
            "/srv/share:/data:ro,bogus",
            "data",
            "data:relative",
            "data:/a/../b",
            "bad name:/x",
            ":/x",
        ] {
            assert!(bad.parse::<VolumeSpec>().is_err(), "{bad}");
        }
    }
}
