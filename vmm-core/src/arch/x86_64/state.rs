//! Everything needed to resume an x86-64 vCPU and its VM elsewhere: plain serde structs that a
//! snapshot stores. Registers, the XSAVE area, the local APIC page, MSRs and CPUID are in their
//! architectural form, so any backend can read them; what has no architectural form (KVM's
//! pending-event record, its interrupt controller and PIT models) travels as an opaque blob
//! tagged with the backend that wrote it, and only that backend accepts it.

use serde::{Deserialize, Serialize};

use super::regs::{SpecialRegisters, StandardRegisters};

/// One CPUID leaf as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// EAX input.
    pub function: u32,
    /// ECX input (subleaf).
    pub index: u32,
    /// Backend flags (e.g. "index is significant").
    pub flags: u32,
    /// Output registers.
    pub eax: u32,
    /// Output registers.
    pub ebx: u32,
    /// Output registers.
    pub ecx: u32,
    /// Output registers.
    pub edx: u32,
}

/// Debug registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugRegisters {
    /// DR0-DR3.
    pub db: [u64; 4],
    /// DR6.
    pub dr6: u64,
    /// DR7.
    pub dr7: u64,
}

/// A vCPU, stopped between instructions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU index.
    pub id: u8,
    /// General-purpose registers.
    pub regs: StandardRegisters,
    /// Segment, control and descriptor-table registers.
    pub sregs: SpecialRegisters,
    /// The XSAVE area (x87, SSE, AVX… in the architectural layout).
    pub xsave: Vec<u8>,
    /// Extended control registers (XCR0…), as (index, value).
    pub xcrs: Vec<(u32, u64)>,
    /// Model-specific registers (TSC, kvmclock, SYSCALL, PAT…), as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC's register page (1 KiB).
    pub lapic: Vec<u8>,
    /// Multiprocessor state (running, halted, waiting for SIPI…), in the backend's numbering,
    /// which for KVM is also the one its API documents.
    pub mp_state: u32,
    /// Debug registers.
    pub debug: DebugRegisters,
    /// The CPU model the guest was given.
    pub cpuid: Vec<CpuidEntry>,
    /// Pending exceptions, interrupts and NMIs, in the writing backend's format.
    pub events: BackendBlob,
}

/// Backend-specific bytes and the backend that understands them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendBlob {
    /// `kvm`, `hvf`, `whp`.
    pub backend: String,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// The VM-wide state: interrupt controllers, timer, clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The interrupt controllers (PIC pair and IOAPIC on KVM), in the backend's format.
    pub irqchips: Vec<BackendBlob>,
    /// The programmable interval timer.
    pub pit: BackendBlob,
    /// The guest's monotonic clock (kvmclock) in nanoseconds when it was saved.
    pub clock_ns: u64,
}
