//! A small multi-layer test image, built as an OCI image layout: whiteouts, an opaque
//! directory, symlinks, a hard link, a device node, setuid and non-root owners. Shared by the
//! image tests and the guest tests (included with `#[path]`).

use std::io::Write;
use std::path::Path;

fn sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32, u32),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Char(&'a str, u32, u32),
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        match e {
            E::Dir(p, m) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*m);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::File(p, d, id, m) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*m);
                h.set_uid(u64::from(*id));
                h.set_gid(u64::from(*id));
                h.set_size(d.len() as u64);
                b.append_data(&mut h, p, *d).unwrap();
            }
            E::Sym(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Hard(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Char(p, maj, min) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_device_major(*maj).unwrap();
                h.set_device_minor(*min).unwrap();
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
        }
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

fn put(dir: &Path, bytes: &[u8]) -> (String, usize) {
    let h = sha(bytes);
    std::fs::write(dir.join("blobs/sha256").join(&h), bytes).unwrap();
    (format!("sha256:{h}"), bytes.len())
}

/// Three layers exercising whiteouts, opaque directories, links, devices, modes and owners.
pub fn build_layout(dir: &Path, tag: &str) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let layers = [
        layer(&[
            E::Dir("etc", 0o755),
            E::File("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0, 0o644),
            E::File("etc/gone", b"to be whited out", 0, 0o644),
            E::Dir("opt/app", 0o750),
            E::File("opt/app/old", b"old", 0, 0o644),
            E::File("opt/app/sub/deep", b"deep", 0, 0o644),
            E::File("bin/busybox", &big, 0, 0o4755),
            E::Sym("bin/sh", "busybox"),
            E::Hard("bin/ls", "bin/busybox"),
            E::Char("dev/null", 1, 3),
        ]),
        layer(&[
            E::File("etc/.wh.gone", b"", 0, 0o644),
            E::File("opt/app/.wh..wh..opq", b"", 0, 0o644),
            E::File("opt/app/new", b"new", 0, 0o644),
            E::File("home/user/notes", b"private", 1000, 0o600),
        ]),
        layer(&[E::File(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
            0,
            0o644,
        )]),
    ];
    let descs: Vec<_> = layers.iter().map(|l| put(dir, l)).collect();
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| {
            let mut d = flate2::read::GzDecoder::new(&l[..]);
            let mut raw = Vec::new();
            std::io::Read::read_to_end(&mut d, &mut raw).unwrap();
            format!("sha256:{}", sha(&raw))
        })
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "Env": ["PATH=/bin", "A=1"],
                   "WorkingDir": "/home/user", "User": "1000:1000", "ExposedPorts": {"80/tcp": {}},
                   "StopSignal": "SIGQUIT"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cd, cs) = put(dir, &serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs.iter().map(|(d, s)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})).collect::<Vec<_>>(),
    });
    let (md, ms) = put(dir, &serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}
