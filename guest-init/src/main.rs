//! `guest-init`: PID 1 of a supermachine guest.
//!
//! Mounts the kernel filesystems, reads its [`InitConfig`] (from the initramfs, or the kernel
//! command line's arguments after `--`), runs the command with the console as its terminal,
//! reaps every orphan, and when the command exits syncs and powers the guest off with the
//! command's exit status (128 + signal if it was killed, 127/126 if it could not be started).

#[cfg(target_os = "linux")]
mod agent;
#[cfg(target_os = "linux")]
mod catch_up;
#[cfg(target_os = "linux")]
mod container;
#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
mod net;
#[cfg(target_os = "linux")]
mod process;
#[cfg(target_os = "linux")]
mod reaper;

#[cfg(target_os = "linux")]
fn main() {
    linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("guest-init runs only inside a Linux guest");
    std::process::exit(1);
}
