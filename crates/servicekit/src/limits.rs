//! The process's open-files limit, raised to what the system allows.
//!
//! Why this module exists: every socket, client connection and file is a file
//! descriptor, and the usual soft limit (1,024 under many container runtimes and
//! systemd units) caps a socket pod at about a thousand clients long before its
//! memory or CPU would. The hard limit is what an operator granted; the soft limit
//! is only a default. So at start-up each service raises its soft limit to the hard
//! one (as Go's runtime does) and logs both, and a socket service can say when its
//! connection cap does not fit.

/// The open-files limit after trying to raise the soft limit to the hard one:
/// `(soft, hard)`, or `None` where it cannot be read.
pub fn raise_open_files_limit() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through a valid pointer to a local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads one rlimit through a valid pointer to a local.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Some((limit.rlim_cur, limit.rlim_max))
}

/// The current soft open-files limit, if it can be read.
pub fn open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: as in raise_open_files_limit.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let (soft, hard) = raise_open_files_limit().expect("readable on Linux");
        assert_eq!(soft, hard);
        assert_eq!(open_files_limit(), Some(soft));
    }
}
