//! Everything needed to resume an arm64 vCPU and its VM: plain serde data a snapshot stores.
//! Registers travel by their architectural ID (the KVM one-reg encoding, which names core
//! registers, system registers by op0/op1/CRn/CRm/op2, and the timer), so any backend can map
//! them; the GIC travels as its architectural register values.

use serde::{Deserialize, Serialize};

/// One register by ID with its value (up to 128 bits: the SIMD registers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneReg {
    /// The register's ID in the one-reg encoding (size and class bits included).
    pub id: u64,
    /// Its value, zero-extended.
    pub value: u128,
}

/// A vCPU, stopped between instructions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU index.
    pub id: u8,
    /// Core, SIMD, system and timer registers.
    pub regs: Vec<OneReg>,
    /// PSCI power state: 0 running, 1 stopped (`KVM_MP_STATE_RUNNABLE`/`_STOPPED`).
    pub mp_state: u32,
}

/// The GICv3, as its registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicState {
    /// Distributor registers, as (offset, value).
    pub distributor: Vec<(u32, u32)>,
    /// Each vCPU's redistributor registers, as (offset, value).
    pub redistributors: Vec<Vec<(u32, u32)>>,
    /// Each vCPU's CPU-interface system registers (ICC_*), as (the `op0:op1:CRn:CRm:op2`
    /// encoding of [`gic::SysReg::instr`](super::gic::SysReg::instr), value).
    pub cpu_interfaces: Vec<Vec<(u16, u64)>>,
    /// The input levels of the SPIs, as (first interrupt ID of a group of 32, bitmap).
    pub line_levels: Vec<(u32, u32)>,
}

/// The VM-wide state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The interrupt controller.
    pub gic: GicState,
}
