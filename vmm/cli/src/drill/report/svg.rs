//! The drill's picture: its timeline (`crate::timeline`) with the L1 host's row first, each
//! VM's blackout beside the one its guest saw, and every kexec and L1 boot marked.

use std::collections::BTreeMap;

use super::DrillReport;
use crate::drill::event::HOST_ROW;
use crate::timeline::Timeline;

impl DrillReport {
    /// The phases per row on one time axis (see `crate::timeline`).
    pub fn to_svg(&self) -> String {
        let mut notes = BTreeMap::new();
        for span in &self.timeline {
            if let Some(figures) = self.blackouts(&span.row) {
                notes.insert(span.row.as_str(), figures);
            }
        }
        let marks = self
            .timeline
            .iter()
            .filter(|s| s.row == HOST_ROW && s.phase == "kexec")
            .flat_map(|s| [(s.start_s, "kexec"), (s.end_s, "L1 booted")])
            .collect();
        Timeline {
            title: self.verdict(),
            ok: self.ok,
            rows: vec![HOST_ROW],
            spans: &self.timeline,
            notes,
            marks,
            total_s: self.total_s.max(1.0),
            axis_label: "seconds since L1 started, by the host's clock",
        }
        .to_svg()
    }

    /// The title: whether every guest kept everything, and the first failure if not.
    fn verdict(&self) -> String {
        let updates = self.rounds.iter().filter(|r| r.kind == "update").count();
        let vms = self.plan.vms;
        match (self.ok, self.failures.first()) {
            (true, _) => {
                format!("luvmm drill: OK, {vms} VM(s) through {updates} update(s), nothing lost")
            }
            (false, Some(first)) => format!("luvmm drill: FAILED: {first}"),
            (false, None) => "luvmm drill: FAILED".to_string(),
        }
    }

    /// Each of `row`'s blackouts by luvmm's clock beside the one its guest saw, per update.
    fn blackouts(&self, row: &str) -> Option<String> {
        let figures: Vec<String> = self
            .rounds
            .iter()
            .filter(|r| r.kind == "update")
            .flat_map(|r| r.vms.iter().filter(|v| v.vm == row))
            .filter_map(|v| {
                let blackout = v.phases_ms.get("blackout")?;
                let seen = v
                    .guest_clock_gap_ms
                    .map_or_else(|| "-".to_string(), |ms| format!("{ms:.0}"));
                Some(format!("blackout {blackout:.0} ms, guest saw {seen} ms"))
            })
            .collect();
        (!figures.is_empty()).then(|| figures.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::held;

    #[test]
    fn every_phase_is_drawn_on_its_row() {
        let svg = held().to_svg();
        assert!(svg.contains("<title>vm1 prepare: 40.0 s</title>"), "{svg}");
        assert!(svg.contains("host kexec"), "{svg}");
    }

    #[test]
    fn each_vm_row_shows_its_blackout_beside_the_one_its_guest_saw() {
        let mut report = held();
        report.rounds[0].vms[0]
            .phases_ms
            .insert("blackout".into(), 12_345.0);
        let svg = report.to_svg();
        assert!(
            svg.contains("blackout 12345 ms, guest saw 1000 ms"),
            "{svg}"
        );
    }

    #[test]
    fn the_picture_says_its_verdict_marks_the_kexec_and_has_an_axis_and_a_legend() {
        let report = held();
        let svg = report.to_svg();
        let verdict = if report.ok {
            "luvmm drill: OK"
        } else {
            "luvmm drill: FAILED"
        };
        assert!(svg.contains(r#"font-weight="bold""#), "{svg}");
        assert!(svg.contains(verdict), "{svg}");
        assert!(
            svg.contains(">kexec</text>") && svg.contains(">L1 booted</text>"),
            "{svg}"
        );
        assert!(svg.contains(">0 s</text>"), "{svg}");
        assert!(svg.contains("seconds since L1 started"), "{svg}");
        for phase in report.timeline.iter().map(|s| s.phase.as_str()) {
            assert!(
                svg.contains(&format!(">{phase}</text>")),
                "no legend for {phase}: {svg}"
            );
        }
    }

    /// librsvg (installed by tests/setup.sh) reads and renders the picture.
    #[test]
    fn the_picture_renders() {
        let dir = std::env::temp_dir().join(format!("luvmm-svg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (svg, png) = (dir.join("drill.svg"), dir.join("drill.png"));
        std::fs::write(&svg, held().to_svg()).unwrap();
        let out = std::process::Command::new("rsvg-convert")
            .arg("-o")
            .arg(&png)
            .arg(&svg)
            .output()
            .expect("rsvg-convert (installed by tests/setup.sh)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let image = std::fs::read(&png).unwrap();
        assert!(image.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
