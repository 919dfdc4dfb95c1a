//! Writing an OCI image layout: for images assembled on the host (test images, the busybox image
//! the quick start runs, benchmark images). Layers are given as tar archives and stored gzipped.

use std::io::{Read, Write};
use std::path::Path;

use crate::digest::Digest;
use crate::manifest::ContainerConfig;

/// Writes `layers` (uncompressed tars, bottom first) with `config` as image `tag` of a new OCI
/// layout at `dir` (replacing an existing one), for this host's platform. Returns the manifest
/// digest.
pub fn write_layout(
    dir: &Path,
    tag: &str,
    layers: &[Vec<u8>],
    config: &ContainerConfig,
) -> std::io::Result<Digest> {
    write_layout_for(dir, tag, layers, config, crate::manifest::host_platform())
}

/// [`write_layout`] for `platform` (`os`, `architecture` in OCI's names: `("linux", "arm64")`).
pub fn write_layout_for(
    dir: &Path,
    tag: &str,
    layers: &[Vec<u8>],
    config: &ContainerConfig,
    platform: (&str, &str),
) -> std::io::Result<Digest> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    let put = |bytes: &[u8]| -> std::io::Result<(Digest, usize)> {
        let d = Digest::of(bytes);
        std::fs::write(dir.join("blobs/sha256").join(d.hex()), bytes)?;
        Ok((d, bytes.len()))
    };
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        diff_ids.push(Digest::of(tar).to_string());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar)?;
        let (d, size) = put(&gz.finish()?)?;
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d.to_string(), "size": size}));
    }
    let (os, arch) = platform;
    let config_doc = serde_json::json!({
        "architecture": arch, "os": os,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cd, cs) = put(&serde_json::to_vec(&config_doc)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::manifest::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": cs},
        "layers": descriptors,
    });
    let (md, ms) = put(&serde_json::to_vec(&manifest)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": crate::manifest::OCI_MANIFEST, "digest": md.to_string(), "size": ms,
        "platform": {"os": os, "architecture": arch},
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(md)
}

/// A one-layer image of Debian's `busybox-static`: `/bin/busybox` with every applet linked,
/// `/etc/passwd` and `/etc/group` (root and `user` 1000), `Cmd ["sh"]`.
pub fn busybox_layer(busybox: &Path) -> std::io::Result<Vec<u8>> {
    let list = std::process::Command::new(busybox)
        .arg("--list-full")
        .output()?;
    busybox_layer_with(busybox, &String::from_utf8_lossy(&list.stdout))
}

/// [`busybox_layer`] with the applet list given (`busybox --list-full`'s output), for a busybox
/// of another architecture that cannot run here.
pub fn busybox_layer_with(busybox: &Path, applets: &str) -> std::io::Result<Vec<u8>> {
    let mut binary = Vec::new();
    std::fs::File::open(busybox)?.read_to_end(&mut binary)?;
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str,
                   mode: u32,
                   kind: tar::EntryType,
                   data: &[u8],
                   link: Option<&str>|
     -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        match link {
            Some(target) => b.append_link(&mut h, path, target),
            None => b.append_data(&mut h, path, data),
        }
    };
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "root",
        "home",
        "home/user",
        "tmp",
        "var",
        "var/tmp",
    ] {
        let mode = if d.ends_with("tmp") { 0o1777 } else { 0o755 };
        add(d, mode, tar::EntryType::Directory, &[], None)?;
    }
    add("bin/busybox", 0o755, tar::EntryType::Regular, &binary, None)?;
    for applet in applets.lines().map(str::trim) {
        let applet = applet.trim_start_matches('/');
        if applet.is_empty() || applet == "bin/busybox" {
            continue;
        }
        add(
            applet,
            0o777,
            tar::EntryType::Symlink,
            &[],
            Some("/bin/busybox"),
        )?;
    }
    add("etc/passwd", 0o644, tar::EntryType::Regular,
        b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", None)?;
    add(
        "etc/group",
        0o644,
        tar::EntryType::Regular,
        b"root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n",
        None,
    )?;
    b.into_inner()
}

/// The configuration of the busybox image.
pub fn busybox_config() -> ContainerConfig {
    ContainerConfig {
        cmd: Some(vec!["sh".into()]),
        env: Some(vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ]),
        ..Default::default()
    }
}
