//! Snapshots of whole VMs: what a snapshot of ours contains (on the `snapshot` crate's format),
//! taking one from a running VM, and restoring one.
//!
//! A snapshot holds the vCPUs, the VM's interrupt controllers, timer and clock, the serial
//! port, every virtio device (what it is, its MMIO slot, its transport and queue positions),
//! guest memory, and an opaque payload its owner writes (the `supermachine` facade: what the
//! workload is). Devices are recreated on restore in
//! the same slots from their recipes ([`DeviceKind`]): disks are reopened (and must still have
//! their size), consoles are wired to the restoring process, vsock gets a new host socket and
//! resets the guest's old connections.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_core::arch::host::{VcpuState, VmState};
use vmm_core::{CapturedVm, GuestMemory, VmControl, VmExit};

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
    /// The host architecture (`x86_64`, `aarch64`): first, so a state of another architecture,
    /// whose register layout this build cannot decode, still says where it came from.
    pub arch: String,
    /// The supermachine version that wrote it.
    pub supermachine: String,
    /// The host CPU ([`host_cpu`]: vendor, family, model, stepping, feature bits hashed).
    pub host_cpu: String,
    /// The guest kernel file's identity (size and modification time), if one was booted.
    pub kernel: Option<String>,
    /// The base initramfs file's identity, if there was one.
    pub initramfs: Option<String>,
}

impl Identity {
    /// This host and build, with the given kernel and initramfs.
    pub fn here(kernel: Option<&Path>, initramfs: Option<&Path>) -> Identity {
        Identity {
            arch: std::env::consts::ARCH.into(),
            supermachine: env!("CARGO_PKG_VERSION").into(),
            host_cpu: host_cpu(),
            kernel: kernel.and_then(file_identity),
            initramfs: initramfs.and_then(file_identity),
        }
    }
}

/// The layout of [`MachineState`]; a state written with another is refused. 4: the host CPU
/// identity comes from CPUID (a state of 3 would only fail the CPU check, less clearly). 6: the
/// workload became an opaque payload of the facade. 7: the identity names the architecture.
pub const MACHINE_STATE_VERSION: u32 = 7;

/// What a virtio device in a snapshot is, so restore can make it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// A virtio-blk disk backed by `path`.
    Block {
        /// The backing file.
        path: PathBuf,
        /// Attached read-only.
        read_only: bool,
        /// Its size in 512-byte sectors when the snapshot was taken.
        sectors: u64,
    },
    /// A single-port virtio console (the n-th console of the VM, in slot order).
    Console,
    /// The virtio-vsock device.
    Vsock {
        /// The guest's context id.
        cid: u64,
    },
    /// A virtio-net device (its host side, user-mode NAT or TAP, is chosen at restore).
    Net {
        /// The guest's MAC address.
        mac: [u8; 6],
    },
    /// A shared host directory (virtio-fs). Not restorable: the FUSE server's inodes that the
    /// guest holds are not part of a snapshot.
    Fs {
        /// The tag the guest mounted.
        tag: String,
        /// The host directory.
        dir: PathBuf,
    },
}

/// One virtio device in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// Its MMIO slot (address and interrupt line follow from it).
    pub slot: u32,
    /// What it is.
    pub kind: DeviceKind,
    /// Its transport registers and queues.
    pub transport: devices::virtio::TransportState,
}

/// The host CPU as a snapshot must match it: vendor, family, model, stepping and a hash of
/// the feature bits CPUID reports (computed once per process; CPUID rather than
/// `/proc/cpuinfo`, which the kernel takes tens of milliseconds to format under emulation).
pub fn host_cpu() -> String {
    static HOST_CPU: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST_CPU.get_or_init(read_host_cpu).clone()
}

#[cfg(target_arch = "x86_64")]
fn read_host_cpu() -> String {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let leaf0 = __cpuid(0);
    let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    let leaf1 = __cpuid(1);
    let base_family = (leaf1.eax >> 8) & 0xf;
    let family = base_family
        + if base_family == 0xf {
            (leaf1.eax >> 20) & 0xff
        } else {
            0
        };
    let model = ((leaf1.eax >> 4) & 0xf)
        | if base_family == 0x6 || base_family == 0xf {
            ((leaf1.eax >> 16) & 0xf) << 4
        } else {
            0
        };
    // Feature words only: no APIC id (leaf 1 EBX) and no OSXSAVE, which says what the OS
    // enabled rather than what the CPU has.
    let mut words = vec![leaf1.ecx & !(1 << 27), leaf1.edx];
    if leaf0.eax >= 7 {
        let l7 = __cpuid_count(7, 0);
        words.extend([l7.ebx, l7.ecx, l7.edx]);
    }
    if leaf0.eax >= 0xd {
        words.push(__cpuid_count(0xd, 1).eax);
    }
    if __cpuid(0x8000_0000).eax >= 0x8000_0001 {
        let ext = __cpuid(0x8000_0001);
        words.extend([ext.ecx, ext.edx]);
    }
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = words
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
    format!(
        "{} family {family} model {model} stepping {} cpuid {hash:016x}",
        String::from_utf8_lossy(&vendor),
        leaf1.eax & 0xf
    )
}

#[cfg(not(target_arch = "x86_64"))]
fn read_host_cpu() -> String {
    // Other architectures: the kernel's description, without what varies from read to read.
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hash = info
        .lines()
        .filter(|l| !l.contains("MHz") && !l.contains("BogoMIPS"))
        .flat_map(str::bytes)
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
    format!("cpuinfo {hash:016x}")
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
    /// [`MACHINE_STATE_VERSION`] when written.
    pub version: u32,
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
    /// The virtio devices, in slot order.
    pub devices: Vec<DeviceSnapshot>,
    /// What the snapshot's owner wants kept with it (the facade: the workload a `run`/`bake`
    /// VM runs), opaque to this crate.
    pub payload: Option<Vec<u8>>,
}

/// The parts of a [`MachineState`] that do not come from the capture.
pub struct MachineParts {
    /// What must match to restore.
    pub identity: Identity,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// COM1.
    pub serial: devices::legacy::SerialSnapshot,
    /// The virtio devices.
    pub devices: Vec<DeviceSnapshot>,
    /// The owner's payload ([`MachineState::payload`]).
    pub payload: Option<Vec<u8>>,
}

/// Writes a captured VM to `dir` (atomically replacing what was there).
pub fn write(
    dir: &Path,
    captured: &CapturedVm,
    parts: MachineParts,
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
        version: MACHINE_STATE_VERSION,
        identity: parts.identity,
        memory_mib: parts.memory_mib,
        memory: layout,
        vcpus: captured.vcpus.clone(),
        vm: captured.vm.clone(),
        serial: parts.serial,
        devices: parts.devices,
        payload: parts.payload,
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

fn other_arch(arch: &str) -> String {
    format!(
        "it was taken on an {arch} host and this host is {} (snapshots hold one architecture's \
         registers; bake it again here)",
        std::env::consts::ARCH
    )
}

/// Reads `dir`, checks it can run here (`kernel`, `initramfs`: the files it must have been
/// taken with, if the caller has them), and maps its memory.
pub fn load(
    dir: &Path,
    kernel: Option<&Path>,
    initramfs: Option<&Path>,
) -> Result<LoadedSnapshot, SnapshotError> {
    let incompatible = |why: String| SnapshotError::Incompatible {
        dir: dir.to_path_buf(),
        why,
    };
    let state: MachineState = match snapshot::read_state(dir) {
        Ok(state) => state,
        // Intact (the checksum holds) but not this layout: most likely another build's or
        // architecture's. The layout version is the payload's first field, the architecture the
        // next.
        Err(e @ snapshot::SnapshotError::Corrupt { .. }) => {
            return Err(match snapshot::read_state_prefix::<u32>(dir) {
                Ok(version) if version != MACHINE_STATE_VERSION => incompatible(format!(
                    "its state layout is version {version}, this build reads \
                     {MACHINE_STATE_VERSION} (bake it again)"
                )),
                _ => match snapshot::read_state_prefix::<(u32, Identity)>(dir) {
                    Ok((_, identity)) if identity.arch != std::env::consts::ARCH => {
                        incompatible(other_arch(&identity.arch))
                    }
                    _ => e.into(),
                },
            })
        }
        Err(e) => return Err(e.into()),
    };
    if state.version != MACHINE_STATE_VERSION {
        return Err(incompatible(format!(
            "its state layout is version {}, this build reads {MACHINE_STATE_VERSION} (bake it again)",
            state.version
        )));
    }
    if state.identity.arch != std::env::consts::ARCH {
        return Err(incompatible(other_arch(&state.identity.arch)));
    }
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
    if let Some(initramfs) = initramfs {
        let now = file_identity(initramfs);
        if state.identity.initramfs.is_some() && state.identity.initramfs != now {
            return Err(incompatible(format!(
                "it was taken with another build of the initramfs {} ({}; now {})",
                initramfs.display(),
                state.identity.initramfs.as_deref().unwrap_or("?"),
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
    // Cut short between the check and the mapping: refused here rather than SIGBUS later.
    snapshot::check_memory_len(&file, dir, &state.memory)?;
    Ok(LoadedSnapshot { state, memory })
}

/// What the VM does after [`Snapshotter::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSnapshot {
    /// Carry on running.
    Resume,
    /// Stop (the VM ends with [`VmExit::Stopped`]).
    Stop,
}

/// A device of a running VM, as the snapshotter sees it.
#[derive(Clone)]
pub(crate) struct LiveDevice {
    pub(crate) slot: u32,
    pub(crate) kind: DeviceKind,
    pub(crate) transport: Arc<Mutex<devices::virtio::MmioTransport>>,
}

/// Takes snapshots of one running VM (any number, from any thread but the VM's own).
#[derive(Clone)]
pub struct Snapshotter {
    pub(crate) control: VmControl,
    pub(crate) serial: Arc<Mutex<devices::legacy::SerialConsole>>,
    pub(crate) devices: Vec<LiveDevice>,
    pub(crate) identity: Identity,
    pub(crate) memory_mib: u32,
}

impl Snapshotter {
    /// Pauses the VM, saves it to `dir` (atomically), and resumes or stops it (a VM the user
    /// had paused stays paused). The vCPUs are parked first, then the devices quiesced by
    /// holding their locks (the event loop finishes the request in hand and waits), and only
    /// then are the vCPUs, interrupt controllers and devices saved: an interrupt a device
    /// raised while the vCPUs were stopping is in the snapshot, not lost between two saves.
    pub fn take(
        &self,
        dir: &Path,
        payload: Option<Vec<u8>>,
        after: AfterSnapshot,
    ) -> Result<PathBuf, SnapshotError> {
        let was_paused = self.control.is_paused();
        self.control.pause()?;
        let result = self.save_paused(dir, payload);
        if after == AfterSnapshot::Stop {
            self.control.request_exit(VmExit::Stopped);
        }
        if !was_paused {
            self.control.unpause();
        }
        result
    }

    fn save_paused(&self, dir: &Path, payload: Option<Vec<u8>>) -> Result<PathBuf, SnapshotError> {
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let transports: Vec<_> = self
            .devices
            .iter()
            .map(|d| d.transport.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let captured = self.control.capture_paused()?;
        let devices = self
            .devices
            .iter()
            .zip(&transports)
            .map(|(d, t)| DeviceSnapshot {
                slot: d.slot,
                kind: d.kind.clone(),
                transport: t.save_state(),
            })
            .collect();
        write(
            dir,
            &captured,
            MachineParts {
                identity: self.identity.clone(),
                memory_mib: self.memory_mib,
                serial: serial.save_state(),
                devices,
                payload,
            },
        )
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_cpu_identity_is_stable_and_names_the_model() {
        let id = host_cpu();
        assert_eq!(id, read_host_cpu());
        if cfg!(target_arch = "x86_64") {
            assert!(id.contains(" family ") && id.contains(" model "), "{id}");
        }
    }

    #[test]
    fn a_state_of_another_architecture_is_refused_as_such() {
        let dir = std::env::temp_dir().join(format!("sm-arch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // This layout's version and identity, then registers this build cannot decode.
        let mut identity = Identity::here(None, None);
        identity.arch = "s390x".into();
        let written = snapshot::SnapshotWriter::create(&dir)
            .unwrap()
            .commit(&(
                MACHINE_STATE_VERSION,
                identity,
                String::from("its registers"),
            ))
            .unwrap();
        let e = load(&written, None, None).err().unwrap().to_string();
        assert!(
            e.contains("taken on an s390x host")
                && e.contains(&format!("this host is {}", std::env::consts::ARCH)),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_state_of_another_layout_is_refused_as_such() {
        let dir = std::env::temp_dir().join(format!("sm-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // What another build wrote: its layout version first, then fields laid out otherwise.
        let written = snapshot::SnapshotWriter::create(&dir)
            .unwrap()
            .commit(&(2u32, String::from("another build's identity")))
            .unwrap();
        let e = load(&written, None, None).err().unwrap().to_string();
        assert!(
            e.contains("layout is version 2") && e.contains("bake it again"),
            "{e}"
        );
        // A damaged state stays damaged, whatever its first bytes say.
        let state = written.join(snapshot::STATE_FILE);
        let mut bytes = std::fs::read(&state).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&state, bytes).unwrap();
        let e = load(&written, None, None).err().unwrap().to_string();
        assert!(e.contains("checksum"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
