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
        }
    }
}
