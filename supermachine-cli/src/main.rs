//! # supermachine-cli
//!
//! The `supermachine` command-line tool: Docker-style commands (`run`, `ps`, `exec`, `cp`,
//! `stop`, `bake`, `pull`, …) over the `supermachine` library.
//!
//! Owns: argument parsing (clap, plus a fast path for common `run` lines), messages and exit
//! codes, the log subscriber, terminal and signal handling of the foreground commands, and the
//! end-to-end tests in `tests/` (they drive this binary and the library against real guests).
//!
//! Does not own: any VM, image or network machinery; it calls only the library's public API
//! (and installs the library's system-call filter in the processes that run VMs).

mod cli;
mod inspect;
mod vm_commands;

fn main() -> std::process::ExitCode {
    cli::main()
}
