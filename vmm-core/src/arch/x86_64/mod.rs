//! x86-64: guest physical layout, boot protocols (PVH and the Linux 64-bit boot protocol),
//! the MP table that tells the guest its CPUs, and the neutral register state.

#[cfg(unix)]
pub mod boot;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod state;
