//! The one i8042 function a microVM needs: the CPU reset line (command 0xfe on port 0x64), which
//! Linux uses for `reboot=k` and after a panic with `panic=-1`.

use vmm_core::{BusDevice, VmControl, VmExit};

const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 command/status port.
pub struct I8042ResetLine {
    control: VmControl,
}

impl I8042ResetLine {
    /// A reset line that ends the VM through `control`.
    pub fn new(control: VmControl) -> Self {
        I8042ResetLine { control }
    }
}

impl BusDevice for I8042ResetLine {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty, so drivers never wait on us.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&CMD_RESET_CPU) {
            self.control.request_exit(VmExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let c = VmControl::new();
        let mut d = I8042ResetLine::new(c.clone());
        d.write(0, &[0xd1]);
        assert!(!c.is_stopping());
        d.write(0, &[CMD_RESET_CPU]);
        assert!(c.is_stopping());
    }
}
