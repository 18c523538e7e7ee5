//! An allow list under construction, and what every luvmm thread needs whatever its job.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// System call numbers to the argument rules under which each is allowed; an empty rule list
/// allows the call with any arguments.
#[derive(Default)]
pub(super) struct AllowList(BTreeMap<i64, Vec<SeccompRule>>);

impl AllowList {
    /// Allows `syscall` with any arguments.
    pub(super) fn any(&mut self, syscall: i64) -> &mut Self {
        self.0.insert(syscall, Vec::new());
        self
    }

    /// Allows `syscall` when argument `arg` equals one of `values` (compared on its low 32 bits:
    /// every argument filtered here is an `int` or an ioctl request, which the kernel takes as
    /// 32 bits).
    pub(super) fn when_arg(
        &mut self,
        syscall: i64,
        arg: u8,
        values: &[u64],
    ) -> Result<&mut Self, BackendError> {
        for &value in values {
            let rule = SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                value,
            )?])?;
            self.push(syscall, rule);
        }
        Ok(self)
    }

    /// Allows `ioctl` with one of `requests`.
    pub(super) fn ioctls(&mut self, requests: &[u64]) -> Result<&mut Self, BackendError> {
        self.when_arg(libc::SYS_ioctl, 1, requests)
    }

    /// Allows `syscall` when the bits `mask` of argument `arg` are all clear.
    pub(super) fn when_clear(
        &mut self,
        syscall: i64,
        arg: u8,
        mask: u64,
    ) -> Result<&mut Self, BackendError> {
        let rule = SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask),
            0,
        )?])?;
        self.push(syscall, rule);
        Ok(self)
    }

    /// Adds `rule` for `syscall`, unless the call is already allowed with any arguments.
    fn push(&mut self, syscall: i64, rule: SeccompRule) {
        match self.0.get_mut(&syscall) {
            Some(rules) if rules.is_empty() => {}
            Some(rules) => rules.push(rule),
            None => {
                self.0.insert(syscall, vec![rule]);
            }
        }
    }

    pub(super) fn into_rules(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
    }
}

/// `fcntl` commands every thread may use: `F_GETFD`, which the standard library's fd checks
/// make on closing.
const FCNTL_ANY_THREAD: [u64; 1] = [libc::F_GETFD as u64];

/// What every luvmm thread needs: memory, locks, signals, its log line, its end.
pub(super) fn every_thread() -> Result<AllowList, BackendError> {
    let mut list = AllowList::default();
    list
        // Memory: the allocator, thread stacks and their guard pages, mapped files. Never
        // executable: no luvmm thread loads code once running.
        .when_clear(libc::SYS_mmap, 2, libc::PROT_EXEC as u64)?
        .when_clear(libc::SYS_mprotect, 2, libc::PROT_EXEC as u64)?
        .any(libc::SYS_munmap)
        .any(libc::SYS_mremap)
        .any(libc::SYS_madvise)
        .any(libc::SYS_brk)
        // The allocator sizes its per-thread arenas by the CPUs it may run on.
        .any(libc::SYS_sched_getaffinity)
        // Locks, channels, condition variables.
        .any(libc::SYS_futex)
        .any(libc::SYS_sched_yield)
        // Return from a signal handler (the vCPU kick); the standard library's signal stack
        // and the masks it sets at thread start and exit.
        .any(libc::SYS_rt_sigreturn)
        .any(libc::SYS_rt_sigprocmask)
        .any(libc::SYS_sigaltstack)
        // Clocks, when the vDSO does not answer; the hash maps' random keys.
        .any(libc::SYS_clock_gettime)
        .any(libc::SYS_getrandom)
        // The log line (`luvmm[PID] ...` on stderr), eventfds, and the files the thread owns.
        .any(libc::SYS_write)
        .any(libc::SYS_read)
        .any(libc::SYS_close)
        .any(libc::SYS_getpid)
        .any(libc::SYS_gettid)
        .when_arg(libc::SYS_fcntl, 1, &FCNTL_ANY_THREAD)?
        // The end of a thread, and of the process (also the SIGSYS handler's way out).
        .any(libc::SYS_exit)
        .any(libc::SYS_exit_group);
    Ok(list)
}
