//! Async wrappers for tokio programs (feature `tokio`): each call is the blocking call of the
//! same name run on tokio's blocking thread pool, so an async program drives many VMs without
//! stalling its executor. Nothing else changes: same [`crate::Error`], same semantics.
//!
//! ```no_run
//! # async fn demo() -> supermachine::Result<()> {
//! use supermachine::tokio::{Exec, Vm};
//! use supermachine::{Image, VmConfig};
//!
//! let image = supermachine::tokio::open("busybox").await?;
//! let vm = Vm::start(&image, &VmConfig::new()).await?;
//! let out = vm.exec(Exec::new(["echo", "hello"])).await?;
//! assert_eq!(out.stdout, b"hello\n");
//! vm.stop().await?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::{BakeOptions, ExecBuilder, Image, Output, PoolBuilder, PoolStats, VmConfig};

/// Runs `f` on the blocking pool. A panic in it is resumed here, as if it ran inline.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match ::tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Error::Io(std::io::Error::other(e))),
    }
}

/// [`Image::open`].
pub async fn open(reference: &str) -> Result<Image> {
    let reference = reference.to_string();
    blocking(move || Image::open(&reference)).await
}

/// [`Image::pull`].
pub async fn pull(reference: &str) -> Result<Image> {
    let reference = reference.to_string();
    blocking(move || Image::pull(&reference)).await
}

/// [`Image::bake`].
pub async fn bake(image: &Image, opts: &BakeOptions) -> Result<Image> {
    let (image, opts) = (image.clone(), opts.clone());
    blocking(move || image.bake(&opts)).await
}

mod sealed {
    /// What owns a VM: [`crate::Vm`] itself or a pool's loan.
    pub trait Owner: Send + Sync + 'static {
        fn vm(&self) -> &crate::Vm;
    }
}

impl sealed::Owner for crate::Vm {
    fn vm(&self) -> &crate::Vm {
        self
    }
}

impl sealed::Owner for crate::Pooled {
    fn vm(&self) -> &crate::Vm {
        self
    }
}

/// A command for [`Vm::exec`]: what [`ExecBuilder`] takes, owned so it can move to the
/// thread that runs it.
#[derive(Debug, Clone, Default)]
pub struct Exec {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    user: Option<String>,
    stdin: Option<Vec<u8>>,
    staged: Vec<(String, Vec<u8>)>,
    timeout: Option<Duration>,
}

impl Exec {
    /// The program (looked up in `PATH`) and its arguments.
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Exec {
        Exec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Exec::default()
        }
    }

    /// [`ExecBuilder::env`].
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// [`ExecBuilder::cwd`].
    pub fn cwd(mut self, dir: &str) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// [`ExecBuilder::user`].
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.into());
        self
    }

    /// [`ExecBuilder::stdin`].
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// [`ExecBuilder::stage_file`].
    pub fn stage_file(mut self, path: &str, content: impl Into<Vec<u8>>) -> Self {
        self.staged.push((path.into(), content.into()));
        self
    }

    /// [`ExecBuilder::timeout`].
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    fn apply(self, mut b: ExecBuilder<'_>) -> ExecBuilder<'_> {
        b = b.argv(self.argv);
        for (k, v) in &self.env {
            b = b.env(k, v);
        }
        if let Some(d) = &self.cwd {
            b = b.cwd(d);
        }
        if let Some(u) = &self.user {
            b = b.user(u);
        }
        if let Some(s) = self.stdin {
            b = b.stdin(s);
        }
        for (path, content) in self.staged {
            b = b.stage_file(&path, content);
        }
        if let Some(t) = self.timeout {
            b = b.timeout(t);
        }
        b
    }
}

/// A VM for async code: a started [`crate::Vm`], or ([`PooledVm`]) one on loan from a
/// [`Pool`]. Dropping it drops the VM (powered off, or returned to its pool) once calls still
/// running on the blocking pool are done.
pub struct Vm<O: sealed::Owner = crate::Vm>(Arc<O>);

/// A VM on loan from a [`Pool`].
pub type PooledVm = Vm<crate::Pooled>;

impl<O: sealed::Owner> std::fmt::Debug for Vm<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.vm().fmt(f)
    }
}

impl Vm<crate::Vm> {
    /// [`Image::start`].
    pub async fn start(image: &Image, config: &VmConfig) -> Result<Vm> {
        let (image, config) = (image.clone(), config.clone());
        blocking(move || image.start(&config).map(|vm| Vm(Arc::new(vm)))).await
    }

    /// [`crate::Vm::stop`], once calls still running on it are done.
    pub async fn stop(self) -> Result<i32> {
        let mut vm = self.0;
        blocking(move || loop {
            match Arc::try_unwrap(vm) {
                Ok(vm) => return vm.stop(),
                Err(shared) => {
                    vm = shared;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
        .await
    }
}

impl<O: sealed::Owner> Vm<O> {
    /// The VM itself, for the calls that do not block (id, name, exposing ports…).
    pub fn blocking(&self) -> &crate::Vm {
        self.0.vm()
    }

    /// [`ExecBuilder::output`] of `cmd`.
    pub async fn exec(&self, cmd: Exec) -> Result<Output> {
        let owner = self.0.clone();
        blocking(move || cmd.apply(owner.vm().exec_builder()).output()).await
    }

    /// [`crate::Vm::write_file`].
    pub async fn write_file(&self, path: &str, content: impl Into<Vec<u8>>) -> Result<()> {
        let (owner, path, content) = (self.0.clone(), path.to_string(), content.into());
        blocking(move || owner.vm().write_file(&path, &content)).await
    }

    /// [`crate::Vm::read_file`].
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let (owner, path) = (self.0.clone(), path.to_string());
        blocking(move || owner.vm().read_file(&path)).await
    }

    /// [`crate::Vm::connect`] (a std stream: `tokio::net::UnixStream::from_std` after
    /// `set_nonblocking(true)` makes it an async one).
    pub async fn connect(&self, port: u16) -> Result<std::os::unix::net::UnixStream> {
        let owner = self.0.clone();
        blocking(move || owner.vm().connect(port)).await
    }

    /// [`crate::Vm::snapshot`].
    pub async fn snapshot(&self, dir: impl Into<PathBuf>) -> Result<PathBuf> {
        let (owner, dir) = (self.0.clone(), dir.into());
        blocking(move || owner.vm().snapshot(dir)).await
    }
}

/// A [`crate::Pool`] for async code.
#[derive(Debug, Clone)]
pub struct Pool(Arc<crate::Pool>);

impl Pool {
    /// [`PoolBuilder::build`] (which bakes the image first if needed).
    pub async fn build(builder: PoolBuilder) -> Result<Pool> {
        blocking(move || builder.build().map(|p| Pool(Arc::new(p)))).await
    }

    /// [`crate::Pool::acquire`]: waits (without blocking the executor) for a fresh VM.
    pub async fn acquire(&self) -> Result<PooledVm> {
        let pool = self.0.clone();
        blocking(move || pool.acquire().map(|vm| Vm(Arc::new(vm)))).await
    }

    /// [`crate::Pool::stats`].
    pub fn stats(&self) -> PoolStats {
        self.0.stats()
    }

    /// The pool itself, for blocking callers.
    pub fn blocking(&self) -> &crate::Pool {
        &self.0
    }
}
