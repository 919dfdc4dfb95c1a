//! Fuzzes OCI layer application, which reads tar streams from any registry or image file: the
//! input is a layer blob (plain, gzip or zstd, picked by its magic as on a pull) applied on top
//! of a small base layer with whiteouts, links, long names and absurd sizes all
//! attacker-chosen, under tight limits. Errors are fine; any panic, hang, memory error or a path
//! that escapes the tree is a bug. Run: `cargo fuzz run oci_layer` in this folder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_bake::layers::{decompress, Limits, Tree};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_bytes: 8 << 20,
        max_entries: 10_000,
    };
    let mut tree = Tree::new();
    let Ok(tar) = decompress(data) else {
        return;
    };
    if tree.apply_layer(0, tar, &limits).is_ok() {
        for path in tree.nodes.keys() {
            assert!(
                !path.split('/').any(|c| c == ".." || c == "."),
                "a path escaped normalisation: {path:?}"
            );
            assert!(!path.starts_with('/'), "an absolute path: {path:?}");
        }
    }
});
