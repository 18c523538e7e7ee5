//! The SVG timeline an operator looks at after a drill: every row's phases on one time axis,
//! with what is needed to read it (verdict, ticks, kexec marks, legend).

use std::fmt::Write as _;

use super::DrillReport;
use crate::drill::event::HOST_ROW;

/// Where things go, in SVG units.
const LEFT: f64 = 70.0;
const WIDTH: f64 = 1000.0;
const ROW: f64 = 28.0;
/// Above the rows: the verdict.
const TOP: f64 = 34.0;

impl DrillReport {
    /// The phases per row on one time axis: the verdict on top, one row per L1 host and VM
    /// with each VM's blackout beside it, the kexecs marked across every row, a time axis with
    /// ticks, and a legend of the phases drawn.
    pub fn to_svg(&self) -> String {
        let mut rows: Vec<&str> = vec![HOST_ROW];
        for span in &self.timeline {
            if !rows.contains(&span.row.as_str()) {
                rows.push(&span.row);
            }
        }
        let total = self.total_s.max(1.0);
        let x = |s: f64| LEFT + s / total * WIDTH;
        let rows_end = TOP + ROW * rows.len() as f64;
        let axis = rows_end + 8.0;
        let legend = axis + 50.0;
        let height = legend + 24.0;
        let mut svg = String::new();
        let verdict = self.verdict();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="11">"#,
            LEFT + WIDTH + 10.0
        );
        let _ = writeln!(svg, r#"<title>{}</title>"#, escape(&verdict));
        let _ = writeln!(
            svg,
            r#"<text x="4" y="18" font-size="14" font-weight="bold" fill="{}">{}</text>"#,
            if self.ok { "#238b45" } else { "#cb181d" },
            escape(&verdict)
        );
        for (i, row) in rows.iter().enumerate() {
            self.draw_row(&mut svg, row, TOP + ROW * i as f64, &x);
        }
        self.mark_kexecs(&mut svg, rows_end, &x);
        draw_axis(&mut svg, axis, total, &x);
        self.draw_legend(&mut svg, legend);
        svg.push_str("</svg>\n");
        svg
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

    fn draw_row(&self, svg: &mut String, row: &str, y: f64, x: &dyn Fn(f64) -> f64) {
        let _ = writeln!(
            svg,
            r#"<text x="4" y="{}">{}</text>"#,
            y + 16.0,
            escape(row)
        );
        for span in self.timeline.iter().filter(|s| s.row == row) {
            let (x0, x1) = (x(span.start_s), x(span.end_s));
            let _ = writeln!(
                svg,
                r#"<rect x="{x0:.1}" y="{y}" width="{:.1}" height="22" fill="{}"><title>{} {}: {:.1} s</title></rect>"#,
                (x1 - x0).max(1.0),
                colour(&span.phase),
                escape(row),
                escape(&span.phase),
                span.end_s - span.start_s
            );
            if x1 - x0 > 40.0 {
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{}">{}</text>"#,
                    x0 + 3.0,
                    y + 15.0,
                    escape(&span.phase)
                );
            }
        }
        // Each VM's blackout by luvmm's clock beside the one its guest saw, per update.
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
        if !figures.is_empty() {
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LEFT + WIDTH,
                y + 16.0,
                escape(&figures.join("; "))
            );
        }
    }

    /// A dashed line across every row where each kexec starts, and where the next kernel's
    /// drill starts (L1 booted).
    fn mark_kexecs(&self, svg: &mut String, rows_end: f64, x: &dyn Fn(f64) -> f64) {
        let kexecs = self
            .timeline
            .iter()
            .filter(|s| s.row == HOST_ROW && s.phase == "kexec");
        for span in kexecs {
            for (at, label) in [(span.start_s, "kexec"), (span.end_s, "L1 booted")] {
                let _ = writeln!(
                    svg,
                    r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{rows_end}" stroke="#252525" stroke-dasharray="4 3"/><text x="{1:.1}" y="{2}" font-size="10">{label}</text>"##,
                    x(at),
                    x(at) + 2.0,
                    TOP - 3.0
                );
            }
        }
    }

    /// One swatch per phase drawn, in the order first drawn.
    fn draw_legend(&self, svg: &mut String, y: f64) {
        let mut phases: Vec<&str> = Vec::new();
        for span in &self.timeline {
            if !phases.contains(&span.phase.as_str()) {
                phases.push(&span.phase);
            }
        }
        let mut at = LEFT;
        for phase in phases {
            let _ = writeln!(
                svg,
                r#"<rect x="{at:.1}" y="{}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{}">{}</text>"#,
                y - 10.0,
                colour(phase),
                at + 16.0,
                y,
                escape(phase)
            );
            at += 24.0 + 7.0 * phase.len() as f64;
        }
    }
}

/// The time axis: a line from 0 to `total` seconds with ticks at a round step.
fn draw_axis(svg: &mut String, y: f64, total: f64, x: &dyn Fn(f64) -> f64) {
    let _ = writeln!(
        svg,
        r#"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="black"/>"#,
        LEFT + WIDTH
    );
    let step = tick_step(total);
    let mut tick = 0.0;
    while tick <= total + 1e-9 {
        let _ = writeln!(
            svg,
            r#"<line x1="{0:.1}" y1="{y}" x2="{0:.1}" y2="{1}" stroke="black"/><text x="{0:.1}" y="{2}" text-anchor="middle">{3} s</text>"#,
            x(tick),
            y + 5.0,
            y + 17.0,
            tick
        );
        tick += step;
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="end" font-size="10">seconds since L1 started, by the host's clock</text>"#,
        LEFT + WIDTH,
        y + 29.0
    );
}

/// A round step that puts 5 to 12 ticks on `total` seconds.
fn tick_step(total: f64) -> f64 {
    const STEPS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0];
    STEPS
        .iter()
        .copied()
        .find(|step| total / step <= 12.0)
        .unwrap_or(1200.0)
}

fn colour(phase: &str) -> &'static str {
    match phase {
        "boot" | "agent" => "#9ecae1",
        "dma" | "check" | "running" => "#a1d99b",
        "prepare" | "preflight" => "#fdd49e",
        "stage" | "staged" => "#fee6ce",
        "paused" => "#fc9272",
        "kexec" => "#d94801",
        "restore" => "#bcbddc",
        "cancel" => "#fdae6b",
        _ => "#d9d9d9",
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::held;
    use super::tick_step;

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

    #[test]
    fn ticks_come_at_a_round_step() {
        assert_eq!(tick_step(8.0), 1.0);
        assert_eq!(tick_step(14.8), 2.0);
        assert_eq!(tick_step(160.0), 15.0);
        assert_eq!(tick_step(3000.0), 300.0);
    }
}
