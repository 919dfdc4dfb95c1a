//! What the KVM backend does the same on every architecture: memory slots, irqfds, ioeventfds,
//! kicking vCPUs with a signal.

use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

use kvm_bindings::{
    kvm_userspace_memory_region, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit as KvmExit, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_core::{BorrowedDescriptor, GuestMemory, HypervisorError, IoHandler, VcpuExit, VcpuKicker};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// Maps a `kvm-ioctls` error of `op` to the neutral error.
pub(crate) fn err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::call(op, e)
}

pub(crate) fn register_memory(fd: &VmFd, memory: &GuestMemory) -> Result<(), HypervisorError> {
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| HypervisorError::call("guest memory host address", e))?;
        let mr = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `memory`, and
        // the VM keeps a clone of `memory`, so the mapping outlives the memory slot.
        unsafe { fd.set_user_memory_region(mr) }.map_err(err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Makes a guest write of `datamatch` at `addr` signal `fd` in the kernel.
pub(crate) fn register_ioevent(
    vm: &VmFd,
    fd: BorrowedDescriptor<'_>,
    addr: u64,
    datamatch: u32,
) -> Result<bool, HypervisorError> {
    // SAFETY: `fd` is a valid open descriptor for the duration of this call; ManuallyDrop
    // keeps the temporary EventFd from closing the caller's descriptor.
    let evt = std::mem::ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd.as_raw_fd()) });
    vm.register_ioevent(&evt, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
        .map_err(err("KVM_IOEVENTFD"))?;
    Ok(true)
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

pub(crate) fn install_kick_handler() -> Result<(), HypervisorError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| HypervisorError::call("install vCPU kick signal handler", e));
    });
    result
}

/// Kicks a vCPU thread out of `KVM_RUN` with a signal.
pub(crate) struct KvmKicker {
    pub(crate) thread: Arc<AtomicU64>,
}

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        let tid = self.thread.load(Ordering::Acquire);
        if tid != 0 {
            // SAFETY: `tid` was recorded by the vCPU thread itself from pthread_self(); the
            // runner keeps that thread's JoinHandle unjoined while kicking, so the id is valid.
            unsafe {
                libc::pthread_kill(tid as libc::pthread_t, kick_signal());
            }
        }
    }
}

/// Records the calling thread as the vCPU's, for kicks (on its first run).
pub(crate) fn note_vcpu_thread(thread: &AtomicU64) {
    if thread.load(Ordering::Relaxed) == 0 {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        thread.store(me as u64, Ordering::Release);
    }
}

/// Turns a `KVM_RUN` result into the neutral exit where every architecture does the same: MMIO
/// (completed through `io`), halts, shutdowns, kicks, system events (power-off, reset), entry
/// failures and errors. What is left (`Err`: port I/O, internal errors, the unknown) is the
/// architecture's to handle.
pub(crate) fn common_exit<'a>(
    result: Result<KvmExit<'a>, kvm_ioctls::Error>,
    io: &dyn IoHandler,
) -> Result<Result<VcpuExit, KvmExit<'a>>, HypervisorError> {
    Ok(Ok(match result {
        Ok(KvmExit::MmioRead(addr, data)) => {
            io.mmio_read(addr, data);
            VcpuExit::Mmio
        }
        Ok(KvmExit::MmioWrite(addr, data)) => {
            io.mmio_write(addr, data);
            VcpuExit::Mmio
        }
        Ok(KvmExit::Hlt) => VcpuExit::Hlt,
        Ok(KvmExit::Shutdown) => VcpuExit::Shutdown,
        Ok(KvmExit::Intr) => VcpuExit::Interrupted,
        Ok(KvmExit::SystemEvent(kind, _)) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::PowerOff,
            KVM_SYSTEM_EVENT_RESET => VcpuExit::Reset,
            KVM_SYSTEM_EVENT_CRASH => VcpuExit::Shutdown,
            other => VcpuExit::Unknown(format!("KVM system event {other}")),
        },
        Ok(KvmExit::FailEntry(reason, cpu)) => VcpuExit::FailEntry(format!(
            "hardware entry failure reason {reason:#x} on host CPU {cpu}"
        )),
        Ok(other) => return Ok(Err(other)),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => VcpuExit::Interrupted,
        Err(e) => return Err(HypervisorError::call("KVM_RUN", e)),
    }))
}
