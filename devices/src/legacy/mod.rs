//! Legacy PC devices: the serial console and the two ways a guest ends itself.

mod exit_port;
mod i8042;
mod serial;

pub use exit_port::ExitStatusPort;
pub use i8042::I8042ResetLine;
pub use serial::{IrqLine, SerialConsole, SerialSnapshot};
