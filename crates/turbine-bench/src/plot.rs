//! SVG plots of results: the TTFT distribution (as a CDF) and output throughput over time, one
//! line per run so that runs compare on one chart. Plain SVG, viewable in any browser.

use std::fmt::Write as _;

use crate::report::BenchResult;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
/// Most points drawn per CDF line.
const CDF_POINTS: usize = 400;
const COLOURS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// The CDF of successful requests' TTFT, one line per result; a log axis when TTFTs span more
/// than two orders of magnitude.
pub fn ttft_cdf(results: &[BenchResult]) -> String {
    let series: Vec<Series> = results
        .iter()
        .map(|r| {
            let mut t: Vec<f64> = r
                .records
                .iter()
                .filter(|x| x.error.is_none())
                .filter_map(|x| x.ttft)
                .map(|s| s * 1000.0)
                .collect();
            t.sort_by(f64::total_cmp);
            let n = t.len();
            // A few hundred steps draw the curve as well as thousands, at a fraction of the size.
            let stride = n.div_ceil(CDF_POINTS).max(1);
            let points = t
                .iter()
                .enumerate()
                .filter(|(i, _)| (i + 1) % stride == 0 || i + 1 == n)
                .map(|(i, &v)| (v, (i + 1) as f64 / n as f64))
                .collect();
            Series {
                label: r.meta.label.clone(),
                points,
            }
        })
        .collect();
    let (lo, hi) = x_range(&series);
    let log = lo > 0.0 && hi / lo > 100.0;
    line_chart(
        "Time to first token",
        "TTFT (ms)",
        "fraction of requests",
        &series,
        log,
        true,
    )
}

/// Output tokens per second over the run, one line per result.
pub fn throughput(results: &[BenchResult]) -> String {
    let series: Vec<Series> = results
        .iter()
        .map(|r| Series {
            label: r.meta.label.clone(),
            points: r
                .output_tokens_per_s
                .iter()
                .enumerate()
                .map(|(i, &v)| ((i as f64 + 0.5) * r.timeline_bin_s, v))
                .collect(),
        })
        .collect();
    line_chart(
        "Output throughput",
        "time since start (s)",
        "output tokens/s",
        &series,
        false,
        false,
    )
}

fn x_range(series: &[Series]) -> (f64, f64) {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let lo = xs.clone().fold(f64::INFINITY, f64::min);
    let hi = xs.fold(f64::NEG_INFINITY, f64::max);
    if lo.is_finite() && hi.is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    }
}

/// A line chart; `steps` draws a staircase (for CDFs).
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series], log_x: bool, steps: bool) -> String {
    let (mut x_lo, mut x_hi) = x_range(series);
    if !log_x {
        x_lo = x_lo.min(0.0);
    }
    if x_hi <= x_lo {
        x_hi = x_lo + 1.0;
    }
    let y_hi = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let y_hi = if steps { 1.0 } else { nice_ceiling(y_hi) };
    let (px_w, px_h) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let tx = |x: f64| {
        let f = if log_x {
            (x.max(x_lo).ln() - x_lo.ln()) / (x_hi.ln() - x_lo.ln())
        } else {
            (x - x_lo) / (x_hi - x_lo)
        };
        LEFT + f * px_w
    };
    let ty = |y: f64| TOP + px_h - (y / y_hi) * px_h;

    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        LEFT + px_w / 2.0,
        esc(title)
    );
    // Grid and ticks.
    let x_ticks: Vec<f64> = if log_x {
        log_ticks(x_lo, x_hi)
    } else {
        linear_ticks(x_lo, x_hi)
    };
    for x in x_ticks {
        let px = tx(x);
        let _ = writeln!(
            o,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#e0e0e0"/>"##,
            TOP + px_h
        );
        let _ = writeln!(
            o,
            r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + px_h + 16.0,
            fmt_tick(x)
        );
    }
    for y in linear_ticks(0.0, y_hi) {
        let py = ty(y);
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e0e0e0"/>"##,
            LEFT + px_w
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            py + 4.0,
            fmt_tick(y)
        );
    }
    let _ = writeln!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{px_w}" height="{px_h}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}{}</text>"#,
        LEFT + px_w / 2.0,
        H - 12.0,
        esc(x_label),
        if log_x { " (log scale)" } else { "" }
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + px_h / 2.0,
        esc(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut path = String::new();
        let mut prev_y: Option<f64> = if steps { Some(0.0) } else { None };
        for (j, &(x, y)) in s.points.iter().enumerate() {
            let (px, py) = (tx(x), ty(y));
            if j == 0 {
                let start_y = prev_y.map_or(py, ty);
                let _ = write!(path, "M{px:.1},{start_y:.1}");
            } else if steps {
                let _ = write!(path, " H{px:.1}");
            }
            let _ = write!(path, " L{px:.1},{py:.1}");
            prev_y = Some(y);
        }
        if !path.is_empty() {
            let _ = writeln!(
                o,
                r#"<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.8"/>"#
            );
        }
        let ly = TOP + 14.0 + 20.0 * i as f64;
        let lx = LEFT + px_w + 14.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/>"#,
            lx + 22.0
        );
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}">{}</text>"#,
            lx + 28.0,
            ly + 4.0,
            esc(&s.label)
        );
    }
    o.push_str("</svg>\n");
    o
}

/// The smallest 1, 2 or 5 times a power of ten at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

/// About five round ticks from `lo` to `hi`.
fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let step = nice_ceiling((hi - lo) / 5.0);
    let first = (lo / step).ceil() * step;
    (0..=10)
        .map(|i| first + step * f64::from(i))
        .take_while(|&t| t <= hi + step * 1e-9)
        .collect()
}

/// Powers of ten (and their doubles and fives when few) between `lo` and `hi`.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut p = 10f64.powf(lo.log10().floor());
    while p <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = m * p;
            if t >= lo && t <= hi {
                ticks.push(t);
            }
        }
        p *= 10.0;
    }
    ticks
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 {
        let k = v / 1000.0;
        if k.fract() == 0.0 {
            format!("{k:.0}k")
        } else {
            format!("{k:.1}k")
        }
    } else if v.abs() >= 1.0 && v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cdf_keeps_its_ends_and_a_bounded_number_of_steps() {
        use crate::client::RequestRecord;
        use crate::report::{BenchResult, Meta};
        let records: Vec<RequestRecord> = (1..=5000)
            .map(|i| RequestRecord {
                ttft: Some(f64::from(i) / 1000.0),
                output_tokens: 1,
                ..Default::default()
            })
            .collect();
        let meta = Meta {
            label: "x".into(),
            url: String::new(),
            model: String::new(),
            endpoint: String::new(),
            workload: String::new(),
            arrival: String::new(),
            started_at: 0,
        };
        let svg = ttft_cdf(&[BenchResult::new(meta, records, 1.0, None)]);
        let path = svg.lines().find(|l| l.starts_with("<path")).unwrap();
        let steps = path.matches(" L").count();
        assert!((300..=CDF_POINTS + 1).contains(&steps), "{steps}");
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(
            linear_ticks(0.0, 1.0),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        assert_eq!(linear_ticks(0.0, 950.0), vec![0.0, 200.0, 400.0, 600.0, 800.0]);
        assert_eq!(
            log_ticks(3.0, 1200.0),
            vec![5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
        );
        assert_eq!(nice_ceiling(730.0), 1000.0);
        assert_eq!(fmt_tick(2500.0), "2.5k");
        assert_eq!(fmt_tick(3000.0), "3k");
        assert_eq!(fmt_tick(0.25), "0.25");
    }

    #[test]
    fn a_chart_has_one_line_and_legend_entry_per_series() {
        let series = vec![
            Series {
                label: "kv".into(),
                points: vec![(10.0, 0.5), (20.0, 1.0)],
            },
            Series {
                label: "round<robin>".into(),
                points: vec![(5.0, 0.5), (4000.0, 1.0)],
            },
        ];
        let svg = line_chart("t", "x", "y", &series, true, true);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<path").count(), 2);
        assert!(svg.contains("round&lt;robin&gt;"));
        assert!(svg.contains("(log scale)"));
        // Every coordinate is a number inside the picture.
        for cap in svg
            .split(['M', 'L', 'H', ',', ' ', '"'])
            .filter_map(|t| t.parse::<f64>().ok())
        {
            assert!(cap.is_finite() && (-1.0..=W.max(H) + 1.0).contains(&cap), "{cap}");
        }
    }
}
