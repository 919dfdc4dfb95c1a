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
#![deny(missing_docs)]

pub mod config;
pub mod digest;
pub mod layers;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod store;
