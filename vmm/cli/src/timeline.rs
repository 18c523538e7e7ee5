//! The SVG timeline an operator looks at after an update or a drill: every row's phases on
//! one time axis, with what is needed to read it (the verdict as title, each row's figures
//! beside it, marks across the rows, an axis with ticks, a legend of the phases drawn).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One phase of one timeline row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Span {
    pub row: String,
    pub phase: String,
    pub start_s: f64,
    pub end_s: f64,
}

/// What one picture shows.
pub struct Timeline<'a> {
    /// The verdict, on top in green (`ok`) or red.
    pub title: String,
    pub ok: bool,
    /// Rows drawn first, in this order; rows of other spans follow in order of appearance.
    pub rows: Vec<&'a str>,
    pub spans: &'a [Span],
    /// Figures written at the right end of a row (its blackout, say).
    pub notes: BTreeMap<&'a str, String>,
    /// Dashed lines across every row: seconds and label.
    pub marks: Vec<(f64, &'a str)>,
    pub total_s: f64,
    /// What the axis's seconds count from.
    pub axis_label: &'a str,
}

/// Where things go, in SVG units.
const LEFT: f64 = 70.0;
const WIDTH: f64 = 1000.0;
const ROW: f64 = 28.0;
/// Above the rows: the verdict.
const TOP: f64 = 34.0;

impl Timeline<'_> {
    pub fn to_svg(&self) -> String {
        let mut rows = self.rows.clone();
        for span in self.spans {
            if !rows.contains(&span.row.as_str()) {
                rows.push(&span.row);
            }
        }
        let total = if self.total_s > 0.0 {
            self.total_s
        } else {
            1.0
        };
        let x = |s: f64| LEFT + s / total * WIDTH;
        let rows_end = TOP + ROW * rows.len() as f64;
        let axis = rows_end + 8.0;
        let legend = axis + 50.0;
        let height = legend + 24.0;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="11">"#,
            LEFT + WIDTH + 10.0
        );
        let _ = writeln!(svg, r#"<title>{}</title>"#, escape(&self.title));
        let _ = writeln!(
            svg,
            r#"<text x="4" y="18" font-size="14" font-weight="bold" fill="{}">{}</text>"#,
            if self.ok { "#238b45" } else { "#cb181d" },
            escape(&self.title)
        );
        for (i, row) in rows.iter().enumerate() {
            self.draw_row(&mut svg, row, TOP + ROW * i as f64, &x);
        }
        for (at, label) in &self.marks {
            let _ = writeln!(
                svg,
                r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{rows_end}" stroke="#252525" stroke-dasharray="4 3"/><text x="{1:.1}" y="{2}" font-size="10">{label}</text>"##,
                x(*at),
                x(*at) + 2.0,
                TOP - 3.0
            );
        }
        self.draw_axis(&mut svg, axis, total, &x);
        self.draw_legend(&mut svg, legend);
        svg.push_str("</svg>\n");
        svg
    }

    fn draw_row(&self, svg: &mut String, row: &str, y: f64, x: &dyn Fn(f64) -> f64) {
        let _ = writeln!(
            svg,
            r#"<text x="4" y="{}">{}</text>"#,
            y + 16.0,
            escape(row)
        );
        for span in self.spans.iter().filter(|s| s.row == row) {
            let (x0, x1) = (x(span.start_s), x(span.end_s));
            let _ = writeln!(
                svg,
                r#"<rect x="{x0:.1}" y="{y}" width="{:.1}" height="22" fill="{}"><title>{} {}: {}</title></rect>"#,
                (x1 - x0).max(1.0),
                colour(&span.phase),
                escape(row),
                escape(&span.phase),
                duration(span.end_s - span.start_s)
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
        if let Some(note) = self.notes.get(row) {
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LEFT + WIDTH,
                y + 16.0,
                escape(note)
            );
        }
    }

    /// The time axis: a line from 0 to `total` seconds with ticks at a round step.
    fn draw_axis(&self, svg: &mut String, y: f64, total: f64, x: &dyn Fn(f64) -> f64) {
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
            r#"<text x="{}" y="{}" text-anchor="end" font-size="10">{}</text>"#,
            LEFT + WIDTH,
            y + 29.0,
            escape(self.axis_label)
        );
    }

    /// One swatch per phase drawn, in the order first drawn.
    fn draw_legend(&self, svg: &mut String, y: f64) {
        let mut phases: Vec<&str> = Vec::new();
        for span in self.spans {
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

/// A span's length for its tooltip: ms below a second.
fn duration(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:.1} ms", seconds * 1e3)
    } else {
        format!("{seconds:.1} s")
    }
}

/// A round step that puts at most 12 ticks on `total` seconds.
pub fn tick_step(total: f64) -> f64 {
    const STEPS: [f64; 16] = [
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0,
    ];
    const LONG: [f64; 4] = [120.0, 300.0, 600.0, 1200.0];
    STEPS
        .iter()
        .chain(LONG.iter())
        .copied()
        .find(|step| total / step <= 12.0)
        .unwrap_or(2400.0)
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
    use super::tick_step;

    #[test]
    fn ticks_come_at_a_round_step() {
        assert_eq!(tick_step(8.0), 1.0);
        assert_eq!(tick_step(0.3), 0.05);
        assert_eq!(tick_step(100.0), 10.0);
        assert_eq!(tick_step(5000.0), 600.0);
    }
}
