//! [`Image`]: an OCI image in the local store, or a baked snapshot of one, ready to start VMs.

use std::io::{Read, Write};
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
    name: Option<String>,
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

    /// Keep it in the bake cache under this name (instead of the image's and configuration's
    /// key): [`Image::from_bake`] and `run --snapshot NAME` find it by name.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.into());
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
        let workload = crate::run::BakedWorkload::of(&loaded.state).ok_or_else(|| {
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

    /// A snapshot directory, or the name of a bake in the bake cache ([`BakeOptions::name`],
    /// `supermachine bake --as`). Unlike [`Image::from_snapshot`] nothing is read now: a bad
    /// snapshot fails when started.
    pub fn from_bake(dir_or_name: &str) -> Result<Image> {
        let path = PathBuf::from(dir_or_name);
        let dir = if path.is_dir() {
            path
        } else {
            match bake_path(dir_or_name) {
                Ok(named) if named.is_dir() => named,
                _ => {
                    return Err(Error::Snapshot(format!(
                        "{dir_or_name}: no such snapshot directory or bake"
                    )))
                }
            }
        };
        Ok(Image {
            reference: String::new(),
            snapshot: Some(dir),
        })
    }

    /// Runs the image in the foreground on this thread until its workload exits, as
    /// `docker run` does: the workload's standard streams are `attach`'s. Returns its exit
    /// status (128 + signal when killed, as a shell says). The VM shows in `supermachine ps`
    /// meanwhile. With a baked image (or a matching bake in the cache) it is a restore.
    pub fn run(&self, config: &VmConfig, attach: Attach) -> Result<i32> {
        let mut opts = config.run_options(&self.reference, self.snapshot.as_deref())?;
        opts.interactive = attach.stdin.is_some();
        opts.tty = attach.tty;
        opts.forward_signals = attach.forward_signals;
        let _raw = (attach.tty && attach.raw_terminal).then(crate::run::RawTerminal::enable);
        Ok(crate::run::run(
            &opts,
            attach.stdout,
            attach.stderr,
            attach.stdin,
        )?)
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
        // The bake holds the workload itself when asked to; an idle bake is a before-start one
        // of the image's command.
        if run.config.workload == Workload::Idle {
            run.config.workload = Workload::ImageCommand;
        }
        let dir = match (&opts.dir, &opts.name) {
            (Some(dir), _) => Some(dir.clone()),
            (None, Some(name)) => Some(bake_path(name)?),
            (None, None) => None,
        };
        run.bake = Some(crate::run::BakeOptions {
            dir,
            ready,
            ready_limit: opts.ready_limit,
        });
        // With `debug`, the workload's output shows; otherwise it is only kept for errors.
        let (stdout, stderr): (Box<dyn Write + Send>, Box<dyn Write + Send>) = if opts.config.debug
        {
            (Box::new(std::io::stderr()), Box::new(std::io::stderr()))
        } else {
            (
                Box::new(std::io::sink()),
                Box::new(crate::machine::Tail::default()),
            )
        };
        let dir = crate::run::bake(&run, stdout, stderr)?;
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

    /// An image by reference, looked up (and pulled, as [`VmConfig::pull`] says) only when
    /// started: no I/O now.
    pub fn new(reference: &str) -> Image {
        Image::from_store(reference)
    }

    /// A pool of VMs restored from this image's snapshot (baked first if it is not).
    pub fn pool(&self) -> PoolBuilder {
        PoolBuilder::new(self.clone())
    }
}

/// `<bake cache>/<name>` for a bake name (one path component).
fn bake_path(name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(Error::Config(format!(
            "{name:?}: a bake name is one path component"
        )));
    }
    let store = crate::images::store()?;
    Ok(crate::run::bake_cache_dir(&store).join(name))
}

/// Where a foreground run's workload reads and writes ([`Image::run`]).
pub struct Attach {
    stdin: Option<Box<dyn Read + Send>>,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    tty: bool,
    raw_terminal: bool,
    forward_signals: bool,
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attach")
            .field("stdin", &self.stdin.is_some())
            .field("tty", &self.tty)
            .field("forward_signals", &self.forward_signals)
            .finish()
    }
}

impl Attach {
    /// This process's stdout and stderr; stdin closed (`docker run` without `-i`).
    pub fn inherit() -> Attach {
        Attach {
            stdin: None,
            stdout: Box::new(std::io::stdout()),
            stderr: Box::new(std::io::stderr()),
            tty: false,
            raw_terminal: false,
            forward_signals: false,
        }
    }

    /// This process's stdin too (`-i`); with [`Attach::tty`] and a terminal there, that
    /// terminal is in raw mode for the run (every key, ^C included, goes to the workload).
    pub fn interactive(mut self) -> Self {
        self.stdin = Some(Box::new(std::io::stdin()));
        self.raw_terminal = true;
        self
    }

    /// Reads the workload's stdin from `reader` until its end.
    pub fn stdin(mut self, reader: impl Read + Send + 'static) -> Self {
        self.stdin = Some(Box::new(reader));
        self.raw_terminal = false;
        self
    }

    /// The workload's stdout goes to `writer`.
    pub fn stdout(mut self, writer: impl Write + Send + 'static) -> Self {
        self.stdout = Box::new(writer);
        self
    }

    /// The workload's stderr goes to `writer`.
    pub fn stderr(mut self, writer: impl Write + Send + 'static) -> Self {
        self.stderr = Box::new(writer);
        self
    }

    /// Gives the workload a terminal (`-t`): its output is one stream, on stdout; this
    /// process's window size follows it.
    pub fn tty(mut self, yes: bool) -> Self {
        self.tty = yes;
        self
    }

    /// This process is the VM's own, as `supermachine run` is: SIGINT/SIGTERM/SIGHUP sent to
    /// it stop the workload (its stop signal, then power-off after the stop timeout; a second
    /// one powers off at once), and `supermachine stop` signals it. Default: off, the VM is
    /// stopped through its control socket like any VM a program embeds.
    pub fn forward_signals(mut self, yes: bool) -> Self {
        self.forward_signals = yes;
        self
    }
}
