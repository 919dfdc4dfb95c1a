//! COM1: a 16550A UART from `vm-superio`, its output sent to a host writer and its input fed
//! by the host.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_core::{BusDevice, IrqTrigger};

/// Adapts a backend interrupt trigger to `vm-superio`.
pub struct IrqLine(pub Arc<dyn IrqTrigger>);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// A serial port's state in a snapshot: the nine 16550A registers (DLL, DLM, IER, IIR, LCR,
/// LSR, MCR, MSR, SCR) and the receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// The registers, in the order above.
    pub registers: [u8; 9],
    /// Bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// The guest's serial console.
pub struct SerialConsole {
    uart: Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// A UART that raises `irq` and writes what the guest transmits to `out`.
    pub fn new(irq: Arc<dyn IrqTrigger>, out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::new(IrqLine(irq), out),
        }
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save_state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A UART continuing from `state`.
    pub fn restore(
        irq: Arc<dyn IrqTrigger>,
        out: Box<dyn Write + Send>,
        state: &SerialSnapshot,
    ) -> Result<Self, String> {
        let r = state.registers;
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, IrqLine(irq), NoEvents, out)
            .map_err(|e| format!("serial port state: {e:?}"))?;
        Ok(SerialConsole { uart })
    }

    /// Queues host input for the guest to read; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let n = bytes.len().min(room);
        self.uart.enqueue_raw_bytes(&bytes[..n]).unwrap_or_default()
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // A failed host write (closed stdout) must not stop the guest.
            let _ = self.uart.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);
    impl IrqTrigger for CountingIrq {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    use crate::test_support::SharedBuffer as Shared;

    #[test]
    fn transmits_to_the_writer_and_receives_input() {
        let irq = Arc::new(CountingIrq::default());
        let out = Shared::default();
        let mut s = SerialConsole::new(irq.clone(), Box::new(out.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        // Enable the received-data interrupt, then feed input.
        s.write(1, &[0x1]);
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert!(irq.0.load(Ordering::SeqCst) > 0);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b, [b'o']);
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let out = Shared::default();
        let mut s = SerialConsole::new(Arc::new(CountingIrq::default()), Box::new(out.clone()));
        s.write(0, &[1, 2]);
        s.write(9, &[1]);
        let mut b = [9u8; 4];
        s.read(0, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(out.0.lock().unwrap().is_empty());
    }
}
