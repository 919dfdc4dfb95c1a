//! Where each architecture puts the machine's fixed devices and its virtio-mmio slots, and
//! what every guest's command line says. Each module offers the same names:
//! `DEFAULT_CMDLINE`, `SERIAL_IRQ`, `add_legacy_devices`, `virtio_slot` and `declare_virtio`.

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use self::aarch64::*;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::*;
