//! The SVG timeline: every row's phases on one time axis.

use std::fmt::Write as _;

use super::DrillReport;
use crate::drill::event::HOST_ROW;

impl DrillReport {
    /// The phases per row on one time axis.
    pub fn to_svg(&self) -> String {
        const LEFT: f64 = 70.0;
        const WIDTH: f64 = 1000.0;
        const ROW: f64 = 28.0;
        let mut rows: Vec<&str> = vec![HOST_ROW];
        for span in &self.timeline {
            if !rows.contains(&span.row.as_str()) {
                rows.push(&span.row);
            }
        }
        let total = self.total_s.max(1.0);
        let x = |s: f64| LEFT + s / total * WIDTH;
        let height = ROW * rows.len() as f64 + 40.0;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="11">"#,
            LEFT + WIDTH + 10.0
        );
        let _ = writeln!(
            svg,
            r#"<title>luvmm drill: {}</title>"#,
            if self.ok { "OK" } else { "FAILED" }
        );
        for (i, row) in rows.iter().enumerate() {
            let y = 10.0 + ROW * i as f64;
            let _ = writeln!(
                svg,
                r#"<text x="4" y="{}">{}</text>"#,
                y + 16.0,
                escape(row)
            );
            for span in self.timeline.iter().filter(|s| s.row == *row) {
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
                .flat_map(|r| r.vms.iter().filter(|v| v.vm == *row))
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
        let axis = 10.0 + ROW * rows.len() as f64 + 14.0;
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="{axis}">0 s</text><text x="{}" y="{axis}" text-anchor="end">{total:.0} s (host clock)</text>"#,
            LEFT + WIDTH
        );
        svg.push_str("</svg>\n");
        svg
    }
}

fn colour(phase: &str) -> &'static str {
    match phase {
        "boot" | "agent" => "#9ecae1",
        "dma" | "check" | "running" => "#a1d99b",
        "prepare" | "preflight" => "#fdd49e",
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
}
