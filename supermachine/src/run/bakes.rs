//! Bakes: the workload a baked snapshot runs (its payload), the bake cache and its keys.

use crate::images::{self, ImageRecord};
use crate::paths;

use super::*;

/// The workload a baked snapshot runs (kept in the snapshot's state).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BakedWorkload {
    /// The image reference it was baked from.
    pub image: String,
    /// The image's manifest digest.
    pub manifest: String,
    /// The bake cache key (image and the configuration that a restore cannot change).
    pub key: String,
    /// The command line it runs.
    pub argv: Vec<String>,
    /// The image's stop signal.
    pub stop_signal: String,
    /// The ports the image exposes.
    pub exposed_ports: Vec<String>,
    /// Baked with a terminal.
    pub tty: bool,
    /// Baked with stdin open.
    pub interactive: bool,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// The ready check that was met.
    pub ready: String,
    /// Snapshotted before the workload started: a restore starts it ([`ReadyCheck::BeforeStart`]).
    pub before_start: bool,
    /// When it was baked (Unix seconds).
    pub baked_at: u64,
    /// How long the bake took, boot to snapshot written (ms).
    pub bake_ms: u64,
    /// Baked with a network device (its host side and egress policy are chosen at restore).
    #[serde(default)]
    pub network: bool,
    /// The image's `HEALTHCHECK`, for the runs that restore it.
    #[serde(default)]
    pub healthcheck: Option<oci_bake::config::ImageHealthcheck>,
}

impl BakedWorkload {
    /// Its form in a snapshot's payload ([`MachineState::payload`](crate::snapshot::MachineState::payload)).
    pub fn to_payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The workload a snapshot's state carries, if it is a bake of an image (a payload that
    /// is not ours counts as none).
    pub fn of(state: &crate::snapshot::MachineState) -> Option<BakedWorkload> {
        serde_json::from_slice(state.payload.as_deref()?).ok()
    }
}

/// The bake cache key: the image and every setting a restore cannot change (command, user,
/// working directory, memory, vCPUs, terminal, kernel and initramfs builds). Environment is
/// not in it: `-e` at restore reaches processes started after the restore.
pub fn bake_key(
    record: &ImageRecord,
    opts: &RunOptions,
    argv: &[String],
    workdir: &Option<String>,
) -> String {
    use sha2::Digest;
    let identity = crate::snapshot::Identity::here(
        Some(&paths::default_kernel()),
        Some(&paths::default_initramfs()),
    );
    let material = serde_json::json!({
        "manifest": record.manifest.to_string(),
        "argv": argv,
        "workdir": workdir,
        "user": opts.config.user,
        "memory_mib": opts.config.memory_mib,
        "vcpus": opts.config.vcpus,
        "tty": opts.tty,
        "interactive": opts.interactive,
        "network": opts.config.network.has_device(),
        "identity": [identity.supermachine, identity.kernel, identity.initramfs],
    });
    let digest = sha2::Sha256::digest(material.to_string().as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// A bake in the cache.
#[derive(Debug, Clone)]
pub struct BakeEntry {
    /// Its directory name (the cache key, or the name given with `bake --as`).
    pub name: String,
    /// Its directory.
    pub dir: std::path::PathBuf,
    /// What it runs.
    pub workload: BakedWorkload,
    /// Space its files take on disk (the memory file is sparse).
    pub disk_bytes: u64,
}

/// The bakes in the cache, by name; unreadable ones are skipped.
pub fn list_bakes(store: &images::Store) -> Vec<BakeEntry> {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(bake_cache_dir(store)) else {
        return Vec::new();
    };
    let mut bakes: Vec<BakeEntry> = entries
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let state: crate::snapshot::MachineState = snapshot::read_state(&dir).ok()?;
            let disk_bytes = [snapshot::STATE_FILE, snapshot::MEMORY_FILE]
                .iter()
                .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
                .map(|m| m.blocks() * 512)
                .sum();
            Some(BakeEntry {
                name: e.file_name().to_string_lossy().into_owned(),
                workload: BakedWorkload::of(&state)?,
                dir,
                disk_bytes,
            })
        })
        .collect();
    bakes.sort_by(|a, b| a.name.cmp(&b.name));
    bakes
}

/// Where baked snapshots are kept: `<store>/bakes/<key>`.
pub fn bake_cache_dir(store: &images::Store) -> std::path::PathBuf {
    store.root().join("bakes")
}
