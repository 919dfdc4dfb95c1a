//! Image references in the containers-transports forms, normalised the way Docker does.
//!
//! - `alpine`, `docker://alpine` → `docker.io/library/alpine:latest`
//! - `REGISTRY[:PORT]/REPO[:TAG][@DIGEST]` (a first component with `.` or `:`, or `localhost`,
//!   is a registry)
//! - `oci:PATH[:TAG]`, `oci-archive:PATH[:TAG]` (OCI image layout, as a directory or a tar)
//! - `docker-archive:PATH[:REF]` (what `docker save` writes)

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::digest::Digest;

/// The registry Docker uses for references without one.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's API actually lives.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A reference to an image in a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RegistryRef {
    /// `docker.io`, `quay.io`, `127.0.0.1:5000`, …
    pub registry: String,
    /// `library/alpine`, `org/app`, …
    pub repository: String,
    /// The tag (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// A pinned manifest digest.
    pub digest: Option<Digest>,
}

impl RegistryRef {
    /// What the registry API is asked for: the digest if pinned, else the tag.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// The host the API is reached at.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageRef {
    /// A registry (`docker://` or a bare reference).
    Registry(RegistryRef),
    /// An OCI image layout directory; the tag selects `org.opencontainers.image.ref.name`.
    OciLayout {
        /// The directory.
        path: PathBuf,
        /// The tag, if more than one image is in the layout.
        tag: Option<String>,
    },
    /// A tar of an OCI image layout.
    OciArchive {
        /// The archive.
        path: PathBuf,
        /// The tag.
        tag: Option<String>,
    },
    /// A `docker save` archive.
    DockerArchive {
        /// The archive.
        path: PathBuf,
        /// Which of its `RepoTags` (the first image when absent).
        reference: Option<String>,
    },
}

/// A reference that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct InvalidReference {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(input: &str, reason: &str) -> InvalidReference {
    InvalidReference {
        input: input.into(),
        reason: reason.into(),
    }
}

fn valid_component(c: &str) -> bool {
    // Lowercase alphanumerics separated by `.`, `_`, `__` or `-`s (distribution's grammar,
    // simplified: we only refuse what a registry would refuse anyway).
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && c.as_bytes()[0].is_ascii_alphanumeric()
        && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && (t.as_bytes()[0].is_ascii_alphanumeric() || t.as_bytes()[0] == b'_')
}

impl FromStr for RegistryRef {
    type Err = InvalidReference;

    fn from_str(input: &str) -> Result<Self, InvalidReference> {
        let s = input.strip_prefix("docker://").unwrap_or(input);
        let s = s.strip_prefix("//").unwrap_or(s);
        if s.is_empty() {
            return Err(invalid(input, "empty"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(
                    d.parse::<Digest>()
                        .map_err(|e| invalid(input, &e.to_string()))?,
                ),
            ),
            None => (s, None),
        };
        // A tag is after the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(invalid(input, "invalid tag"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if let Some((host, port)) = registry.split_once(':') {
            if host.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(input, "invalid registry (host[:port])"));
            }
        }
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if !repository.split('/').all(valid_component) {
            return Err(invalid(
                input,
                "invalid repository name (lowercase letters, digits, . _ -)",
            ));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(RegistryRef {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

/// Splits `PATH[:SUFFIX]` where the suffix is whatever follows the last ':' (paths with ':' in
/// them need a suffix, as in containers-transports).
fn path_and_suffix(s: &str) -> (PathBuf, Option<String>) {
    match s.rsplit_once(':') {
        Some((p, suffix)) if !p.is_empty() && !suffix.contains('/') => (
            PathBuf::from(p),
            Some(suffix.to_string()).filter(|s| !s.is_empty()),
        ),
        _ => (PathBuf::from(s), None),
    }
}

impl FromStr for ImageRef {
    type Err = InvalidReference;

    fn from_str(input: &str) -> Result<Self, InvalidReference> {
        if let Some(rest) = input.strip_prefix("oci:") {
            let (path, tag) = path_and_suffix(rest);
            return Ok(ImageRef::OciLayout { path, tag });
        }
        if let Some(rest) = input.strip_prefix("oci-archive:") {
            let (path, tag) = path_and_suffix(rest);
            return Ok(ImageRef::OciArchive { path, tag });
        }
        if let Some(rest) = input.strip_prefix("docker-archive:") {
            // The reference itself may contain ':' (name:tag): split at the first ':' that
            // follows the archive's file name.
            let (path, reference) = match rest.find(".tar:") {
                Some(i) => (
                    PathBuf::from(&rest[..i + 4]),
                    Some(rest[i + 5..].to_string()),
                ),
                None => {
                    let (p, r) = path_and_suffix(rest);
                    (p, r)
                }
            };
            return Ok(ImageRef::DockerArchive { path, reference });
        }
        if let Some((transport, _)) = input.split_once(':') {
            if matches!(
                transport,
                "dir" | "containers-storage" | "docker-daemon" | "ostree" | "sif"
            ) {
                return Err(invalid(
                    input,
                    &format!("the {transport}: transport is not supported"),
                ));
            }
        }
        Ok(ImageRef::Registry(input.parse()?))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let suffix = |t: &Option<String>| t.as_ref().map(|t| format!(":{t}")).unwrap_or_default();
        match self {
            ImageRef::Registry(r) => write!(f, "{r}"),
            ImageRef::OciLayout { path, tag } => write!(f, "oci:{}{}", path.display(), suffix(tag)),
            ImageRef::OciArchive { path, tag } => {
                write!(f, "oci-archive:{}{}", path.display(), suffix(tag))
            }
            ImageRef::DockerArchive { path, reference } => {
                write!(f, "docker-archive:{}{}", path.display(), suffix(reference))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> String {
        match s.parse::<ImageRef>().unwrap() {
            ImageRef::Registry(r) => r.to_string(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn normalises_like_docker() {
        assert_eq!(reg("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(reg("docker://alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(reg("org/app"), "docker.io/org/app:latest");
        assert_eq!(
            reg("index.docker.io/library/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(reg("quay.io/org/app:v1"), "quay.io/org/app:v1");
        assert_eq!(
            reg("127.0.0.1:5000/test/img:t1"),
            "127.0.0.1:5000/test/img:t1"
        );
        assert_eq!(reg("localhost/img"), "localhost/img:latest");
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            reg(&format!("alpine@{d}")),
            format!("docker.io/library/alpine@{d}")
        );
        assert_eq!(
            reg(&format!("alpine:3@{d}")),
            format!("docker.io/library/alpine:3@{d}")
        );
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Alpine",
            "alpine:",
            "alpine@sha256:123",
            "a//b",
            "alpine:bad/tag",
            "dir:/x",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_transports() {
        assert_eq!(
            "oci:/tmp/layout:v1".parse::<ImageRef>().unwrap(),
            ImageRef::OciLayout {
                path: "/tmp/layout".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            "oci:/tmp/layout".parse::<ImageRef>().unwrap(),
            ImageRef::OciLayout {
                path: "/tmp/layout".into(),
                tag: None
            }
        );
        assert_eq!(
            "oci-archive:img.tar".parse::<ImageRef>().unwrap(),
            ImageRef::OciArchive {
                path: "img.tar".into(),
                tag: None
            }
        );
        assert_eq!(
            "docker-archive:/x/img.tar:busybox:latest"
                .parse::<ImageRef>()
                .unwrap(),
            ImageRef::DockerArchive {
                path: "/x/img.tar".into(),
                reference: Some("busybox:latest".into())
            }
        );
    }
}
