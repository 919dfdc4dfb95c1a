//! The run configuration an image carries, kept with it for `run`.

use serde::{Deserialize, Serialize};

use crate::manifest::ImageConfigFile;

/// How the image wants to be run (from its configuration's `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Default arguments (or command, without an entrypoint).
    pub cmd: Vec<String>,
    /// Environment, `NAME=value`.
    pub env: Vec<String>,
    /// Working directory (empty: `/`).
    pub working_dir: String,
    /// User (empty: root).
    pub user: String,
    /// Exposed ports, e.g. `80/tcp`.
    pub exposed_ports: Vec<String>,
    /// Stop signal (empty: SIGTERM).
    pub stop_signal: String,
    /// The image's `HEALTHCHECK`, if it has a usable one.
    #[serde(default)]
    pub healthcheck: Option<ImageHealthcheck>,
}

/// Docker's `HEALTHCHECK` of an image: `test` is `["CMD", argv…]`, `["CMD-SHELL", command]` or
/// `["NONE"]`; times in nanoseconds and retries, 0 meaning Docker's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageHealthcheck {
    /// What to run.
    pub test: Vec<String>,
    /// Between two checks.
    pub interval_ns: u64,
    /// The most one check may take.
    pub timeout_ns: u64,
    /// Failures that do not count after the start.
    pub start_period_ns: u64,
    /// Failures in a row that make it unhealthy.
    pub retries: u32,
}

impl ImageHealthcheck {
    /// Reads the configuration's `Healthcheck` object; `None` when it is absent or unusable.
    pub fn parse(v: &serde_json::Value) -> Option<ImageHealthcheck> {
        let test: Vec<String> = v
            .get("Test")?
            .as_array()?
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<_>>()?;
        let number = |key: &str| v.get(key).and_then(|n| n.as_u64()).unwrap_or(0);
        Some(ImageHealthcheck {
            test,
            interval_ns: number("Interval"),
            timeout_ns: number("Timeout"),
            start_period_ns: number("StartPeriod"),
            retries: u32::try_from(number("Retries")).unwrap_or(u32::MAX),
        })
    }
}

impl From<&ImageConfigFile> for RunConfig {
    fn from(c: &ImageConfigFile) -> Self {
        let Some(cc) = &c.config else {
            return RunConfig::default();
        };
        RunConfig {
            entrypoint: cc.entrypoint.clone().unwrap_or_default(),
            cmd: cc.cmd.clone().unwrap_or_default(),
            env: cc.env.clone().unwrap_or_default(),
            working_dir: cc.working_dir.clone().unwrap_or_default(),
            user: cc.user.clone().unwrap_or_default(),
            exposed_ports: cc
                .exposed_ports
                .as_ref()
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default(),
            stop_signal: cc.stop_signal.clone().unwrap_or_default(),
            healthcheck: cc.healthcheck.as_ref().and_then(ImageHealthcheck::parse),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_healthcheck_is_kept_and_a_malformed_one_ignored() {
        let config = |healthcheck: &str| -> RunConfig {
            let text = format!(
                r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["sh"],"Healthcheck":{healthcheck}}}}}"#
            );
            let file: ImageConfigFile = serde_json::from_str(&text).unwrap();
            RunConfig::from(&file)
        };
        let good = config(r#"{"Test":["CMD-SHELL","true"],"Interval":1000000000,"Retries":2}"#);
        assert_eq!(
            good.healthcheck,
            Some(ImageHealthcheck {
                test: vec!["CMD-SHELL".into(), "true".into()],
                interval_ns: 1_000_000_000,
                retries: 2,
                ..Default::default()
            })
        );
        assert_eq!(good.cmd, ["sh"]);
        let bad = config(r#"{"Test":"not a list","Interval":"soon"}"#);
        assert_eq!(bad.healthcheck, None);
        assert_eq!(bad.cmd, ["sh"]);
        // A record stored before healthchecks were read still loads.
        let old: RunConfig = serde_json::from_str(
            r#"{"entrypoint":[],"cmd":["sh"],"env":[],"working_dir":"","user":"","exposed_ports":[],"stop_signal":""}"#,
        )
        .unwrap();
        assert_eq!(old.healthcheck, None);
    }
}
