//! [`Image`]: an OCI image in the local store, or a baked snapshot of one, ready to start VMs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::machine::{Vm, VmConfig, Workload};
use crate::pool::PoolBuilder;
use crate::run::ReadyCheck;

/// An image to start VMs from: pulled into the local store ([`Image::pull`], [`Image::open`]),
/// or baked into a memory snapshot ([`Image::bake`], [`Image::from_snapshot`]) so that each
/// start is a restore of a VM whose workload is already set up.
#[derive(Debug, Clone)]
pub struct Image {
    reference: String,
    snapshot: Option<PathBuf>,
}

/// How to bake an image: the VM to bake ([`VmConfig`]; memory, vCPUs, command and user are
/// fixed in the snapshot) and when it counts as ready.
#[derive(Debug, Clone, Default)]
pub struct BakeOptions {
    config: VmConfig,
    ready: Option<ReadyCheck>,
    dir: Option<PathBuf>,
    ready_limit: Option<Duration>,
}

impl BakeOptions {
    /// Bake an idle sandbox of the default [`VmConfig`] into the bake cache.
    pub fn new() -> BakeOptions {
        BakeOptions::default()
    }

    /// The VM to bake.
    pub fn config(mut self, config: VmConfig) -> Self {
        self.config = config;
        self
    }

    /// When the workload is ready to snapshot. Default: before it starts for an idle sandbox
    /// ([`Workload::Idle`]); otherwise the first port the image exposes accepting connections,
    /// else the workload having started.
    pub fn ready(mut self, check: ReadyCheck) -> Self {
        self.ready = Some(check);
        self
    }

    /// Write the snapshot here instead of the bake cache.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// How long the workload may take to be ready (default 300 s).
    pub fn ready_limit(mut self, limit: Duration) -> Self {
        self.ready_limit = Some(limit);
        self
    }
}

impl Image {
    /// Pulls `reference` (any form `supermachine run` takes: `busybox`, `docker://…`,
    /// `oci:DIR:TAG`, `oci-archive:…`, `docker-archive:…`), fetching what changed upstream.
    pub fn pull(reference: &str) -> Result<Image> {
        let store = crate::images::store()?;
        crate::images::pull(&store, reference, &Default::default())?;
        Ok(Image::from_store(reference))
    }

    pub(crate) fn from_store(reference: &str) -> Image {
        Image {
            reference: reference.into(),
            snapshot: None,
        }
    }

    /// The image `reference` from the local store, pulled first if it is not there.
    pub fn open(reference: &str) -> Result<Image> {
        let store = crate::images::store()?;
        if crate::images::find(&store, reference)?.is_none() {
            crate::images::pull(&store, reference, &Default::default())?;
        }
        Ok(Image::from_store(reference))
    }

    /// A snapshot made by [`Image::bake`], `supermachine bake` or [`Vm::snapshot`]; checked now
    /// (format, checksum, kernel and CPU), so a bad one fails here.
    pub fn from_snapshot(dir: impl AsRef<Path>) -> Result<Image> {
        let dir = dir.as_ref();
        let loaded = crate::snapshot::load(
            dir,
            Some(&crate::paths::default_kernel()),
            Some(&crate::paths::default_initramfs()),
        )
        .map_err(|e| Error::Snapshot(format!("{}: {e}", dir.display())))?;
        let workload = loaded.state.workload.ok_or_else(|| {
            Error::Snapshot(format!(
                "{}: not a snapshot of an image (bake one with Image::bake)",
                dir.display()
            ))
        })?;
        Ok(Image {
            reference: workload.image,
            snapshot: Some(dir.to_path_buf()),
        })
    }

    /// The reference it was opened with.
    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// The snapshot VMs start from, once baked.
    pub fn snapshot_dir(&self) -> Option<&Path> {
        self.snapshot.as_deref()
    }

    /// Boots the image as `opts` says, waits until it is ready, snapshots it and stops it; the
    /// returned image starts VMs by restoring that snapshot.
    pub fn bake(&self, opts: &BakeOptions) -> Result<Image> {
        let ready = match (&opts.ready, &opts.config.workload) {
            (Some(r), _) => r.clone(),
            (None, Workload::Idle) => ReadyCheck::BeforeStart,
            (None, _) => ReadyCheck::Default,
        };
        let mut run = opts.config.run_options(&self.reference, None)?;
        // The bake holds the workload itself when asked to; an idle bake is a before-start one.
        run.idle = false;
        run.bake = Some(crate::run::BakeOptions {
            dir: opts.dir.clone(),
            ready,
            ready_limit: opts.ready_limit,
        });
        let stderr = crate::machine::Tail::default();
        let dir = crate::run::bake(&run, Box::new(std::io::sink()), Box::new(stderr.clone()))?;
        Ok(Image {
            reference: self.reference.clone(),
            snapshot: Some(dir),
        })
    }

    /// Starts a VM: restored from the snapshot when baked (memory, vCPUs and command are the
    /// bake's), else booted (or restored from a matching bake in the cache). Returns once the
    /// guest agent answers.
    pub fn start(&self, config: &VmConfig) -> Result<Vm> {
        Vm::start(&self.reference, self.snapshot.as_deref(), config)
    }

    /// A pool of VMs restored from this image's snapshot (baked first if it is not).
    pub fn pool(&self) -> PoolBuilder {
        PoolBuilder::new(self.clone())
    }
}
