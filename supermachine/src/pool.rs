//! [`Pool`]: VMs restored from one snapshot ahead of demand, handed out by
//! [`Pool::acquire`] and thrown away on release, so no state passes from one user to the next.
//!
//! Background threads keep `min` VMs restored and idle (more while callers wait, up to `max` in
//! all). A released VM is powered off on another thread and a fresh restore takes its place:
//! "reset to the snapshot" is a new clone, which shares the snapshot's unmodified memory pages.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::image::{BakeOptions, Image};
use crate::machine::{Vm, VmConfig, Workload};

/// Builds a [`Pool`] (from [`Image::pool`]).
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    image: Image,
    min: usize,
    max: usize,
    config: VmConfig,
    acquire_timeout: Duration,
    restorers: usize,
}

impl PoolBuilder {
    pub(crate) fn new(image: Image) -> Self {
        PoolBuilder {
            image,
            min: 1,
            max: 4,
            config: VmConfig::default(),
            acquire_timeout: Duration::from_secs(30),
            restorers: 2,
        }
    }

    /// VMs kept restored and idle, ready for `acquire` (default 1).
    pub fn min(mut self, n: usize) -> Self {
        self.min = n;
        self
    }

    /// VMs in all, idle and in use (default 4).
    pub fn max(mut self, n: usize) -> Self {
        self.max = n.max(1);
        self
    }

    /// The VMs' configuration: used to bake the image if it is not baked yet, and for the
    /// settings a restore can change (env, published ports, name…).
    pub fn config(mut self, config: VmConfig) -> Self {
        self.config = config;
        self
    }

    /// How long `acquire` waits for a VM before [`Error::PoolExhausted`] (default 30 s).
    pub fn acquire_timeout(mut self, limit: Duration) -> Self {
        self.acquire_timeout = limit;
        self
    }

    /// Restores run at once in the background (default 2).
    pub fn restorers(mut self, n: usize) -> Self {
        self.restorers = n.max(1);
        self
    }

    /// Bakes the image if needed (an idle sandbox of the configuration), starts the background
    /// restorers and returns at once; the first `acquire` waits for the first restore.
    pub fn build(self) -> Result<Pool> {
        let image = match self.image.snapshot_dir() {
            Some(_) => self.image.clone(),
            None => self
                .image
                .bake(&BakeOptions::new().config(self.config.clone()))?,
        };
        let snapshot = image
            .snapshot_dir()
            .map(PathBuf::from)
            .ok_or_else(|| Error::Snapshot("the bake produced no snapshot".into()))?;
        // Names are unique per VM: a pool's VMs get generated ones.
        let mut config = self.config;
        config.name = None;
        if config.workload == Workload::ImageCommand {
            // A restore runs what was baked.
            config.workload = Workload::Idle;
        }
        let inner = Arc::new(Inner {
            reference: image.reference().to_string(),
            snapshot,
            config,
            min: self.min.min(self.max),
            max: self.max,
            acquire_timeout: self.acquire_timeout,
            state: Mutex::default(),
            changed: Condvar::new(),
        });
        for n in 0..self.restorers {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("pool-restore-{n}"))
                .spawn(move || inner.restore_loop())?;
        }
        Ok(Pool { inner })
    }
}

/// A pool of VMs restored from one snapshot. Cheap to share between threads (`&Pool` is
/// enough; it is `Sync`). Dropping it powers off its idle VMs and stops restoring; VMs still
/// acquired are powered off when released.
pub struct Pool {
    inner: Arc<Inner>,
}

/// What a pool holds right now, and has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Restored and waiting for `acquire`.
    pub idle: usize,
    /// Handed out and not released yet.
    pub in_use: usize,
    /// Being restored.
    pub restoring: usize,
    /// Released and being powered off.
    pub stopping: usize,
    /// Successful `acquire` calls.
    pub acquired: u64,
    /// VMs restored.
    pub restored: u64,
    /// Restores that failed.
    pub failed: u64,
}

impl PoolStats {
    /// VMs that exist now (idle, in use, restoring, stopping).
    pub fn live(&self) -> usize {
        self.idle + self.in_use + self.restoring + self.stopping
    }
}

#[derive(Default)]
struct State {
    idle: VecDeque<Vm>,
    stats: PoolStats,
    waiting: usize,
    last_error: Option<String>,
    closed: bool,
}

struct Inner {
    reference: String,
    snapshot: PathBuf,
    config: VmConfig,
    min: usize,
    max: usize,
    acquire_timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether another restore should start now.
    fn wants_restore(&self, st: &State) -> bool {
        let s = &st.stats;
        let owned = s.idle + s.in_use + s.restoring;
        !st.closed && owned < self.max && s.idle + s.restoring < self.min + st.waiting
    }

    fn restore_loop(&self) {
        loop {
            let mut st = self.lock();
            while !st.closed && !self.wants_restore(&st) {
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.closed {
                return;
            }
            st.stats.restoring += 1;
            drop(st);
            let vm = Vm::start(&self.reference, Some(&self.snapshot), &self.config);
            let mut st = self.lock();
            st.stats.restoring -= 1;
            let failed = match vm {
                Ok(vm) if st.closed => {
                    drop(st);
                    vm.kill();
                    return;
                }
                Ok(vm) => {
                    st.idle.push_back(vm);
                    st.stats.idle += 1;
                    st.stats.restored += 1;
                    st.last_error = None;
                    false
                }
                Err(e) => {
                    st.stats.failed += 1;
                    st.last_error = Some(e.to_string());
                    true
                }
            };
            self.changed.notify_all();
            drop(st);
            if failed {
                // Do not spin on a restore that keeps failing.
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    fn release(self: &Arc<Self>, vm: Vm) {
        {
            let mut st = self.lock();
            st.stats.in_use -= 1;
            st.stats.stopping += 1;
            self.changed.notify_all();
        }
        // Powering off (and unmapping) happens off the caller's thread.
        let inner = self.clone();
        std::thread::spawn(move || {
            vm.kill();
            let mut st = inner.lock();
            st.stats.stopping -= 1;
            inner.changed.notify_all();
        });
    }
}

impl Pool {
    /// A VM restored from the snapshot and ready; waits (up to the acquire timeout) while all
    /// `max` VMs are in use. Release it by dropping it (or [`Pool::release`]).
    pub fn acquire(&self) -> Result<Pooled> {
        self.acquire_timeout(self.inner.acquire_timeout)
    }

    /// As [`Pool::acquire`], waiting at most `limit`.
    pub fn acquire_timeout(&self, limit: Duration) -> Result<Pooled> {
        let inner = &self.inner;
        let started = Instant::now();
        let mut st = inner.lock();
        st.waiting += 1;
        inner.changed.notify_all();
        let result = loop {
            if let Some(vm) = st.idle.pop_front() {
                st.stats.idle -= 1;
                st.stats.in_use += 1;
                st.stats.acquired += 1;
                break Ok(vm);
            }
            // Nothing is coming: every restore fails.
            if st.stats.restoring == 0 && st.stats.failed > 0 {
                if let Some(e) = &st.last_error {
                    if !inner.wants_restore(&st) || started.elapsed() > Duration::from_secs(1) {
                        break Err(Error::PoolBroken(e.clone()));
                    }
                }
            }
            let left = limit.saturating_sub(started.elapsed());
            if left.is_zero() {
                break Err(Error::PoolExhausted {
                    max: inner.max,
                    waited: limit,
                });
            }
            st = inner
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        st.waiting -= 1;
        inner.changed.notify_all();
        drop(st);
        result.map(|vm| Pooled {
            vm: Some(vm),
            pool: self.inner.clone(),
        })
    }

    /// Returns a VM to the pool (the same as dropping it): it is powered off and replaced by a
    /// fresh restore.
    pub fn release(&self, vm: Pooled) {
        drop(vm);
    }

    /// The pool's counts now.
    pub fn stats(&self) -> PoolStats {
        self.inner.lock().stats
    }

    /// The snapshot its VMs are restored from.
    pub fn snapshot_dir(&self) -> &std::path::Path {
        &self.inner.snapshot
    }

    /// Waits until no VM is being restored or powered off and at least `min` are idle (or
    /// `limit` passes); the stats then.
    pub fn settle(&self, limit: Duration) -> PoolStats {
        let deadline = Instant::now() + limit;
        let mut st = self.inner.lock();
        loop {
            let s = st.stats;
            let filled = s.idle >= self.inner.min || s.idle + s.in_use >= self.inner.max;
            let now = Instant::now();
            if (s.restoring == 0 && s.stopping == 0 && (filled || st.last_error.is_some()))
                || now >= deadline
            {
                return s;
            }
            st = self
                .inner
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let idle: Vec<Vm> = {
            let mut st = self.inner.lock();
            st.closed = true;
            st.stats.idle = 0;
            self.inner.changed.notify_all();
            st.idle.drain(..).collect()
        };
        for vm in idle {
            vm.kill();
        }
    }
}

/// A VM on loan from a [`Pool`]; derefs to [`Vm`]. Dropping it returns it (powered off and
/// replaced by a fresh restore).
pub struct Pooled {
    vm: Option<Vm>,
    pool: Arc<Inner>,
}

impl std::fmt::Debug for Pooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Pooled").field(&self.vm).finish()
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("snapshot", &self.inner.snapshot)
            .field("stats", &self.stats())
            .finish()
    }
}

impl std::ops::Deref for Pooled {
    type Target = Vm;

    fn deref(&self) -> &Vm {
        self.vm
            .as_ref()
            .expect("a pooled VM is present until dropped")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            self.pool.release(vm);
        }
    }
}
