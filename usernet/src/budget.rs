//! The host descriptors the NATs of one process may hold together.
//!
//! Each VM's NAT has its own flow limits, but every flow is a host socket and all VMs of a
//! process share one descriptor limit: without a shared budget, busy guests in a library
//! process could take every descriptor and starve the process's own work (restores opening
//! snapshot files, published ports accepting, the control socket). [`FlowBudget::process`]
//! leaves a reserve of the process's limit to that work.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Descriptors the process budget always leaves to everything but the NATs (or a quarter of
/// the limit, if more).
const RESERVE: usize = 256;

/// A count of host sockets shared by NATs (clone it to share).
#[derive(Debug, Clone)]
pub struct FlowBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `None`: from the process's open-files limit at each acquire (it may be raised later).
    capacity: Option<usize>,
    used: AtomicUsize,
}

/// One flow's share of a [`FlowBudget`], given back when dropped.
#[derive(Debug)]
pub struct FlowPermit {
    inner: Arc<Inner>,
}

impl Drop for FlowPermit {
    fn drop(&mut self) {
        self.inner.used.fetch_sub(1, Ordering::AcqRel);
    }
}

impl FlowBudget {
    /// A budget of `capacity` flows.
    pub fn new(capacity: usize) -> Self {
        FlowBudget {
            inner: Arc::new(Inner {
                capacity: Some(capacity),
                used: AtomicUsize::new(0),
            }),
        }
    }

    /// The budget every NAT of this process shares unless given another: the soft limit on
    /// open descriptors (as it is when a flow opens), less a reserve of 256 or a quarter of it,
    /// whichever is more.
    pub fn process() -> Self {
        static PROCESS: OnceLock<FlowBudget> = OnceLock::new();
        PROCESS
            .get_or_init(|| FlowBudget {
                inner: Arc::new(Inner {
                    capacity: None,
                    used: AtomicUsize::new(0),
                }),
            })
            .clone()
    }

    /// A permit for one more flow, or `None` when the budget is spent.
    pub fn try_acquire(&self) -> Option<FlowPermit> {
        let capacity = self.capacity();
        self.inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < capacity).then_some(used + 1)
            })
            .ok()
            .map(|_| FlowPermit {
                inner: self.inner.clone(),
            })
    }

    /// Flows holding a permit now.
    pub fn used(&self) -> usize {
        self.inner.used.load(Ordering::Acquire)
    }

    /// Flows the budget allows at once.
    pub fn capacity(&self) -> usize {
        self.inner
            .capacity
            .unwrap_or_else(|| capacity_for(open_files_limit()))
    }
}

fn capacity_for(limit: usize) -> usize {
    limit.saturating_sub(RESERVE.max(limit / 4))
}

fn open_files_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_run_out_and_come_back_when_dropped() {
        let budget = FlowBudget::new(2);
        let shared = budget.clone();
        let a = budget.try_acquire().unwrap();
        let _b = shared.try_acquire().unwrap();
        assert!(budget.try_acquire().is_none());
        assert_eq!(shared.used(), 2);
        drop(a);
        assert!(shared.try_acquire().is_some());
    }

    #[test]
    fn the_process_budget_leaves_a_reserve() {
        assert_eq!(capacity_for(1024), 768);
        assert_eq!(capacity_for(512), 256);
        assert_eq!(capacity_for(100), 0);
        assert_eq!(capacity_for(1 << 20), 3 << 18);
        assert!(FlowBudget::process().capacity() < open_files_limit());
    }
}
