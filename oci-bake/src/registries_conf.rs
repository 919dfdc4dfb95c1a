//! `registries.conf` as the containers tools (podman, skopeo, buildah) read it: which
//! registries speak plain HTTP (`insecure`), which are refused (`blocked`), and which mirrors
//! are tried, in order, before a registry itself.
//!
//! Read from `$CONTAINERS_REGISTRIES_CONF`, else `~/.config/containers/registries.conf` when it
//! exists (it replaces the system file, as containers-registries.conf(5) says), else
//! `/etc/containers/registries.conf`. Version 2 (`[[registry]]` tables with `prefix`,
//! `location`, `insecure`, `blocked` and `[[registry.mirror]]`) and version 1's
//! `[registries.insecure]`/`[registries.block]` lists are understood. Not supported: prefixes
//! with a `*.` wildcard (ignored with a warning), drop-in directories, short-name aliases and
//! `unqualified-search-registries` (short names resolve to Docker Hub, as Docker does).

use std::path::{Path, PathBuf};

use crate::reference::RegistryRef;

/// A registries.conf that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct RegistriesConfError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub why: String,
}

/// One `[[registry]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEntry {
    /// The references it applies to (`host[/path]`; default: `location`).
    pub prefix: String,
    /// Where those references are pulled from (`host[:port][/path]`).
    pub location: String,
    /// Plain HTTP to `location`.
    pub insecure: bool,
    /// Pulls of these references are refused.
    pub blocked: bool,
    /// Tried in order before `location`.
    pub mirrors: Vec<Mirror>,
}

/// One `[[registry.mirror]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// `host[:port][/path]`.
    pub location: String,
    /// Plain HTTP to it.
    pub insecure: bool,
}

/// The parsed configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistriesConf {
    /// The `[[registry]]` tables, in file order.
    pub registries: Vec<RegistryEntry>,
}

/// Where a pull goes: the place to ask and whether to use plain HTTP there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The reference as asked of that place.
    pub reference: RegistryRef,
    /// Plain HTTP.
    pub insecure: bool,
}

fn bad(path: &Path, why: impl Into<String>) -> RegistriesConfError {
    RegistriesConfError {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn string(v: &toml::Value, key: &str, path: &Path) -> Result<Option<String>, RegistriesConfError> {
    match v.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.trim_end_matches('/').to_string())),
        Some(_) => Err(bad(path, format!("{key} must be a string"))),
    }
}

fn boolean(v: &toml::Value, key: &str, path: &Path) -> Result<bool, RegistriesConfError> {
    match v.get(key) {
        None => Ok(false),
        Some(toml::Value::Boolean(b)) => Ok(*b),
        Some(_) => Err(bad(path, format!("{key} must be true or false"))),
    }
}

fn string_list(
    v: Option<&toml::Value>,
    what: &str,
    path: &Path,
) -> Result<Vec<String>, RegistriesConfError> {
    match v {
        None => Ok(Vec::new()),
        Some(toml::Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(path, format!("{what} must list strings")))
            })
            .collect(),
        Some(_) => Err(bad(path, format!("{what} must be a list"))),
    }
}

impl RegistriesConf {
    /// The file the containers tools would read, if any.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("CONTAINERS_REGISTRIES_CONF") {
            return Some(PathBuf::from(p));
        }
        let user = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".config/containers/registries.conf"));
        user.filter(|p| p.exists())
            .or_else(|| Some(PathBuf::from("/etc/containers/registries.conf")))
            .filter(|p| p.exists())
    }

    /// Reads [`default_path`](Self::default_path); nothing configured without a file.
    pub fn load() -> Result<RegistriesConf, RegistriesConfError> {
        match Self::default_path() {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| bad(&path, e.to_string()))?;
                Self::parse(&text, &path)
            }
            None => Ok(RegistriesConf::default()),
        }
    }

    /// Parses a file's `text` (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<RegistriesConf, RegistriesConfError> {
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| bad(path, e.message().to_string()))?;
        let mut conf = RegistriesConf::default();
        // Version 1: [registries.insecure] registries = [...], [registries.block] likewise.
        if let Some(v1) = doc.get("registries").and_then(|r| r.as_table()) {
            for (kind, insecure, blocked) in [("insecure", true, false), ("block", false, true)] {
                let hosts = string_list(
                    v1.get(kind).and_then(|t| t.get("registries")),
                    &format!("registries.{kind}.registries"),
                    path,
                )?;
                for host in hosts {
                    conf.registries.push(RegistryEntry {
                        prefix: host.clone(),
                        location: host,
                        insecure,
                        blocked,
                        mirrors: Vec::new(),
                    });
                }
            }
        }
        let tables = match doc.get("registry") {
            None => Vec::new(),
            Some(toml::Value::Array(t)) => t.clone(),
            Some(_) => {
                return Err(bad(
                    path,
                    "registry must be a list of tables ([[registry]])",
                ))
            }
        };
        for t in &tables {
            let location = string(t, "location", path)?.unwrap_or_default();
            let prefix = string(t, "prefix", path)?.unwrap_or_else(|| location.clone());
            if prefix.is_empty() {
                return Err(bad(path, "a [[registry]] has neither location nor prefix"));
            }
            if prefix.starts_with("*.") {
                tracing::warn!(
                    "{}: wildcard prefix {prefix:?} is not supported; ignored",
                    path.display()
                );
                continue;
            }
            let mirrors = match t.get("mirror") {
                None => Vec::new(),
                Some(toml::Value::Array(ms)) => ms
                    .iter()
                    .map(|m| {
                        Ok(Mirror {
                            location: string(m, "location", path)?
                                .ok_or_else(|| bad(path, "a mirror has no location"))?,
                            insecure: boolean(m, "insecure", path)?,
                        })
                    })
                    .collect::<Result<_, RegistriesConfError>>()?,
                Some(_) => {
                    return Err(bad(
                        path,
                        "mirror must be a list of tables ([[registry.mirror]])",
                    ))
                }
            };
            conf.registries.push(RegistryEntry {
                location: if location.is_empty() {
                    prefix.clone()
                } else {
                    location
                },
                prefix,
                insecure: boolean(t, "insecure", path)?,
                blocked: boolean(t, "blocked", path)?,
                mirrors,
            });
        }
        Ok(conf)
    }

    /// The table for `r`: the longest prefix that matches `registry/repository` whole
    /// (path components, not characters).
    pub fn entry_for(&self, r: &RegistryRef) -> Option<&RegistryEntry> {
        let full = format!("{}/{}", r.registry, r.repository);
        self.registries
            .iter()
            .filter(|e| full == e.prefix || full.starts_with(&format!("{}/", e.prefix)))
            .max_by_key(|e| e.prefix.len())
    }

    /// Where to pull `r` from, in order: its mirrors, then its location (or `r` itself). `Err`
    /// with the prefix when the configuration blocks it.
    pub fn endpoints(&self, r: &RegistryRef) -> Result<Vec<Endpoint>, String> {
        let Some(entry) = self.entry_for(r) else {
            return Ok(vec![Endpoint {
                reference: r.clone(),
                insecure: false,
            }]);
        };
        if entry.blocked {
            return Err(entry.prefix.clone());
        }
        let full = format!("{}/{}", r.registry, r.repository);
        let rest = &full[entry.prefix.len()..];
        let at = |location: &str, insecure: bool| {
            let moved = format!("{location}{rest}");
            let (registry, repository) = moved.split_once('/')?;
            Some(Endpoint {
                reference: RegistryRef {
                    registry: registry.to_string(),
                    repository: repository.to_string(),
                    tag: r.tag.clone(),
                    digest: r.digest.clone(),
                },
                insecure,
            })
        };
        Ok(entry
            .mirrors
            .iter()
            .filter_map(|m| at(&m.location, m.insecure))
            .chain(at(&entry.location, entry.insecure))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> RegistriesConf {
        RegistriesConf::parse(text, Path::new("test.conf")).unwrap()
    }

    fn r(s: &str) -> RegistryRef {
        s.parse().unwrap()
    }

    fn places(c: &RegistriesConf, s: &str) -> Vec<(String, bool)> {
        c.endpoints(&r(s))
            .unwrap()
            .into_iter()
            .map(|e| (e.reference.to_string(), e.insecure))
            .collect()
    }

    #[test]
    fn mirrors_come_first_then_the_location() {
        let c = conf(
            r#"
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "docker.io"
location = "docker.io"

[[registry.mirror]]
location = "127.0.0.1:5000/hub"
insecure = true

[[registry.mirror]]
location = "mirror.example.com"

[[registry]]
location = "registry.internal:5000"
insecure = true

[[registry]]
prefix = "quay.io/evil"
blocked = true
"#,
        );
        assert_eq!(
            places(&c, "alpine:3.20"),
            vec![
                ("127.0.0.1:5000/hub/library/alpine:3.20".into(), true),
                ("mirror.example.com/library/alpine:3.20".into(), false),
                ("docker.io/library/alpine:3.20".into(), false),
            ]
        );
        assert_eq!(
            places(&c, "registry.internal:5000/team/app"),
            vec![("registry.internal:5000/team/app:latest".into(), true)]
        );
        // Unconfigured: as asked, HTTPS.
        assert_eq!(
            places(&c, "ghcr.io/org/app:1"),
            vec![("ghcr.io/org/app:1".into(), false)]
        );
        assert_eq!(
            c.endpoints(&r("quay.io/evil/tool")),
            Err("quay.io/evil".into())
        );
        // A prefix matches whole path components only.
        assert_eq!(
            places(&c, "quay.io/evilcorp/tool"),
            vec![("quay.io/evilcorp/tool:latest".into(), false)]
        );
    }

    #[test]
    fn a_longer_prefix_wins_and_relocates_the_repository() {
        let c = conf(
            r#"
[[registry]]
prefix = "example.com"
location = "example.com"
insecure = true

[[registry]]
prefix = "example.com/team"
location = "localhost:5000/copies/team"
"#,
        );
        assert_eq!(
            places(&c, "example.com/team/app:v2"),
            vec![("localhost:5000/copies/team/app:v2".into(), false)]
        );
        assert_eq!(
            places(&c, "example.com/other/app"),
            vec![("example.com/other/app:latest".into(), true)]
        );
    }

    #[test]
    fn version_one_lists_are_read() {
        let c = conf(
            r#"
[registries.search]
registries = ["docker.io"]
[registries.insecure]
registries = ["10.0.0.5:5000"]
[registries.block]
registries = ["blocked.example"]
"#,
        );
        assert_eq!(
            places(&c, "10.0.0.5:5000/x/y"),
            vec![("10.0.0.5:5000/x/y:latest".into(), true)]
        );
        assert!(c.endpoints(&r("blocked.example/a/b")).is_err());
    }

    #[test]
    fn malformed_files_say_what_is_wrong() {
        let err = |text: &str| {
            RegistriesConf::parse(text, Path::new("/etc/containers/registries.conf"))
                .unwrap_err()
                .to_string()
        };
        assert!(err("[[registry]\nlocation = 1").contains("registries.conf"));
        assert!(err("[[registry]]\nlocation = 1").contains("location must be a string"));
        assert!(err("[[registry]]\nlocation = \"a\"\ninsecure = \"yes\"")
            .contains("insecure must be true or false"));
        assert!(
            err("[[registry]]\nprefix = \"a\"\n[[registry.mirror]]\ninsecure = true")
                .contains("a mirror has no location")
        );
        assert!(err("registry = 3").contains("list of tables"));
        assert!(err("[[registry]]\ninsecure = true").contains("neither location nor prefix"));
        // Wildcards are skipped, not fatal.
        assert_eq!(
            conf("[[registry]]\nprefix = \"*.example.com\"\ninsecure = true").registries,
            vec![]
        );
    }
}
