//! A client for the OCI distribution API (v2): manifests and blobs, anonymous, bearer-token and
//! basic authentication, retries with backoff on transient failures, redirects followed without
//! carrying credentials to another host.
//!
//! Plain HTTP is used for registries on loopback (as Docker does) and for those named in
//! [`ClientOptions::insecure_registries`]; every other registry is HTTPS.

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;

use crate::reference::RegistryRef;

/// Errors talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The tag or digest does not exist in the repository.
    #[error("{reference}: manifest not found (no such tag or digest in {repository})")]
    ManifestNotFound {
        /// What was asked for.
        reference: String,
        /// The repository.
        repository: String,
    },
    /// The repository does not exist (or is not visible to us).
    #[error("repository {repository} not found on {registry}")]
    RepositoryNotFound {
        /// The registry.
        registry: String,
        /// The repository.
        repository: String,
    },
    /// A blob the manifest names is missing.
    #[error("blob {digest} not found in {repository}")]
    BlobNotFound {
        /// The blob.
        digest: String,
        /// The repository.
        repository: String,
    },
    /// The registry refused our credentials, or wants some and we have none.
    #[error("authentication to {registry} failed: {detail}")]
    Unauthorized {
        /// The registry.
        registry: String,
        /// What it said.
        detail: String,
    },
    /// Any other HTTP error.
    #[error("{url}: HTTP {status}")]
    Http {
        /// The request.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The connection failed (after retries).
    #[error("cannot reach {url}: {detail}")]
    Transport {
        /// The request.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// A response we could not make sense of.
    #[error("{url}: {detail}")]
    BadResponse {
        /// The request.
        url: String,
        /// What was wrong.
        detail: String,
    },
}

/// Client settings.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Registries (`host[:port]`) to talk to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// The credentials file; default `$REGISTRY_AUTH_FILE`, else the containers tools'
    /// `auth.json` (`$XDG_RUNTIME_DIR/containers/auth.json`, `~/.config/containers/auth.json`)
    /// merged with Docker's `~/.docker/config.json` (the first file to name a registry wins).
    pub auth_file: Option<PathBuf>,
    /// Mirrors, insecure and blocked registries; `None` reads the user's `registries.conf`
    /// ([`RegistriesConf::load`](crate::registries_conf::RegistriesConf::load)) at each pull.
    pub registries_conf: Option<crate::registries_conf::RegistriesConf>,
}

/// A registry client (one per pull; caches tokens per repository).
pub struct Client {
    agent: ureq::Agent,
    options: ClientOptions,
    credentials: HashMap<String, (String, String)>,
    tokens: Mutex<HashMap<String, String>>,
}

const ATTEMPTS: u32 = 4;
const MAX_REDIRECTS: u32 = 5;

/// Parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer` or `basic` (lowercase).
    pub scheme: String,
    /// Parameters (`realm`, `service`, `scope`, …).
    pub params: HashMap<String, String>,
}

/// Parses `Bearer realm="…",service="…",scope="…"` (or `Basic realm="…"`).
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(key, value.to_string());
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// Reads `{"auths": {"host": {"auth": base64("user:pass")}}}` files (Docker's and containers').
pub fn load_credentials(path: &std::path::Path) -> HashMap<String, (String, String)> {
    let mut out = HashMap::new();
    let Ok(bytes) = std::fs::read(path) else {
        return out;
    };
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return out;
    };
    let Some(auths) = json.get("auths").and_then(|a| a.as_object()) else {
        return out;
    };
    for (key, value) in auths {
        let Some(encoded) = value.get("auth").and_then(|a| a.as_str()) else {
            continue;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            continue;
        };
        let Some((user, pass)) = String::from_utf8_lossy(&decoded)
            .split_once(':')
            .map(|(u, p)| (u.to_string(), p.to_string()))
        else {
            continue;
        };
        // Keys may be URLs (`https://index.docker.io/v1/`) or bare hosts.
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        let host = if host == "index.docker.io" {
            "docker.io".to_string()
        } else {
            host
        };
        out.insert(host, (user, pass));
    }
    out
}

/// Credentials from `files`; for a registry named in several, the first file's.
fn merged_credentials(files: &[PathBuf]) -> HashMap<String, (String, String)> {
    let mut credentials = HashMap::new();
    for file in files.iter().rev() {
        credentials.extend(load_credentials(file));
    }
    credentials
}

/// The credential files read when none is given, first wins: `$REGISTRY_AUTH_FILE` alone,
/// else the containers tools' `auth.json` files and Docker's `config.json`.
fn default_auth_files() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
        return vec![PathBuf::from(p)];
    }
    let mut files = Vec::new();
    if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(run).join("containers/auth.json"));
    }
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        files.push(home.join(".config/containers/auth.json"));
        files.push(home.join(".docker/config.json"));
    }
    files
}

fn is_loopback(host: &str) -> bool {
    let name = host
        .strip_prefix('[')
        .and_then(|h| h.split_once(']').map(|(a, _)| a))
        .unwrap_or_else(|| host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host));
    name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a bearer challenge's `realm` may be asked for a token: https, or plain http to
/// this machine or to a host the user marked insecure.
fn realm_is_acceptable(realm: &str, insecure: bool) -> bool {
    match scheme_of(realm) {
        "https" => true,
        "http" => insecure || is_loopback(host_of(realm)),
        _ => false,
    }
}

/// Whether a request to `url`, reached from the registry's `origin` (by redirects), may carry
/// the registry's credentials: only to the same host over the same scheme, so neither another
/// host nor a downgrade from https to http ever sees them.
fn may_send_credentials(origin: &str, url: &str) -> bool {
    scheme_of(origin) == scheme_of(url) && host_of(origin) == host_of(url)
}

fn scheme_of(url: &str) -> &str {
    url.split_once("://").map(|(s, _)| s).unwrap_or("")
}

fn host_of(url: &str) -> &str {
    url.split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or("")
}

/// A successful response.
pub struct Response {
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `Content-Length`.
    pub length: Option<u64>,
    /// The body.
    pub body: Box<dyn Read + Send + Sync>,
}

impl Client {
    /// A client with `options`.
    pub fn new(options: ClientOptions) -> Client {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(120))
            .user_agent(concat!("supermachine/", env!("CARGO_PKG_VERSION")))
            .build();
        let credentials = match &options.auth_file {
            Some(file) => load_credentials(file),
            None => merged_credentials(&default_auth_files()),
        };
        Client {
            agent,
            options,
            credentials,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    fn base(&self, r: &RegistryRef) -> String {
        let host = r.api_host();
        let plain = is_loopback(host)
            || self
                .options
                .insecure_registries
                .iter()
                .any(|h| h == host || h == &r.registry);
        format!(
            "{}://{host}/v2/{}",
            if plain { "http" } else { "https" },
            r.repository
        )
    }

    /// Fetches a manifest or index by tag or digest.
    pub fn manifest(&self, r: &RegistryRef, reference: &str) -> Result<Vec<u8>, RegistryError> {
        let url = format!("{}/manifests/{reference}", self.base(r));
        let resp = self
            .get(r, &url, Some(crate::manifest::ACCEPT))
            .map_err(|e| match e {
                RegistryError::Http { status: 404, .. } => RegistryError::ManifestNotFound {
                    reference: format!("{}/{}:{reference}", r.registry, r.repository),
                    repository: r.repository.clone(),
                },
                other => other,
            })?;
        let mut body = Vec::new();
        resp.body
            .take(16 << 20)
            .read_to_end(&mut body)
            .map_err(|e| RegistryError::Transport {
                url: url.clone(),
                detail: e.to_string(),
            })?;
        Ok(body)
    }

    /// Opens a blob for streaming.
    pub fn blob(&self, r: &RegistryRef, digest: &str) -> Result<Response, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base(r));
        self.get(r, &url, None).map_err(|e| match e {
            RegistryError::Http { status: 404, .. } => RegistryError::BlobNotFound {
                digest: digest.into(),
                repository: r.repository.clone(),
            },
            other => other,
        })
    }

    fn token(&self, r: &RegistryRef, challenge: &Challenge) -> Result<String, RegistryError> {
        let realm = challenge
            .params
            .get("realm")
            .ok_or_else(|| RegistryError::Unauthorized {
                registry: r.registry.clone(),
                detail: "bearer challenge without a realm".into(),
            })?;
        // The token service gets the registry's credentials: only over https, unless it is on
        // this machine or the registry itself is one the user called insecure.
        let insecure = self
            .options
            .insecure_registries
            .iter()
            .any(|h| h == &r.registry || h == host_of(realm));
        if !realm_is_acceptable(realm, insecure) {
            return Err(RegistryError::Unauthorized {
                registry: r.registry.clone(),
                detail: format!(
                    "its token service {realm} is not https (refusing to send credentials or \
                     trust a token over plain http)"
                ),
            });
        }
        let scope = challenge
            .params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", r.repository));
        let mut req = self.agent.get(realm).query("scope", &scope);
        if let Some(service) = challenge.params.get("service") {
            req = req.query("service", service);
        }
        if let Some((user, pass)) = self.credentials.get(&r.registry) {
            req = req.set("Authorization", &basic(user, pass));
        }
        let resp = req.call().map_err(|e| match e {
            ureq::Error::Status(code, _) => RegistryError::Unauthorized {
                registry: r.registry.clone(),
                detail: format!("token service {realm} answered HTTP {code}"),
            },
            ureq::Error::Transport(t) => RegistryError::Transport {
                url: realm.clone(),
                detail: t.to_string(),
            },
        })?;
        let mut body = Vec::new();
        resp.into_reader()
            .take(1 << 20)
            .read_to_end(&mut body)
            .map_err(|e| RegistryError::Transport {
                url: realm.clone(),
                detail: e.to_string(),
            })?;
        let json: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| RegistryError::BadResponse {
                url: realm.clone(),
                detail: e.to_string(),
            })?;
        json.get("token")
            .or_else(|| json.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .ok_or_else(|| RegistryError::BadResponse {
                url: realm.clone(),
                detail: "no token in the token service's answer".into(),
            })
    }

    fn get(
        &self,
        r: &RegistryRef,
        url: &str,
        accept: Option<&str>,
    ) -> Result<Response, RegistryError> {
        let origin = url.to_string();
        let mut url = url.to_string();
        let mut attempt = 0;
        let mut redirects = 0;
        let mut authed_once = false;
        loop {
            let same_host = may_send_credentials(&origin, &url);
            let mut req = self.agent.get(&url);
            if let Some(a) = accept {
                req = req.set("Accept", a);
            }
            if same_host {
                // Credentials go only to the registry itself, never to a redirect target.
                if let Some(token) = self
                    .tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&r.repository)
                {
                    req = req.set("Authorization", &format!("Bearer {token}"));
                } else if authed_once {
                    if let Some((u, p)) = self.credentials.get(&r.registry) {
                        req = req.set("Authorization", &basic(u, p));
                    }
                }
            }
            match req.call() {
                Ok(resp) if (300..400).contains(&resp.status()) => {
                    redirects += 1;
                    let location = resp.header("Location").map(str::to_string);
                    match location {
                        Some(l) if redirects <= MAX_REDIRECTS => {
                            url = if l.starts_with("http://") || l.starts_with("https://") {
                                l
                            } else {
                                let scheme = url.split("://").next().unwrap_or("https");
                                format!("{scheme}://{}{l}", host_of(&url))
                            };
                            continue;
                        }
                        _ => {
                            return Err(RegistryError::BadResponse {
                                url,
                                detail: "too many or broken redirects".into(),
                            })
                        }
                    }
                }
                Ok(resp) => {
                    return Ok(Response {
                        content_type: resp.header("Content-Type").map(str::to_string),
                        length: resp.header("Content-Length").and_then(|l| l.parse().ok()),
                        body: Box::new(resp.into_reader()),
                    })
                }
                Err(ureq::Error::Status(401, resp)) if same_host && !authed_once => {
                    authed_once = true;
                    let challenge = resp
                        .header("WWW-Authenticate")
                        .and_then(parse_challenge)
                        .ok_or_else(|| RegistryError::Unauthorized {
                            registry: r.registry.clone(),
                            detail: "HTTP 401 without a usable WWW-Authenticate challenge".into(),
                        })?;
                    match challenge.scheme.as_str() {
                        "bearer" => {
                            let token = self.token(r, &challenge)?;
                            self.tokens
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(r.repository.clone(), token);
                        }
                        "basic" if self.credentials.contains_key(&r.registry) => {}
                        "basic" => {
                            return Err(RegistryError::Unauthorized {
                                registry: r.registry.clone(),
                                detail: "the registry wants a user name and password; none are configured (docker login, or ~/.docker/config.json / REGISTRY_AUTH_FILE)".into(),
                            })
                        }
                        other => {
                            return Err(RegistryError::Unauthorized {
                                registry: r.registry.clone(),
                                detail: format!("unsupported authentication scheme {other}"),
                            })
                        }
                    }
                }
                Err(ureq::Error::Status(code @ (401 | 403), resp)) => {
                    let body = resp.into_string().unwrap_or_default();
                    return Err(RegistryError::Unauthorized {
                        registry: r.registry.clone(),
                        detail: format!(
                            "HTTP {code}: {}",
                            body.trim().chars().take(200).collect::<String>()
                        ),
                    });
                }
                Err(ureq::Error::Status(404, resp)) => {
                    let body = resp.into_string().unwrap_or_default();
                    if body.contains("NAME_UNKNOWN") {
                        return Err(RegistryError::RepositoryNotFound {
                            registry: r.registry.clone(),
                            repository: r.repository.clone(),
                        });
                    }
                    return Err(RegistryError::Http { url, status: 404 });
                }
                Err(ureq::Error::Status(code, _))
                    if (code == 429 || code >= 500) && attempt + 1 < ATTEMPTS =>
                {
                    attempt += 1;
                    std::thread::sleep(backoff(attempt));
                }
                Err(ureq::Error::Status(code, _)) => {
                    return Err(RegistryError::Http { url, status: code })
                }
                Err(ureq::Error::Transport(_)) if attempt + 1 < ATTEMPTS => {
                    attempt += 1;
                    std::thread::sleep(backoff(attempt));
                }
                Err(ureq::Error::Transport(t)) => {
                    return Err(RegistryError::Transport {
                        url,
                        detail: t.to_string(),
                    })
                }
            }
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200 * 2u64.pow(attempt.min(6)))
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_credentials_file_to_name_a_registry_wins() {
        let dir = std::env::temp_dir().join(format!("sm-auth-merge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, entries: &[(&str, &str)]| {
            let auths: serde_json::Map<String, serde_json::Value> = entries
                .iter()
                .map(|(host, userpass)| {
                    let auth = base64::engine::general_purpose::STANDARD.encode(userpass);
                    (host.to_string(), serde_json::json!({ "auth": auth }))
                })
                .collect();
            let p = dir.join(name);
            std::fs::write(&p, serde_json::json!({ "auths": auths }).to_string()).unwrap();
            p
        };
        let containers = file("auth.json", &[("quay.io", "podman:one")]);
        let docker = file(
            "config.json",
            &[
                ("quay.io", "docker:two"),
                ("https://index.docker.io/v1/", "hub:three"),
            ],
        );
        let merged = merged_credentials(&[containers, dir.join("missing.json"), docker]);
        assert_eq!(merged["quay.io"], ("podman".into(), "one".into()));
        assert_eq!(merged["docker.io"], ("hub".into(), "three".into()));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn parses_bearer_and_basic_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["scope"], "repository:library/alpine:pull");
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
    }

    #[test]
    fn loopback_registries_are_plain_http() {
        for h in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
            "127.1.2.3",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["docker.io", "10.0.0.1:5000", "example.com:443"] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn reads_docker_credentials() {
        let p = std::env::temp_dir().join(format!("auth-{}.json", std::process::id()));
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:x");
        std::fs::write(
            &p,
            format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"127.0.0.1:5000":{{"auth":"{auth}"}},"bad":{{"auth":"!!"}}}}}}"#),
        )
        .unwrap();
        let c = load_credentials(&p);
        std::fs::remove_file(&p).ok();
        assert_eq!(
            c["docker.io"],
            ("alice".to_string(), "s3cret:x".to_string())
        );
        assert!(c.contains_key("127.0.0.1:5000"));
        assert!(!c.contains_key("bad"));
    }

    #[test]
    fn credentials_never_follow_a_redirect_to_another_host_or_to_plain_http() {
        let origin = "https://r.example/v2/a/blobs/sha256:1";
        assert!(may_send_credentials(origin, "https://r.example/v2/other"));
        assert!(!may_send_credentials(
            origin,
            "http://r.example/v2/a/blobs/sha256:1"
        ));
        assert!(!may_send_credentials(origin, "https://cdn.example/blob"));
        assert!(!may_send_credentials(origin, "https://r.example:8443/v2/a"));
        assert!(may_send_credentials(
            "http://127.0.0.1:5000/v2/a",
            "http://127.0.0.1:5000/v2/b"
        ));
    }

    #[test]
    fn a_token_realm_must_be_https_unless_local_or_marked_insecure() {
        assert!(realm_is_acceptable("https://auth.example/token", false));
        assert!(!realm_is_acceptable("http://auth.example/token", false));
        assert!(realm_is_acceptable("http://auth.example/token", true));
        assert!(realm_is_acceptable("http://127.0.0.1:5001/token", false));
        assert!(realm_is_acceptable("http://localhost/token", false));
        assert!(!realm_is_acceptable("ftp://auth.example/token", false));
        assert!(!realm_is_acceptable("Registry Realm", false));
    }

    #[test]
    fn redirect_hosts_are_compared_without_paths() {
        assert_eq!(host_of("https://r.example/v2/x"), "r.example");
        assert_eq!(
            host_of("http://127.0.0.1:5000/v2/a/blobs/b"),
            "127.0.0.1:5000"
        );
    }
}
