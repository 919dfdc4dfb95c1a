//! PSCI (Arm's Power State Coordination Interface, DEN0022) for a backend whose hypervisor
//! leaves it to the VMM: the guest's `HVC #0` calls decoded, and each vCPU's power state kept, so
//! `CPU_ON` starts a secondary vCPU where the guest asks and `SYSTEM_OFF` ends the VM. KVM does
//! this in the kernel; Hypervisor.framework traps the `HVC` to us. Pure logic, unit-tested on
//! every host.

/// PSCI and SMCCC function IDs (the 32-bit calling convention's, and the 64-bit one's where the
/// call takes addresses).
mod fid {
    pub const SMCCC_VERSION: u32 = 0x8000_0000;
    pub const PSCI_VERSION: u32 = 0x8400_0000;
    pub const CPU_SUSPEND: u32 = 0x8400_0001;
    pub const CPU_OFF: u32 = 0x8400_0002;
    pub const CPU_ON: u32 = 0x8400_0003;
    pub const AFFINITY_INFO: u32 = 0x8400_0004;
    pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    pub const PSCI_FEATURES: u32 = 0x8400_000a;
    /// The SMC64 form of a function: bit 30.
    pub const SMC64: u32 = 0x4000_0000;
}

/// PSCI return codes.
pub mod ret {
    /// Done.
    pub const SUCCESS: i64 = 0;
    /// The function is not implemented.
    pub const NOT_SUPPORTED: i64 = -1;
    /// A parameter is wrong (e.g. no such CPU).
    pub const INVALID_PARAMETERS: i64 = -2;
    /// `CPU_ON` of a CPU that is on.
    pub const ALREADY_ON: i64 = -4;
}

/// The version reported: PSCI 1.0.
pub const VERSION: i64 = 0x0001_0000;

/// A PSCI call, from the guest's `x0`–`x3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `PSCI_VERSION`.
    Version,
    /// `SMCCC_VERSION` (Linux asks before using SMCCC features).
    SmcccVersion,
    /// `CPU_SUSPEND`: treated as a wait for an interrupt.
    CpuSuspend,
    /// `CPU_OFF` of the calling CPU.
    CpuOff,
    /// `CPU_ON`: start `target` (an MPIDR) at `entry` with `context` in its `x0`.
    CpuOn {
        /// The CPU's affinity (MPIDR).
        target: u64,
        /// Where it starts (a physical address, MMU off).
        entry: u64,
        /// Its `x0`.
        context: u64,
    },
    /// `AFFINITY_INFO` of `target` at affinity level 0.
    AffinityInfo {
        /// The CPU's affinity (MPIDR).
        target: u64,
    },
    /// `MIGRATE_INFO_TYPE`.
    MigrateInfoType,
    /// `SYSTEM_OFF`.
    SystemOff,
    /// `SYSTEM_RESET`.
    SystemReset,
    /// `PSCI_FEATURES` of a function.
    Features(u32),
    /// Anything else.
    Unknown(u32),
}

/// Decodes a call from the guest's `x0`..`x3`.
pub fn decode(x: [u64; 4]) -> Call {
    let id = x[0] as u32;
    // The SMC64 forms of CPU_ON, AFFINITY_INFO and CPU_SUSPEND take 64-bit arguments; the
    // SMC32 forms the low halves.
    let wide = id & fid::SMC64 != 0;
    let arg = |v: u64| if wide { v } else { v & 0xffff_ffff };
    match id & !fid::SMC64 {
        fid::PSCI_VERSION if !wide => Call::Version,
        fid::SMCCC_VERSION if !wide => Call::SmcccVersion,
        fid::CPU_SUSPEND => Call::CpuSuspend,
        fid::CPU_OFF if !wide => Call::CpuOff,
        fid::CPU_ON => Call::CpuOn {
            target: arg(x[1]),
            entry: arg(x[2]),
            context: arg(x[3]),
        },
        fid::AFFINITY_INFO => Call::AffinityInfo { target: arg(x[1]) },
        fid::MIGRATE_INFO_TYPE if !wide => Call::MigrateInfoType,
        fid::SYSTEM_OFF if !wide => Call::SystemOff,
        fid::SYSTEM_RESET if !wide => Call::SystemReset,
        fid::PSCI_FEATURES if !wide => Call::Features(x[1] as u32),
        _ => Call::Unknown(id),
    }
}

/// The MPIDR affinity vCPU `index` has (as KVM assigns it: Aff0 the low 4 bits, Aff1 the rest;
/// bit 31 is RES1).
pub fn mpidr_of(index: u8) -> u64 {
    (1 << 31) | u64::from(index & 0xf) | (u64::from(index >> 4) << 8)
}

/// The vCPU index of an MPIDR affinity, if it names one of `count` vCPUs.
pub fn index_of(mpidr: u64, count: u8) -> Option<u8> {
    let aff0 = mpidr & 0xff;
    let aff1 = (mpidr >> 8) & 0xff;
    let upper = (mpidr >> 16) & 0xff | ((mpidr >> 32) & 0xff) << 8;
    if aff0 > 0xf || upper != 0 {
        return None;
    }
    let index = aff1 * 16 + aff0;
    (index < u64::from(count)).then_some(index as u8)
}

/// What the VMM does for a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Put this value in the caller's `x0` and go on.
    Return(i64),
    /// The caller powers off: it waits until a `CPU_ON` names it.
    PowerOffCaller,
    /// Start vCPU `index` at `entry` with `context` in its `x0`; the caller gets `SUCCESS`.
    Start {
        /// The vCPU to start.
        index: u8,
        /// Its entry point.
        entry: u64,
        /// Its `x0`.
        context: u64,
    },
    /// End the VM (powered off).
    SystemOff,
    /// End the VM (reset asked).
    SystemReset,
    /// Wait for an interrupt, then return `SUCCESS`.
    Suspend,
}

/// Each vCPU's power state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerStates {
    on: Vec<bool>,
}

impl PowerStates {
    /// `count` vCPUs, vCPU 0 on.
    pub fn new(count: u8) -> PowerStates {
        PowerStates {
            on: (0..count).map(|i| i == 0).collect(),
        }
    }

    /// Whether vCPU `index` is on.
    pub fn is_on(&self, index: u8) -> bool {
        self.on.get(usize::from(index)).copied().unwrap_or(false)
    }

    /// Sets vCPU `index`'s state (a restore).
    pub fn set(&mut self, index: u8, on: bool) {
        if let Some(slot) = self.on.get_mut(usize::from(index)) {
            *slot = on;
        }
    }

    /// Handles `call` from vCPU `caller`, updating the power states.
    pub fn handle(&mut self, caller: u8, call: Call) -> Outcome {
        let count = self.on.len() as u8;
        match call {
            Call::Version => Outcome::Return(VERSION),
            // SMCCC 1.1.
            Call::SmcccVersion => Outcome::Return(0x1_0001),
            Call::CpuSuspend => Outcome::Suspend,
            Call::CpuOff => {
                self.set(caller, false);
                Outcome::PowerOffCaller
            }
            Call::CpuOn {
                target,
                entry,
                context,
            } => match index_of(target, count) {
                None => Outcome::Return(ret::INVALID_PARAMETERS),
                Some(index) if self.is_on(index) => Outcome::Return(ret::ALREADY_ON),
                Some(index) => {
                    self.set(index, true);
                    Outcome::Start {
                        index,
                        entry,
                        context,
                    }
                }
            },
            Call::AffinityInfo { target } => match index_of(target, count) {
                None => Outcome::Return(ret::INVALID_PARAMETERS),
                // 0: on, 1: off.
                Some(index) => Outcome::Return(if self.is_on(index) { 0 } else { 1 }),
            },
            // 2: no Trusted OS that would need migrating.
            Call::MigrateInfoType => Outcome::Return(2),
            Call::SystemOff => Outcome::SystemOff,
            Call::SystemReset => Outcome::SystemReset,
            Call::Features(id) => Outcome::Return(match decode([u64::from(id), 0, 0, 0]) {
                Call::Unknown(_) => ret::NOT_SUPPORTED,
                _ => ret::SUCCESS,
            }),
            Call::Unknown(_) => Outcome::Return(ret::NOT_SUPPORTED),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_brings_up_a_secondary_and_powers_off() {
        let mut p = PowerStates::new(2);
        let call = |x0: u64, x1: u64, x2: u64, x3: u64| decode([x0, x1, x2, x3]);
        assert_eq!(
            p.handle(0, call(0x8400_0000, 0, 0, 0)),
            Outcome::Return(VERSION)
        );
        // CPU_ON (SMC64) of vCPU 1 at 0x8020_0000.
        let on = call(0xc400_0003, mpidr_of(1), 0x8020_0000, 0x77);
        assert_eq!(
            p.handle(0, on),
            Outcome::Start {
                index: 1,
                entry: 0x8020_0000,
                context: 0x77
            }
        );
        assert_eq!(p.handle(0, on), Outcome::Return(ret::ALREADY_ON));
        assert_eq!(
            p.handle(0, call(0xc400_0004, mpidr_of(1), 0, 0)),
            Outcome::Return(0)
        );
        assert_eq!(
            p.handle(1, call(0x8400_0002, 0, 0, 0)),
            Outcome::PowerOffCaller
        );
        assert_eq!(
            p.handle(0, call(0xc400_0004, mpidr_of(1), 0, 0)),
            Outcome::Return(1)
        );
        assert_eq!(p.handle(0, call(0x8400_0008, 0, 0, 0)), Outcome::SystemOff);
        assert_eq!(
            p.handle(0, call(0x8400_0009, 0, 0, 0)),
            Outcome::SystemReset
        );
    }

    #[test]
    fn bad_targets_and_unknown_calls_get_psci_errors() {
        let mut p = PowerStates::new(2);
        // vCPU 2 does not exist; neither does an affinity with Aff2 set.
        for target in [mpidr_of(2), mpidr_of(1) | (1 << 16)] {
            assert_eq!(
                p.handle(0, decode([0xc400_0003, target, 0, 0])),
                Outcome::Return(ret::INVALID_PARAMETERS)
            );
        }
        assert_eq!(
            p.handle(0, decode([0x8400_00ff, 0, 0, 0])),
            Outcome::Return(ret::NOT_SUPPORTED)
        );
        assert_eq!(
            p.handle(0, decode([0x8400_000a, 0x8400_0008, 0, 0])),
            Outcome::Return(ret::SUCCESS)
        );
        assert_eq!(
            p.handle(0, decode([0x8400_000a, 0x8400_00ff, 0, 0])),
            Outcome::Return(ret::NOT_SUPPORTED)
        );
        // The SMC32 form of CPU_ON takes 32-bit arguments.
        assert_eq!(
            decode([0x8400_0003, (7 << 32) | 1, 0x1_8000_0000, 0]),
            Call::CpuOn {
                target: 1,
                entry: 0x8000_0000,
                context: 0
            }
        );
    }

    #[test]
    fn affinities_and_indices_round_trip() {
        for i in [0u8, 1, 15, 16, 17, 63] {
            assert_eq!(index_of(mpidr_of(i), 64), Some(i));
        }
        assert_eq!(mpidr_of(17) & 0xffff, 0x0101);
        assert_eq!(index_of(mpidr_of(3), 3), None);
    }
}
