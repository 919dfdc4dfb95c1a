//! Fuzzes what a registry or an image file says about an image before any layer: manifests and
//! indexes (then picking a platform), image configurations, image references typed by users or
//! found in files, and the registry's `WWW-Authenticate` challenges. The first byte picks the
//! parser. Errors are fine; any panic or hang is a bug. Run: `cargo fuzz run oci_documents`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_bake::manifest::{self, ImageConfigFile, Parsed};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(Parsed::Index(entries)) = manifest::parse(rest) {
                let _ = manifest::select_platform(&entries, "linux", "amd64");
            }
        }
        1 => {
            if let Ok(config) = serde_json::from_slice::<ImageConfigFile>(rest) {
                let _ = oci_bake::config::RunConfig::from(&config);
            }
        }
        2 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(r) = text.parse::<oci_bake::ImageRef>() {
                    let _ = r.to_string();
                }
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                let _ = oci_bake::registry::parse_challenge(text);
            }
        }
    }
});
