//! Fuzzes decoding a snapshot's state file, which a restore reads from disk (a bake directory
//! anyone could have copied or altered): the input is the payload, wrapped here in a valid
//! header and checksum so the fuzzer reaches the decoder, then decoded as the machine layer's
//! state. Errors are fine; any panic, hang or allocation past the format's bound is a bug. Run:
//! `cargo fuzz run snapshot_state` in this folder.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let mut file = snapshot::MAGIC.to_vec();
    file.extend_from_slice(&snapshot::FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    file.extend_from_slice(payload);
    let _ = snapshot::decode_state::<vmm::snapshot::MachineState>(
        &file,
        std::path::Path::new("fuzz/state"),
    );
});
