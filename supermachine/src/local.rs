//! What is kept on this host, through the library API: pulled images and their bakes
//! ([`Image::list`], [`Image::list_baked`], [`Image::remove`], [`Image::prune`], pulling with
//! options) and named volumes ([`Volume`]). `supermachine images/rmi/prune/pull/volume` are
//! these calls.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::image::Image;
use crate::images;

/// A pulled image in the local store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The normalised reference it was pulled by (`docker.io/library/busybox:latest`).
    pub name: String,
    /// Its manifest digest (`sha256:…`).
    pub digest: String,
    /// Compressed size of its layers.
    pub size: u64,
    /// Its root filesystem (a squashfs image).
    pub rootfs: PathBuf,
    /// Its configuration blob's digest (`sha256:…`).
    pub config_digest: String,
    /// Its layers' digests, bottom first.
    pub layers: Vec<String>,
    /// When it was pulled.
    pub pulled: SystemTime,
    /// How it wants to be run (entrypoint, command, environment, user, ports…).
    pub run_config: images::RunConfig,
}

/// A baked snapshot in the bake cache ([`Image::bake`], `supermachine bake`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BakedInfo {
    /// Its name in the cache.
    pub name: String,
    /// Its directory ([`Image::from_snapshot`] starts it).
    pub dir: PathBuf,
    /// The image reference it was baked from.
    pub image: String,
    /// The baked VM's memory.
    pub memory_mib: u32,
    /// How long the bake took.
    pub bake_time: Duration,
    /// What the bake waited for before the snapshot.
    pub ready: String,
    /// Snapshot taken before the workload started (an idle sandbox, or env given at start).
    pub before_start: bool,
    /// Space it takes on disk (the memory file is sparse).
    pub disk_bytes: u64,
    /// When it was baked.
    pub baked_at: SystemTime,
}

/// What [`Image::remove`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The image's name.
    pub name: String,
    /// Bakes removed with it (the last name of their image went).
    pub bakes: Vec<String>,
}

/// What [`Image::prune`] reclaimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Files deleted.
    pub files: usize,
    /// Bytes reclaimed.
    pub bytes: u64,
}

/// How to pull ([`Image::pull_with`]).
#[derive(Debug, Clone)]
pub struct PullOptions(images::PullOptions);

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions::new()
    }
}

impl PullOptions {
    /// The host's platform, TLS to every registry, no progress bars.
    pub fn new() -> PullOptions {
        PullOptions(images::PullOptions {
            progress: false,
            ..Default::default()
        })
    }

    /// Another platform (`linux`, `arm64`).
    pub fn platform(mut self, os: &str, arch: &str) -> Self {
        self.0.platform = (os.into(), arch.into());
        self
    }

    /// Speak plain HTTP to this registry (`host:port`), as Docker's `insecure-registries`.
    pub fn insecure_registry(mut self, host: &str) -> Self {
        self.0.client.insecure_registries.push(host.into());
        self
    }

    /// Progress bars on stderr (when it is a terminal).
    pub fn progress(mut self, yes: bool) -> Self {
        self.0.progress = yes;
        self
    }
}

fn info_of(store: &images::Store, r: &images::ImageRecord) -> ImageInfo {
    ImageInfo {
        name: r.name.clone(),
        digest: r.manifest.to_string(),
        size: r.size,
        rootfs: store.rootfs_path(&r.rootfs),
        config_digest: r.config.to_string(),
        layers: r.layers.iter().map(ToString::to_string).collect(),
        pulled: SystemTime::UNIX_EPOCH + Duration::from_secs(r.pulled_at),
        run_config: r.run_config.clone(),
    }
}

fn store_error(e: oci_bake::store::StoreError) -> Error {
    Error::from(images::PullError::from(e))
}

impl Image {
    /// Pulls `reference` as `opts` say (see [`Image::pull`]).
    pub fn pull_with(reference: &str, opts: &PullOptions) -> Result<Image> {
        let store = images::store()?;
        images::pull(&store, reference, &opts.0)?;
        Ok(Image::from_store(reference))
    }

    /// What the local store holds for this image ([`Error::ImageNotFound`] if not pulled).
    pub fn info(&self) -> Result<ImageInfo> {
        Image::inspect(self.reference())
    }

    /// What the local store holds for the image `reference` names, without pulling it
    /// ([`Error::ImageNotFound`] if it was not pulled).
    pub fn inspect(reference: &str) -> Result<ImageInfo> {
        let store = images::store()?;
        match images::find(&store, reference)? {
            Some(r) => Ok(info_of(&store, &r)),
            None => Err(Error::ImageNotFound(reference.into())),
        }
    }

    /// The pulled images, by name.
    pub fn list() -> Result<Vec<ImageInfo>> {
        let store = images::store()?;
        let mut list: Vec<ImageInfo> = store
            .images()
            .map_err(store_error)?
            .iter()
            .map(|r| info_of(&store, r))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    /// The bakes in the bake cache, by name.
    pub fn list_baked() -> Result<Vec<BakedInfo>> {
        let store = images::store()?;
        Ok(crate::run::list_bakes(&store)
            .into_iter()
            .map(|b| BakedInfo {
                name: b.name,
                dir: b.dir,
                image: b.workload.image,
                memory_mib: b.workload.memory_mib,
                bake_time: Duration::from_millis(b.workload.bake_ms),
                ready: b.workload.ready,
                before_start: b.workload.before_start,
                disk_bytes: b.disk_bytes,
                baked_at: SystemTime::UNIX_EPOCH + Duration::from_secs(b.workload.baked_at),
            })
            .collect())
    }

    /// Removes the image `reference` from the store (its blobs go with [`Image::prune`]). Its
    /// bakes go with the last name of its manifest: they start nothing else.
    pub fn remove(reference: &str) -> Result<Removed> {
        let store = images::store()?;
        let record = match images::find(&store, reference)? {
            Some(r) if store.remove_image(&r.name).map_err(store_error)? => r,
            _ => return Err(Error::ImageNotFound(reference.into())),
        };
        let mut removed = Removed {
            name: record.name.clone(),
            bakes: Vec::new(),
        };
        let still_named = store
            .images()
            .map_err(store_error)?
            .iter()
            .any(|i| i.manifest == record.manifest);
        if !still_named {
            let manifest = record.manifest.to_string();
            for b in crate::run::list_bakes(&store) {
                if b.workload.manifest == manifest {
                    std::fs::remove_dir_all(&b.dir)?;
                    removed.bakes.push(b.name);
                }
            }
        }
        Ok(removed)
    }

    /// Deletes blobs and root filesystems no image uses.
    pub fn prune() -> Result<Pruned> {
        let store = images::store()?;
        let (files, bytes) = store.prune().map_err(store_error)?;
        Ok(Pruned { files, bytes })
    }
}

/// A named volume (`-v NAME:/path`): a sparse ext4 image that outlives the VMs using it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Its name.
    pub name: String,
    /// Space it takes on disk.
    pub used: u64,
}

/// `-v NAME:…` for a valid volume name; a path (which would parse as a host file) is refused.
fn volume_spec(name: &str) -> Result<crate::volumes::VolumeSpec> {
    let spec: crate::volumes::VolumeSpec = format!("{name}:/x")
        .parse()
        .map_err(|e: crate::volumes::VolumeError| Error::Config(e.to_string()))?;
    if spec.source != crate::volumes::VolumeSource::Named(name.into()) {
        return Err(Error::Config(format!(
            "invalid volume name {name:?}: use letters, digits, '_', '.', '-'"
        )));
    }
    Ok(spec)
}

impl Volume {
    /// Creates the named volume of `size` bytes ([`Error::Config`] if it exists or the name is
    /// not valid).
    pub fn create(name: &str, size: u64) -> Result<()> {
        let spec = volume_spec(name)?;
        if crate::volumes::named_path(name).exists() {
            return Err(Error::Config(format!("volume {name} already exists")));
        }
        crate::volumes::prepare(&spec, size).map_err(|e| Error::Config(e.to_string()))?;
        Ok(())
    }

    /// The named volumes.
    pub fn list() -> Vec<Volume> {
        crate::volumes::list()
            .into_iter()
            .map(|(name, used)| Volume { name, used })
            .collect()
    }

    /// Removes the named volume.
    pub fn remove(name: &str) -> Result<()> {
        volume_spec(name)?;
        crate::volumes::remove(name).map_err(|e| Error::Config(e.to_string()))
    }
}
