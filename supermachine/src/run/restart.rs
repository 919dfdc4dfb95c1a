//! `--restart`: whether a VM whose workload ended is started again (restored from its bake, or
//! booted), as Docker's restart policies say. A stop the user asked for is never undone.

use std::str::FromStr;
use std::time::Duration;

/// When a VM is started again after its workload ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestartPolicy {
    /// Never (the default).
    #[default]
    No,
    /// After a non-zero exit (or a VM that failed), at most `max` times when given.
    OnFailure {
        /// The most restarts; `None`: no limit.
        max: Option<u32>,
    },
    /// After every exit (`unless-stopped` means the same here: a stop is never undone).
    Always,
}

/// A `--restart` value that is none of `no`, `on-failure[:N]`, `always`, `unless-stopped`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid restart policy {0:?} (expected no, on-failure[:N], always or unless-stopped)")]
pub struct InvalidRestartPolicy(String);

impl FromStr for RestartPolicy {
    type Err = InvalidRestartPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "no" => Ok(RestartPolicy::No),
            "always" | "unless-stopped" => Ok(RestartPolicy::Always),
            "on-failure" => Ok(RestartPolicy::OnFailure { max: None }),
            _ => match s.strip_prefix("on-failure:").map(str::parse::<u32>) {
                Some(Ok(n)) => Ok(RestartPolicy::OnFailure { max: Some(n) }),
                _ => Err(InvalidRestartPolicy(s.into())),
            },
        }
    }
}

impl std::fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestartPolicy::No => write!(f, "no"),
            RestartPolicy::OnFailure { max: None } => write!(f, "on-failure"),
            RestartPolicy::OnFailure { max: Some(n) } => write!(f, "on-failure:{n}"),
            RestartPolicy::Always => write!(f, "always"),
        }
    }
}

impl RestartPolicy {
    /// Whether to start again after a run that ended with `status` (`None`: the VM failed),
    /// `restarts` restarts so far, unless the user stopped it.
    pub fn restarts_after(self, status: Option<i32>, restarts: u32, stopped: bool) -> bool {
        if stopped {
            return false;
        }
        match self {
            RestartPolicy::No => false,
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure { max } => {
                status != Some(0) && max.is_none_or(|max| restarts < max)
            }
        }
    }

    /// How long to wait before restart number `restarts + 1`: 100 ms doubling, at most 10 s,
    /// so a workload that fails at once does not spin.
    pub fn delay(restarts: u32) -> Duration {
        Duration::from_millis(100u64.saturating_mul(1 << restarts.min(7)))
            .min(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_policies_parse_and_decide() {
        let p = |s: &str| s.parse::<RestartPolicy>().unwrap();
        assert_eq!(p("no"), RestartPolicy::No);
        assert_eq!(p("always"), RestartPolicy::Always);
        assert_eq!(p("unless-stopped"), RestartPolicy::Always);
        assert_eq!(p("on-failure"), RestartPolicy::OnFailure { max: None });
        assert_eq!(p("on-failure:3"), RestartPolicy::OnFailure { max: Some(3) });
        for bad in ["", "sometimes", "on-failure:", "on-failure:-1", "always:3"] {
            assert!(bad.parse::<RestartPolicy>().is_err(), "{bad}");
        }
        for s in ["no", "always", "on-failure", "on-failure:3"] {
            assert_eq!(p(s).to_string(), s);
        }
        let f3 = p("on-failure:3");
        assert!(f3.restarts_after(Some(1), 0, false));
        assert!(f3.restarts_after(None, 2, false));
        assert!(!f3.restarts_after(Some(1), 3, false));
        assert!(!f3.restarts_after(Some(0), 0, false));
        assert!(p("always").restarts_after(Some(0), 1000, false));
        assert!(!p("always").restarts_after(Some(1), 0, true));
        assert!(!p("no").restarts_after(Some(1), 0, false));
        assert_eq!(RestartPolicy::delay(0), Duration::from_millis(100));
        assert_eq!(RestartPolicy::delay(3), Duration::from_millis(800));
        assert_eq!(RestartPolicy::delay(40), Duration::from_secs(10));
    }
}
