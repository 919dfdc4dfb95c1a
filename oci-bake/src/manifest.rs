//! The JSON documents of OCI and Docker images: indexes, manifests, configurations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// What we accept from registries, most preferred first.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the content.
    #[serde(default)]
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// The platform, in indexes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (e.g. `org.opencontainers.image.ref.name`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image's platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `linux`, …
    pub os: String,
    /// `v8`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An index or a manifest, told apart by content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestOrIndex {
    /// Schema version (2).
    #[serde(default)]
    pub schema_version: u32,
    /// Media type, when the document says it.
    #[serde(default)]
    pub media_type: Option<String>,
    /// Index entries.
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    /// Manifest: the configuration blob.
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// Manifest: the layers, bottom first.
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

/// A manifest: config and layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The configuration blob.
    pub config: Descriptor,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
}

/// The parts of the image configuration we use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfigFile {
    /// Architecture.
    #[serde(default)]
    pub architecture: String,
    /// OS.
    #[serde(default)]
    pub os: String,
    /// The run configuration.
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    /// The layers' uncompressed digests.
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// The `rootfs` object of an image configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// `layers`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Each layer's uncompressed digest, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<crate::digest::Digest>,
}

/// The `config` object of an image configuration (Docker's field names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[serde(default)]
pub struct ContainerConfig {
    /// Entrypoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Environment, `NAME=value`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// User (`name`, `uid`, `uid:gid`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Exposed ports (`80/tcp` → `{}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    /// Stop signal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Docker's `HEALTHCHECK` (kept as given: a malformed one is ignored, not fatal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<serde_json::Value>,
}

/// Why a document is not a usable index or manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON, or not the expected shape.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which document.
        what: &'static str,
        /// The parse error.
        detail: String,
    },
    /// An index without an entry for our platform.
    #[error("no image for {os}/{architecture} in the index (it has: {available})")]
    NoPlatform {
        /// OS wanted.
        os: String,
        /// Architecture wanted.
        architecture: String,
        /// What the index offers.
        available: String,
    },
    /// A media type we do not handle (e.g. Docker schema 1).
    #[error("unsupported manifest type {0}")]
    Unsupported(String),
}

/// What a fetched document turned out to be.
pub enum Parsed {
    /// An index: pick a platform.
    Index(Vec<Descriptor>),
    /// A manifest.
    Manifest(Manifest),
}

/// Parses an index or manifest.
pub fn parse(bytes: &[u8]) -> Result<Parsed, ManifestError> {
    let doc: ManifestOrIndex =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed {
            what: "manifest",
            detail: e.to_string(),
        })?;
    if doc.schema_version == 1 {
        return Err(ManifestError::Unsupported("Docker schema 1".into()));
    }
    match (doc.manifests, doc.config, doc.layers) {
        (Some(m), _, _) => Ok(Parsed::Index(m)),
        (None, Some(config), Some(layers)) => Ok(Parsed::Manifest(Manifest { config, layers })),
        _ => Err(ManifestError::Malformed {
            what: "manifest",
            detail: "neither an index nor a manifest".into(),
        }),
    }
}

/// The platform this host runs guests for.
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

/// Picks the entry for `os/architecture` from an index.
pub fn select_platform<'a>(
    entries: &'a [Descriptor],
    os: &str,
    architecture: &str,
) -> Result<&'a Descriptor, ManifestError> {
    entries
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == architecture)
        })
        .or_else(|| {
            // Single-entry indexes without platform (e.g. some OCI layouts) are the image.
            (entries.len() == 1 && entries[0].platform.is_none()).then(|| &entries[0])
        })
        .ok_or_else(|| ManifestError::NoPlatform {
            os: os.into(),
            architecture: architecture.into(),
            available: entries
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn tells_index_from_manifest_and_picks_platform() {
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let Parsed::Index(entries) = parse(index.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(select_platform(&entries, "linux", "amd64").unwrap().size, 2);
        let err = select_platform(&entries, "linux", "s390x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("linux/arm64, linux/amd64"), "{err}");
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{D}","size":3}},"layers":[{{"digest":"{D}","size":4}}]}}"#
        );
        let Parsed::Manifest(m) = parse(manifest.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(m.layers.len(), 1);
        assert!(parse(b"{}").is_err());
        assert!(parse(b"not json").is_err());
        assert!(parse(br#"{"schemaVersion":1}"#).is_err());
    }

    #[test]
    fn reads_docker_style_config() {
        let c: ImageConfigFile = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/sh"],"Cmd":["-c","x"],
               "Env":["A=1"],"WorkingDir":"/w","User":"1000:1000","ExposedPorts":{"80/tcp":{}},
               "StopSignal":"SIGQUIT"},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        let cc = c.config.unwrap();
        assert_eq!(cc.entrypoint.unwrap(), ["/bin/sh"]);
        assert_eq!(cc.exposed_ports.unwrap().keys().next().unwrap(), "80/tcp");
        assert_eq!(cc.stop_signal.as_deref(), Some("SIGQUIT"));
    }
}
