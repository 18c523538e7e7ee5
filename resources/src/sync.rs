//! The one poison-tolerant lock of the workspace.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex` even if a thread panicked while holding it. What luvmm keeps behind a mutex
/// (device registers, interrupt routes, the VMM) is plain values that stay usable after such a
/// panic, and the VMM must go on serving its guest, so a poisoned lock is not an error here.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_poisoned_by_a_panic_still_locks() {
        let mutex = Mutex::new(1);
        let poisoned = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut value = mutex.lock().unwrap();
                    *value = 2;
                    panic!("poison the lock");
                })
                .join()
        });
        assert!(poisoned.is_err());
        assert!(mutex.is_poisoned());
        assert_eq!(*lock(&mutex), 2);
    }
}
