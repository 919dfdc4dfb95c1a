//! Images: pull any OCI/Docker image reference into the local store, list, remove, prune.
//! A thin layer over `oci-bake` with the store at its default place.

pub use oci_bake::config::RunConfig;
pub use oci_bake::{ImageRecord, ImageRef, PullError, PullOptions, Store};

/// Opens the default store (`$SUPERMACHINE_HOME` or `~/.local/share/supermachine`).
pub fn store() -> Result<Store, PullError> {
    Ok(Store::open(Store::default_root())?)
}

/// Pulls `reference` (any containers-transports form) with `opts`.
pub fn pull(store: &Store, reference: &str, opts: &PullOptions) -> Result<ImageRecord, PullError> {
    let image: ImageRef = reference.parse()?;
    oci_bake::pull(store, &image, opts)
}

/// Looks up a pulled image by the reference a user typed.
pub fn find(store: &Store, reference: &str) -> Result<Option<ImageRecord>, PullError> {
    oci_bake::find(store, reference)
}

/// Human-readable size.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}
