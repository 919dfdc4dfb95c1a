//! The `supermachine` command-line tool.

mod cli;
mod vm_commands;

fn main() -> std::process::ExitCode {
    cli::main()
}
