//! Snapshots of whole VMs: what a snapshot of ours contains (on the `snapshot` crate's format),
//! taking one from a running VM, and restoring one.
//!
//! Today a snapshot holds the vCPUs, the VM's interrupt controllers, timer and clock, the
//! serial port and guest memory; VMs with virtio devices are refused until those devices save
//! their state (see the notes on issue 7).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_core::arch::x86_64::state::{VcpuState, VmState};
use vmm_core::{CapturedVm, GuestMemory};

/// Why taking or restoring a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot files.
    #[error(transparent)]
    Format(#[from] snapshot::SnapshotError),
    /// Pausing the VM or saving its state.
    #[error(transparent)]
    Capture(#[from] vmm_core::CaptureError),
    /// The snapshot does not fit this host or this build.
    #[error("cannot restore {dir}: {why}")]
    Incompatible {
        /// The snapshot.
        dir: PathBuf,
        /// What differs.
        why: String,
    },
    /// Something this VM has cannot be saved yet.
    #[error("cannot snapshot this VM: {0}")]
    Unsupported(String),
    /// Reading guest memory or mapping the memory file.
    #[error("{0}")]
    Memory(String),
}

/// What must match between the machine that took a snapshot and the one restoring it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The supermachine version that wrote it.
    pub supermachine: String,
    /// The host CPU (`/proc/cpuinfo` vendor, family, model, stepping and flags, hashed).
    pub host_cpu: String,
    /// The guest kernel file's identity (size and modification time), if one was booted.
    pub kernel: Option<String>,
}

/// The host CPU's identity: a snapshot's CPU state (CPUID, MSRs, XSAVE layout) is only known
/// to be valid on the same CPU model with the same features.
pub fn host_cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let summary = format!(
        "{} family {} model {} stepping {}",
        field("vendor_id"),
        field("cpu family"),
        field("model"),
        field("stepping")
    );
    let mut flags: Vec<&str> = Vec::new();
    let all_flags = field("flags");
    flags.extend(all_flags.split_whitespace());
    flags.sort_unstable();
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = flags.join(" ").bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    format!("{summary} flags {hash:016x}")
}

/// A file's identity without reading it: size and modification time.
pub fn file_identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "{} bytes, modified {}.{:09}",
        m.len(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// Everything in a snapshot's state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// What must match to restore.
    pub identity: Identity,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Where each RAM region is in the memory file.
    pub memory: Vec<snapshot::MemoryRegion>,
    /// The vCPUs.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, timer, clock.
    pub vm: VmState,
    /// COM1.
    pub serial: devices::legacy::SerialSnapshot,
}

/// Writes a captured VM to `dir` (atomically replacing what was there).
pub fn write(
    dir: &Path,
    captured: &CapturedVm,
    identity: Identity,
    memory_mib: u32,
    serial: devices::legacy::SerialSnapshot,
) -> Result<PathBuf, SnapshotError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let ranges: Vec<(u64, u64)> = captured
        .memory
        .iter()
        .map(|r| (r.start_addr().0, r.len()))
        .collect();
    let layout = snapshot::MemoryRegion::layout(&ranges);
    let mut writer = snapshot::SnapshotWriter::create(dir)?;
    for (region, placed) in captured.memory.iter().zip(&layout) {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| SnapshotError::Memory(format!("guest memory: {e}")))?;
        // SAFETY: the region is a live mapping of `len` bytes owned by `captured.memory`; the
        // vCPUs are paused and no device runs, so nothing writes it while we read.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, region.len() as usize) };
        writer.write_memory(placed, bytes)?;
    }
    let state = MachineState {
        identity,
        memory_mib,
        memory: layout,
        vcpus: captured.vcpus.clone(),
        vm: captured.vm.clone(),
        serial,
    };
    Ok(writer.commit(&state)?)
}

/// A snapshot read back and checked against this host: its state and its memory, mapped.
pub struct LoadedSnapshot {
    /// The state file.
    pub state: MachineState,
    /// Guest RAM, mapped copy-on-write from the memory file.
    pub memory: GuestMemory,
}

/// Reads `dir`, checks it can run here (`kernel`: the kernel it must have been taken with, if
/// the caller has one), and maps its memory.
pub fn load(dir: &Path, kernel: Option<&Path>) -> Result<LoadedSnapshot, SnapshotError> {
    let state: MachineState = snapshot::read_state(dir)?;
    let incompatible = |why: String| SnapshotError::Incompatible {
        dir: dir.to_path_buf(),
        why,
    };
    let here = host_cpu();
    if state.identity.host_cpu != here {
        return Err(incompatible(format!(
            "it was taken on another CPU ({}; this host: {here})",
            state.identity.host_cpu
        )));
    }
    if let Some(kernel) = kernel {
        let now = file_identity(kernel);
        if state.identity.kernel.is_some() && state.identity.kernel != now {
            return Err(incompatible(format!(
                "it was taken with another build of the guest kernel {} ({}; now {})",
                kernel.display(),
                state.identity.kernel.as_deref().unwrap_or("?"),
                now.as_deref().unwrap_or("missing")
            )));
        }
    }
    if state.vcpus.is_empty() || state.vcpus.len() > usize::from(vmm_core::builder::MAX_VCPUS) {
        return Err(incompatible(format!("it has {} vCPUs", state.vcpus.len())));
    }
    let file = snapshot::open_memory(dir, &state.memory)?;
    let regions: Vec<(u64, u64, u64)> = state
        .memory
        .iter()
        .map(|r| (r.guest_addr, r.len, r.file_offset))
        .collect();
    let memory = vmm_core::memory::guest_memory_from_file(&file, &regions)
        .map_err(|e| SnapshotError::Memory(format!("{}: {e}", dir.display())))?;
    Ok(LoadedSnapshot { state, memory })
}

/// When to take a snapshot of a booting VM, and where to put it.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    /// Take it once the guest has written this on its serial console.
    pub when_output: String,
    /// The snapshot directory.
    pub dir: PathBuf,
}

/// Watches serial output for a marker; the snapshot thread waits on it.
#[derive(Clone, Default)]
pub(crate) struct MarkerSeen(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl MarkerSeen {
    pub(crate) fn set(&self) {
        let (lock, cv) = &*self.0;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    /// Waits until set or `stop()` is true (checked every 10 ms).
    pub(crate) fn wait(&self, stop: impl Fn() -> bool) -> bool {
        let (lock, cv) = &*self.0;
        let mut seen = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !*seen {
            if stop() {
                return false;
            }
            seen = cv
                .wait_timeout(seen, std::time::Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// Passes output through and sets a flag the first time `marker` has gone by.
pub(crate) struct MarkerWatch {
    pub(crate) inner: Box<dyn std::io::Write + Send>,
    pub(crate) marker: Vec<u8>,
    pub(crate) tail: Vec<u8>,
    pub(crate) seen: MarkerSeen,
    pub(crate) done: bool,
}

impl std::io::Write for MarkerWatch {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        if !self.done {
            self.tail.extend_from_slice(&b[..n]);
            if self
                .tail
                .windows(self.marker.len())
                .any(|w| w == self.marker)
            {
                self.done = true;
                self.seen.set();
            } else {
                let keep = self.marker.len().saturating_sub(1);
                let cut = self.tail.len().saturating_sub(keep);
                self.tail.drain(..cut);
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
