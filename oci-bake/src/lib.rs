//! # oci-bake
//!
//! OCI and Docker images, from a reference to a root filesystem image a guest can mount.
//!
//! Owns: image references ([`reference`]), digests ([`digest`]), the registry client
//! ([`registry`]), image layouts and archives ([`source`]), the content-addressed store
//! ([`store`]), layer application ([`layers`]) and the read-only root filesystem image, plus the
//! image's run configuration ([`config`]).
//!
//! The root filesystem is **one squashfs image per image**, with every layer already applied
//! (whiteouts and opaque directories resolved here, on the host), written by a pure-Rust writer
//! (`backhand`, zstd) so it needs neither root nor a tool from the distribution and works on a
//! macOS host too. The guest mounts it read-only under an overlayfs with a tmpfs upper layer.
//! One image per image rather than one per layer keeps the guest's mount count and lookups
//! flat; layers are still shared in the blob store, and the image is cached under the hash of
//! its layer digests, so a second pull or run does no work.
//!
//! Does not own: booting (the `supermachine` facade), snapshots (`snapshot`).
//!
//! ```no_run
//! use oci_bake::{ImageRef, PullOptions, Store};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::open("/tmp/images")?;
//! let image: ImageRef = "oci:./busybox-layout:latest".parse()?;
//! let record = oci_bake::pull(&store, &image, &PullOptions::default())?;
//! // One squashfs with every layer applied, ready to attach as a read-only disk.
//! println!("{}", store.rootfs_path(&record.rootfs).display());
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod config;
pub mod digest;
pub mod layers;
pub mod layout;
pub mod manifest;
pub mod reference;
pub mod registries_conf;
pub mod registry;
pub mod rootfs;
pub mod source;
pub mod store;

use std::path::PathBuf;

pub use reference::ImageRef;
pub use source::PullOptions;
pub use store::{ImageRecord, Store};

/// Why pulling an image failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference is malformed.
    #[error(transparent)]
    Reference(#[from] reference::InvalidReference),
    /// The registry failed or refused.
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    /// The store failed, or a blob did not match its digest.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// A manifest, index or configuration is unusable.
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    /// The tag is not in the layout or archive.
    #[error("tag {tag:?} not found in {source_name} (it has: {available})")]
    TagNotFound {
        /// The tag asked for.
        tag: String,
        /// The layout or archive.
        source_name: String,
        /// The tags it has.
        available: String,
    },
    /// A layout or archive is unreadable or malformed.
    #[error("{path}: {detail}")]
    Source {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The root filesystem could not be built.
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    /// `registries.conf` is unusable.
    #[error(transparent)]
    RegistriesConf(#[from] registries_conf::RegistriesConfError),
    /// `registries.conf` blocks the image.
    #[error("{image}: pulls from {prefix} are blocked in registries.conf")]
    Blocked {
        /// The image.
        image: String,
        /// The blocking entry's prefix.
        prefix: String,
    },
    /// The image is for another platform than the one asked for (its binaries would not run).
    #[error("{image} is an image for {found}; this host runs {wanted} guests (pull one built for {wanted})")]
    Platform {
        /// The image.
        image: String,
        /// Its configuration's `os/architecture`.
        found: String,
        /// The platform asked for.
        wanted: String,
    },
    /// The image configuration is not valid JSON of the expected shape.
    #[error("image configuration {digest}: {detail}")]
    Config {
        /// The configuration blob.
        digest: digest::Digest,
        /// The parse error.
        detail: String,
    },
}

/// Pulls `image` into `store`: blobs, root filesystem image, record. A second pull of the same
/// image finds everything in place and does no work beyond reading the manifest.
pub fn pull(store: &Store, image: &ImageRef, opts: &PullOptions) -> Result<ImageRecord, PullError> {
    // Shared with other pulls; a prune waits until this one's record names what it wrote.
    let _lock = store.lock(false)?;
    let fetched = source::fetch(store, image, opts)?;
    let config_bytes = store.read_blob(&fetched.config, source::MAX_DOCUMENT)?;
    let config: manifest::ImageConfigFile =
        serde_json::from_slice(&config_bytes).map_err(|e| PullError::Config {
            digest: fetched.config.clone(),
            detail: e.to_string(),
        })?;
    check_platform(&fetched.name, &config, &opts.platform)?;
    let layers: Vec<digest::Digest> = fetched.layers.iter().map(|(d, _)| d.clone()).collect();
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    let rootfs = rootfs::bake(store, &layers, &diff_ids, &opts.limits)?;
    let record = ImageRecord {
        name: fetched.name,
        manifest: fetched.manifest,
        config: fetched.config,
        layers,
        size: fetched.layers.iter().map(|(_, s)| s).sum(),
        rootfs,
        run_config: config::RunConfig::from(&config),
        pulled_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    store.save_image(&record)?;
    Ok(record)
}

/// Refuses an image whose configuration names another OS or architecture than `wanted` (an
/// image chosen by tag from a single-platform layout or manifest is not filtered by its
/// index). An image that names none is accepted.
fn check_platform(
    image: &str,
    config: &manifest::ImageConfigFile,
    wanted: &(String, String),
) -> Result<(), PullError> {
    // Docker's names and the kernel's both occur in the wild.
    let canonical = |arch: &str| match arch {
        "x86_64" | "x86-64" => "amd64".to_string(),
        "aarch64" => "arm64".to_string(),
        other => other.to_string(),
    };
    let arch_differs =
        !config.architecture.is_empty() && canonical(&config.architecture) != canonical(&wanted.1);
    let os_differs = !config.os.is_empty() && config.os != wanted.0;
    if arch_differs || os_differs {
        return Err(PullError::Platform {
            image: image.to_string(),
            found: format!("{}/{}", config.os, config.architecture),
            wanted: format!("{}/{}", wanted.0, wanted.1),
        });
    }
    Ok(())
}

/// The record of an already pulled image, by the reference a user typed.
pub fn find(store: &Store, image: &str) -> Result<Option<ImageRecord>, PullError> {
    let r: ImageRef = image.parse()?;
    Ok(store.image(&source::canonical_name(&r))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(os: &str, architecture: &str) -> manifest::ImageConfigFile {
        manifest::ImageConfigFile {
            architecture: architecture.into(),
            os: os.into(),
            config: None,
            rootfs: None,
        }
    }

    #[test]
    fn an_image_for_another_platform_is_refused_by_name() {
        let amd64 = ("linux".to_string(), "amd64".to_string());
        let e = check_platform("oci:x:latest", &config("linux", "arm64"), &amd64)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("oci:x:latest is an image for linux/arm64")
                && e.contains("this host runs linux/amd64 guests"),
            "{e}"
        );
        assert!(check_platform("w", &config("windows", "amd64"), &amd64).is_err());
        // The same platform under another name, or none given: accepted.
        assert!(check_platform("a", &config("linux", "x86_64"), &amd64).is_ok());
        assert!(check_platform("b", &config("linux", "amd64"), &amd64).is_ok());
        assert!(check_platform("c", &config("", ""), &amd64).is_ok());
        let arm64 = ("linux".to_string(), "arm64".to_string());
        assert!(check_platform("d", &config("linux", "aarch64"), &arm64).is_ok());
    }
}
