//! Getting an image's manifest, configuration and layers into the store, from any transport:
//! a registry, an OCI image layout (directory or tar), or a `docker save` archive. Every blob
//! is verified against its digest on the way in.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::layers::normalize;
use crate::manifest::{self, Descriptor, Manifest, ManifestOrIndex, Parsed};
use crate::reference::{ImageRef, RegistryRef};
use crate::registry::{Client, ClientOptions};
use crate::store::Store;
use crate::PullError;

/// Largest manifest, index or configuration we accept.
pub const MAX_DOCUMENT: u64 = 16 << 20;
/// Largest single layer blob we accept.
pub const MAX_LAYER: u64 = 64 << 30;

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Wanted platform: (os, architecture).
    pub platform: (String, String),
    /// Registry client settings.
    pub client: ClientOptions,
    /// Show progress bars (only when stderr is a terminal).
    pub progress: bool,
    /// Limits for layer application.
    pub limits: crate::layers::Limits,
}

impl Default for PullOptions {
    fn default() -> Self {
        let (os, arch) = manifest::host_platform();
        PullOptions {
            platform: (os.into(), arch.into()),
            client: ClientOptions::default(),
            progress: true,
            limits: Default::default(),
        }
    }
}

/// An image whose blobs are in the store.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The canonical name it is recorded under.
    pub name: String,
    /// Manifest digest.
    pub manifest: Digest,
    /// Configuration digest.
    pub config: Digest,
    /// Layers, bottom first, with their sizes.
    pub layers: Vec<(Digest, u64)>,
}

impl Fetched {
    fn from_manifest(name: String, manifest: Digest, m: &Manifest) -> Fetched {
        Fetched {
            name,
            manifest,
            config: m.config.digest.clone(),
            layers: m
                .layers
                .iter()
                .map(|l| (l.digest.clone(), l.size))
                .collect(),
        }
    }
}

/// The name an image is recorded under: normalised reference, or transport + absolute path.
pub fn canonical_name(image: &ImageRef) -> String {
    let abs = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    match image {
        ImageRef::Registry(r) => r.to_string(),
        ImageRef::OciLayout { path, tag } => ImageRef::OciLayout {
            path: abs(path),
            tag: tag.clone(),
        }
        .to_string(),
        ImageRef::OciArchive { path, tag } => ImageRef::OciArchive {
            path: abs(path),
            tag: tag.clone(),
        }
        .to_string(),
        ImageRef::DockerArchive { path, reference } => ImageRef::DockerArchive {
            path: abs(path),
            reference: reference.clone(),
        }
        .to_string(),
    }
}

/// Brings `image` into the store.
pub fn fetch(store: &Store, image: &ImageRef, opts: &PullOptions) -> Result<Fetched, PullError> {
    let name = canonical_name(image);
    match image {
        ImageRef::Registry(r) => from_registry(store, r, name, opts),
        ImageRef::OciLayout { path, tag } => from_layout(store, path, tag.as_deref(), name, opts),
        ImageRef::OciArchive { path, tag } => {
            let dir = store.temp_path("oci-archive");
            let result = unpack(path, &dir)
                .and_then(|_| from_layout(store, &dir, tag.as_deref(), name, opts));
            let _ = fs::remove_dir_all(&dir);
            result
        }
        ImageRef::DockerArchive { path, reference } => {
            let dir = store.temp_path("docker-archive");
            let result = unpack(path, &dir)
                .and_then(|_| from_docker_archive(store, &dir, reference.as_deref(), name));
            let _ = fs::remove_dir_all(&dir);
            result
        }
    }
}

fn source_err(path: &Path, detail: impl std::fmt::Display) -> PullError {
    PullError::Source {
        path: path.to_owned(),
        detail: detail.to_string(),
    }
}

fn progress_bar(show: bool, len: Option<u64>, label: String) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !show || !io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label);
    bar
}

fn resolve_manifest(
    mut doc: Vec<u8>,
    opts: &PullOptions,
    mut load: impl FnMut(&Descriptor) -> Result<Vec<u8>, PullError>,
) -> Result<(Vec<u8>, Manifest), PullError> {
    // Indexes may nest (an index pointing at per-platform indexes); stop after a few levels.
    for _ in 0..4 {
        match manifest::parse(&doc)? {
            Parsed::Manifest(m) => return Ok((doc, m)),
            Parsed::Index(entries) => {
                let d = manifest::select_platform(&entries, &opts.platform.0, &opts.platform.1)?;
                doc = load(d)?;
            }
        }
    }
    Err(PullError::Manifest(manifest::ManifestError::Malformed {
        what: "index",
        detail: "indexes nested too deeply".into(),
    }))
}

fn verify(expected: &Digest, bytes: &[u8]) -> Result<(), PullError> {
    let actual = Digest::of(bytes);
    if &actual != expected {
        return Err(PullError::Store(crate::store::StoreError::DigestMismatch {
            expected: expected.clone(),
            actual,
        }));
    }
    Ok(())
}

fn from_registry(
    store: &Store,
    r: &RegistryRef,
    name: String,
    opts: &PullOptions,
) -> Result<Fetched, PullError> {
    let (client, r, top) = first_endpoint(r, opts)?;
    let r = &r;
    if let Some(d) = &r.digest {
        verify(d, &top)?;
    }
    let (manifest_bytes, m) = resolve_manifest(top, opts, |d| {
        let body = client.manifest(r, &d.digest.to_string())?;
        verify(&d.digest, &body)?;
        Ok(body)
    })?;
    let manifest = store.put_bytes(&manifest_bytes)?;
    let fetch_blob = |d: &Descriptor, limit: u64, label: String| -> Result<(), PullError> {
        if store.has_blob(&d.digest) {
            return Ok(());
        }
        let resp = client.blob(r, &d.digest.to_string())?;
        let bar = progress_bar(opts.progress, Some(d.size), label);
        let reader = bar.wrap_read(resp.body);
        store.put_blob(&d.digest, Some(d.size), limit, reader)?;
        bar.finish_and_clear();
        Ok(())
    };
    fetch_blob(&m.config, MAX_DOCUMENT, "config".into())?;
    for l in &m.layers {
        fetch_blob(l, MAX_LAYER, l.digest.short().to_string())?;
    }
    Ok(Fetched::from_manifest(name, manifest, &m))
}

/// The first place that serves `r`'s manifest: its mirrors in registries.conf's order, then
/// its location; with a client for it (plain HTTP where the configuration says so).
fn first_endpoint(
    r: &RegistryRef,
    opts: &PullOptions,
) -> Result<(Client, RegistryRef, Vec<u8>), PullError> {
    let conf = match &opts.client.registries_conf {
        Some(c) => c.clone(),
        None => crate::registries_conf::RegistriesConf::load()?,
    };
    let endpoints = conf.endpoints(r).map_err(|prefix| PullError::Blocked {
        image: r.to_string(),
        prefix,
    })?;
    let last = endpoints.len().saturating_sub(1);
    let mut failure = None;
    for (i, endpoint) in endpoints.into_iter().enumerate() {
        let mut options = opts.client.clone();
        if endpoint.insecure {
            options
                .insecure_registries
                .push(endpoint.reference.registry.clone());
        }
        let client = Client::new(options);
        let place = endpoint.reference;
        match client.manifest(&place, &place.reference()) {
            Ok(top) => return Ok((client, place, top)),
            Err(e) if i < last => {
                tracing::warn!("{place}: {e}; trying the next place registries.conf names");
            }
            Err(e) => failure = Some(e),
        }
    }
    Err(failure.map_or_else(
        || PullError::Blocked {
            image: r.to_string(),
            prefix: "(no place to pull from)".into(),
        },
        PullError::from,
    ))
}

fn from_layout(
    store: &Store,
    dir: &Path,
    tag: Option<&str>,
    name: String,
    opts: &PullOptions,
) -> Result<Fetched, PullError> {
    let index_path = dir.join("index.json");
    let index_bytes = fs::read(&index_path).map_err(|e| source_err(&index_path, e))?;
    let index: ManifestOrIndex =
        serde_json::from_slice(&index_bytes).map_err(|e| source_err(&index_path, e))?;
    let entries = index.manifests.unwrap_or_default();
    const REF_NAME: &str = "org.opencontainers.image.ref.name";
    let chosen = match tag {
        Some(t) => entries
            .iter()
            .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(t))
            .ok_or_else(|| PullError::TagNotFound {
                tag: t.into(),
                source_name: dir.display().to_string(),
                available: entries
                    .iter()
                    .filter_map(|d| d.annotations.get(REF_NAME).cloned())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?,
        None if entries.len() == 1 => &entries[0],
        None => {
            return Err(source_err(
                &index_path,
                "the layout holds several images: name one with oci:PATH:TAG",
            ))
        }
    };
    let copy = |d: &Descriptor, limit: u64| -> Result<PathBuf, PullError> {
        let src = dir.join("blobs/sha256").join(d.digest.hex());
        let f = File::open(&src).map_err(|e| source_err(&src, e))?;
        Ok(store.put_blob(&d.digest, Some(d.size), limit, f)?)
    };
    let first = fs::read(copy(chosen, MAX_DOCUMENT)?).map_err(|e| source_err(dir, e))?;
    let (manifest_bytes, m) = resolve_manifest(first, opts, |d| {
        fs::read(copy(d, MAX_DOCUMENT)?).map_err(|e| source_err(dir, e))
    })?;
    let manifest = store.put_bytes(&manifest_bytes)?;
    copy(&m.config, MAX_DOCUMENT)?;
    for l in &m.layers {
        copy(l, MAX_LAYER)?;
    }
    Ok(Fetched::from_manifest(name, manifest, &m))
}

/// `docker save`'s `manifest.json` entries.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn from_docker_archive(
    store: &Store,
    dir: &Path,
    reference: Option<&str>,
    name: String,
) -> Result<Fetched, PullError> {
    let mpath = dir.join("manifest.json");
    let bytes = fs::read(&mpath).map_err(|e| source_err(&mpath, e))?;
    let entries: Vec<DockerArchiveEntry> =
        serde_json::from_slice(&bytes).map_err(|e| source_err(&mpath, e))?;
    let normalized = |t: &str| {
        t.parse::<RegistryRef>()
            .map(|r| r.to_string())
            .unwrap_or_default()
    };
    let entry = match reference {
        Some(want) => entries
            .iter()
            .find(|e| {
                e.repo_tags
                    .iter()
                    .flatten()
                    .any(|t| t == want || normalized(t) == normalized(want))
            })
            .ok_or_else(|| PullError::TagNotFound {
                tag: want.into(),
                source_name: dir.display().to_string(),
                available: entries
                    .iter()
                    .flat_map(|e| e.repo_tags.iter().flatten().cloned())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?,
        None => entries
            .first()
            .ok_or_else(|| source_err(&mpath, "no images in the archive"))?,
    };
    let inside = |p: &str| -> Result<PathBuf, PullError> {
        let rel = normalize(p)
            .ok_or_else(|| source_err(&mpath, format!("path {p:?} escapes the archive")))?;
        Ok(dir.join(rel))
    };
    let import = |p: &str, limit: u64| -> Result<(Digest, u64), PullError> {
        let path = inside(p)?;
        let f = File::open(&path).map_err(|e| source_err(&path, e))?;
        Ok(store.import(f, limit)?)
    };
    let (config, config_size) = import(&entry.config, MAX_DOCUMENT)?;
    let mut layers = Vec::new();
    for l in &entry.layers {
        layers.push(import(l, MAX_LAYER)?);
    }
    // A manifest for the record, as the image would have in a registry.
    let descriptor = |media: &str, d: &Digest, size: u64| serde_json::json!({"mediaType": media, "digest": d.to_string(), "size": size});
    let doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config, config_size),
        "layers": layers.iter().map(|(d, s)| descriptor("application/vnd.oci.image.layer.v1.tar", d, *s)).collect::<Vec<_>>(),
    });
    let manifest = store.put_bytes(&serde_json::to_vec(&doc).unwrap_or_default())?;
    Ok(Fetched {
        name,
        manifest,
        config,
        layers,
    })
}

/// Unpacks an archive's regular files and directories into `dest`, refusing paths that escape
/// it. Symbolic links inside the archive (old `docker save` layouts link duplicate layers) are
/// recreated only when they stay inside `dest`.
fn unpack(archive: &Path, dest: &Path) -> Result<(), PullError> {
    let f = File::open(archive).map_err(|e| source_err(archive, e))?;
    fs::create_dir_all(dest).map_err(|e| source_err(dest, e))?;
    let mut tar = tar::Archive::new(f);
    let entries = tar.entries().map_err(|e| source_err(archive, e))?;
    for entry in entries {
        let mut entry = entry
            .map_err(|e| source_err(archive, format!("malformed or truncated archive: {e}")))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = normalize(&raw)
            .ok_or_else(|| source_err(archive, format!("entry {raw:?} escapes the archive")))?;
        if rel.is_empty() {
            continue;
        }
        let target = dest.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&target).map_err(|e| source_err(&target, e))?
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(|e| source_err(parent, e))?;
                }
                let mut out = File::create(&target).map_err(|e| source_err(&target, e))?;
                io::copy(&mut entry, &mut out).map_err(|e| {
                    source_err(archive, format!("malformed or truncated archive: {e}"))
                })?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                let parent = Path::new(&rel).parent().unwrap_or(Path::new(""));
                let resolved = normalize(&parent.join(&link).to_string_lossy());
                if let (Some(resolved), false) = (resolved, link.starts_with('/')) {
                    if let Some(p) = target.parent() {
                        fs::create_dir_all(p).map_err(|e| source_err(p, e))?;
                    }
                    let _ = std::os::unix::fs::symlink(dest.join(resolved), &target);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_refuses_escaping_entries() {
        let root = std::env::temp_dir().join(format!("oci-unpack-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        let archive = root.join("evil.tar");
        fs::write(
            &archive,
            crate::layers::tests::raw_entry("../outside", b"x"),
        )
        .unwrap();
        let err = unpack(&archive, &root.join("out")).unwrap_err().to_string();
        assert!(err.contains("escapes"), "{err}");
        assert!(!root.join("outside").exists());
        fs::write(
            &archive,
            b"definitely not a tar archive, just some bytes that are long enough",
        )
        .unwrap();
        assert!(unpack(&archive, &root.join("out2")).is_err());
        fs::remove_dir_all(&root).ok();
    }
}
