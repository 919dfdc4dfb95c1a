//! A paravirtual port through which the guest's init reports its workload's exit status: a
//! write powers the guest off at once with that status, so the host process can return it.
//! It saves the guest the kernel's whole shutdown path; init syncs filesystems before writing.

use vmm_core::{BusDevice, VmControl};

/// The exit-status port (one to four bytes, little-endian).
pub struct ExitStatusPort {
    control: VmControl,
}

impl ExitStatusPort {
    /// A port that ends the VM through `control`.
    pub fn new(control: VmControl) -> Self {
        ExitStatusPort { control }
    }
}

impl BusDevice for ExitStatusPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() || data.len() > 4 {
            return;
        }
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        self.control
            .power_off_with_status(i32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_write_powers_off() {
        let c = VmControl::new();
        let mut p = ExitStatusPort::new(c.clone());
        p.write(1, &[3]);
        p.write(0, &[1, 2, 3, 4, 5]);
        assert!(!c.is_stopping());
        p.write(0, &3u32.to_le_bytes());
        assert!(c.is_stopping());
    }
}
