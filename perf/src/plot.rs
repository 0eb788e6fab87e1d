//! Latency-percentile plots as SVG, drawn by hand (no font or image library
//! needed): the HdrHistogram view, with the x axis at 1/(1 − percentile) on a
//! log scale so that p50, p90, p99, p99.9 and p99.99 are evenly spaced, and
//! latency on a linear y axis. One line per target.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#444444", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e",
];

/// Highest percentile drawn: 99.99.
const MAX_NINES: f64 = 4.0;

/// Draws `series` (name, histogram in nanoseconds) as an SVG document.
pub fn percentile_svg(title: &str, series: &[(String, &Histogram<u64>)]) -> String {
    let points: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, h)| {
            let pts = (0..=80)
                .map(|i| {
                    let nines = MAX_NINES * i as f64 / 80.0;
                    let q = 1.0 - 10f64.powf(-nines);
                    (nines, h.value_at_quantile(q) as f64 / 1000.0)
                })
                .collect();
            (name.clone(), pts)
        })
        .collect();
    let ymax = points
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, y)| y))
        .fold(1.0f64, f64::max);
    let ymax = nice_ceiling(ymax);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |nines: f64| LEFT + pw * nines / MAX_NINES;
    let y = |us: f64| TOP + ph * (1.0 - us / ymax);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        LEFT + pw / 2.0,
        escape(title)
    );
    for (nines, label) in [
        (0.0, "0%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
    ] {
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#dddddd"/><text x="{0}" y="{3}" text-anchor="middle">{label}</text>"##,
            x(nines),
            TOP,
            TOP + ph,
            TOP + ph + 18.0
        );
    }
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{0}" x2="{1}" y2="{0}" stroke="#dddddd"/><text x="{2}" y="{3}" text-anchor="end">{4}</text>"##,
            y(v),
            LEFT + pw,
            LEFT - 6.0,
            y(v) + 4.0,
            crate::report::fmt(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        LEFT + pw / 2.0,
        H - 10.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">latency (µs)</text>"#,
        TOP + ph / 2.0
    );
    for (i, (name, pts)) in points.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|&(n, us)| format!("{:.1},{:.1}", x(n), y(us)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{2}" y="{3}">{4}</text>"#,
            LEFT + pw + 12.0,
            LEFT + pw + 32.0,
            LEFT + pw + 38.0,
            ly + 4.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn nice_ceiling(v: f64) -> f64 {
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_one_line_per_series() {
        let mut h = crate::loadgen::new_histogram();
        for v in 1..1000u64 {
            h.record(v * 1000).unwrap();
        }
        let svg = percentile_svg("t", &[("a".into(), &h), ("b".into(), &h)]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.ends_with("</svg>\n"));
    }
}
