//! `update run --svg`: the run's timeline (`crate::timeline`), one row per VM (its stage, the
//! wait at the barrier with its guest running, its prepare, then paused until the kexec, or
//! the call-off), and the host's pre-flight, with the kexec request marked.

use std::collections::BTreeMap;

use super::run::{Outcome, RunReport};
use crate::timeline::{Span, Timeline};

/// The host's row.
const HOST_ROW: &str = "host";

impl RunReport {
    pub fn to_svg(&self) -> String {
        let since = |ms: u64| ms.saturating_sub(self.started_at_ms) as f64 / 1e3;
        let mut spans = vec![Span {
            row: HOST_ROW.into(),
            phase: "preflight".into(),
            start_s: 0.0,
            end_s: self.preflight_ms / 1e3,
        }];
        let mut end_s = self.preflight_ms / 1e3;
        let mut notes = BTreeMap::new();
        for vm in &self.vms {
            let at = |key: &str| vm.times_ms.get(key).copied().map(since);
            let last = at("called_off").or(self.kexec_asked_at_ms.map(since));
            let steps = [
                ("stage", at("stage"), at("staged")),
                ("staged", at("staged"), at("prepare")),
                ("prepare", at("prepare"), at("prepared")),
                ("paused", at("prepared"), at("call_off").or(last)),
                ("cancel", at("call_off"), at("called_off")),
            ];
            for (phase, start, end) in steps {
                if let (Some(start_s), Some(end_s)) = (start, end) {
                    spans.push(Span {
                        row: vm.vm.clone(),
                        phase: phase.into(),
                        start_s,
                        end_s,
                    });
                }
            }
            // A step that failed: from its start to the call-off.
            if vm.error.is_some() {
                let begun = at("prepare").or(at("stage"));
                if let (Some(start_s), Some(end_s)) = (begun, at("call_off")) {
                    spans.push(Span {
                        row: vm.vm.clone(),
                        phase: "failed".into(),
                        start_s,
                        end_s,
                    });
                }
            }
            end_s = spans.iter().map(|s| s.end_s).fold(end_s, f64::max);
            let note = match (
                &vm.left,
                vm.times_ms.get("prepared"),
                self.kexec_asked_at_ms,
            ) {
                (Some(left), _, _) => format!("called off: {left}"),
                (None, Some(&paused), Some(asked)) => {
                    format!(
                        "paused {} ms before the kexec",
                        asked.saturating_sub(paused)
                    )
                }
                _ => String::new(),
            };
            notes.insert(vm.vm.as_str(), note);
        }
        let marks = self
            .kexec_asked_at_ms
            .map(|ms| vec![(since(ms), "kexec asked")])
            .unwrap_or_default();
        Timeline {
            title: self.verdict_line(),
            ok: matches!(self.outcome, Outcome::Kexec),
            rows: vec![HOST_ROW],
            spans: &spans,
            notes,
            marks,
            total_s: end_s * 1.05,
            axis_label: "seconds since `luvmm update run` started",
        }
        .to_svg()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::barrier::VmRun;
    use super::super::run::{Outcome, RunReport};

    fn vm(name: &str, times: &[(&str, u64)]) -> VmRun {
        VmRun {
            vm: name.into(),
            socket: format!("/run/{name}.sock").into(),
            times_ms: times
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>(),
            ..VmRun::default()
        }
    }

    fn report(outcome: Outcome, vms: Vec<VmRun>, kexec: Option<u64>) -> RunReport {
        RunReport {
            outcome,
            reason: None,
            kernel: "/boot/vmlinuz".into(),
            preflight: Default::default(),
            started_at_ms: 1_000,
            preflight_ms: 200.0,
            kexec_asked_at_ms: kexec,
            kexec_load_ms: None,
            holder: None,
            vms,
        }
    }

    #[test]
    fn each_vm_shows_its_stage_wait_prepare_and_pause_before_the_kexec() {
        let times = [
            ("stage", 1_200),
            ("staged", 1_300),
            ("prepare", 1_450),
            ("prepared", 1_500),
        ];
        let svg = report(Outcome::Kexec, vec![vm("a", &times)], Some(1_520)).to_svg();
        for phase in ["preflight", "stage", "staged", "prepare", "paused"] {
            assert!(svg.contains(&format!(">{phase}</text>")), "{phase}: {svg}");
        }
        assert!(svg.contains("<title>a staged: 150.0 ms</title>"), "{svg}");
        assert!(svg.contains("paused 20 ms before the kexec"), "{svg}");
        assert!(svg.contains(">kexec asked</text>"), "{svg}");
        assert!(svg.contains("every VM prepared"), "{svg}");
    }

    #[test]
    fn a_called_off_run_shows_the_failure_and_where_each_guest_is() {
        let mut failed = vm(
            "a",
            &[("stage", 1_200), ("call_off", 1_400), ("called_off", 1_450)],
        );
        failed.error = Some("refused".into());
        failed.left = Some("running".into());
        let svg = report(Outcome::CalledOff, vec![failed], None).to_svg();
        assert!(
            svg.contains(">failed</text>") && svg.contains(">cancel</text>"),
            "{svg}"
        );
        assert!(svg.contains("called off: running"), "{svg}");
        assert!(svg.contains("#cb181d"), "a red verdict: {svg}");
    }
}
