//! Fuzzes the host's decoding of what a guest agent sends (the agent runs in the guest: its
//! frames are as hostile as the guest): a stream of length-prefixed frames read until the end
//! or the first error. Errors are fine; any panic, hang or unbounded allocation is a bug. Run:
//! `cargo fuzz run agent_frames` in this folder.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    for _ in 0..1000 {
        match agent_protocol::read_frame(&mut stream) {
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break,
        }
    }
});
