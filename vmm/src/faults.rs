//! Test-only faults: `LUVMM_TEST_FAULTS` names, comma-separated, the faults a test injects to
//! see that what should catch them does. Nothing sets it outside the tests.

/// The variable the faults are named in.
pub const VARIABLE: &str = "LUVMM_TEST_FAULTS";

/// A fault a test can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A restore after a kexec puts the first two passthrough devices each in the other's
    /// guest slot: the guest's device identity check must catch it.
    SwapDevices,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::SwapDevices => "swap-devices",
        }
    }

    /// Whether a test asked for this fault.
    pub fn injected(self) -> bool {
        std::env::var(VARIABLE).is_ok_and(|names| named(&names, self))
    }
}

fn named(names: &str, fault: Fault) -> bool {
    names.split(',').any(|n| n.trim() == fault.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_is_injected_only_by_its_own_name() {
        assert!(named("swap-devices", Fault::SwapDevices));
        assert!(named("other, swap-devices", Fault::SwapDevices));
        assert!(!named("", Fault::SwapDevices));
        assert!(!named("swap-devices-not", Fault::SwapDevices));
    }
}
