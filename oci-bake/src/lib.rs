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
    let fetched = source::fetch(store, image, opts)?;
    let config_bytes = store.read_blob(&fetched.config, source::MAX_DOCUMENT)?;
    let config: manifest::ImageConfigFile =
        serde_json::from_slice(&config_bytes).map_err(|e| PullError::Config {
            digest: fetched.config.clone(),
            detail: e.to_string(),
        })?;
    let layers: Vec<digest::Digest> = fetched.layers.iter().map(|(d, _)| d.clone()).collect();
    let rootfs = rootfs::bake(store, &layers, &opts.limits)?;
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

/// The record of an already pulled image, by the reference a user typed.
pub fn find(store: &Store, image: &str) -> Result<Option<ImageRecord>, PullError> {
    let r: ImageRef = image.parse()?;
    Ok(store.image(&source::canonical_name(&r))?)
}
