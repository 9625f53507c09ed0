//! Training curves as a picture: training and evaluation loss against the
//! step in a large top panel, the learning rate in a smaller panel below it
//! on the same step axis.
//!
//! The chart is laid out once as a list of shapes ([`Scene`]) and drawn by
//! two backends: SVG text (vector; any browser or viewer shows it) and PNG
//! through the small rasterizer in `raster.rs`, which uses a built-in bitmap
//! font so that no font files or system libraries are needed.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use serde_json::Value;

use super::raster;
use super::scene::{Anchor, Rgb, Scene, Shape, TextMetrics, TextRole};

/// Draws `log_history` (transformers' `trainer_state.json` entries, or the
/// scalar lines of `metrics.jsonl`: objects with `step` and some of `loss`,
/// `eval_loss`, `learning_rate`) to `path`: PNG when the extension is
/// `.png`, SVG otherwise. Entries without a step, and non-finite values, are
/// skipped; an empty history still gives a chart that says so. Creates the
/// parent directory if needed.
pub fn plot_training_curves(log_history: &[Value], path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let is_png = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_png {
        crate::fsutil::write_atomic(path, &render_training_curves_png(log_history))
    } else {
        crate::fsutil::write_atomic(path, render_training_curves_svg(log_history).as_bytes())
    }
}

/// The chart as an SVG document (960×640).
pub fn render_training_curves_svg(log_history: &[Value]) -> String {
    let scene = layout(
        &Curves::from_history(log_history),
        960.0,
        640.0,
        &SvgMetrics,
    );
    to_svg(&scene)
}

/// The chart as a PNG file's bytes (1200×800, RGB).
pub fn render_training_curves_png(log_history: &[Value]) -> Vec<u8> {
    let scene = layout(
        &Curves::from_history(log_history),
        1200.0,
        800.0,
        &raster::RasterMetrics,
    );
    raster::render_png(&scene)
}

// ---------------------------------------------------------------- data

const TRAIN_COLOR: Rgb = Rgb(0x1f, 0x77, 0xb4); // matplotlib's tab:blue, tab:orange, tab:green
const EVAL_COLOR: Rgb = Rgb(0xff, 0x7f, 0x0e);
const LR_COLOR: Rgb = Rgb(0x2c, 0xa0, 0x2c);
const TEXT_COLOR: Rgb = Rgb(0x22, 0x22, 0x22);
const MUTED_COLOR: Rgb = Rgb(0x66, 0x66, 0x66);
const AXIS_COLOR: Rgb = Rgb(0x44, 0x44, 0x44);
const GRID_COLOR: Rgb = Rgb(0xe3, 0xe3, 0xe3);
const WHITE: Rgb = Rgb(0xff, 0xff, 0xff);

struct Series {
    label: &'static str,
    color: Rgb,
    points: Vec<(f64, f64)>,
    /// Evaluation points are sparse, so each one gets a marker.
    markers: bool,
}

struct Curves {
    train: Series,
    eval: Series,
    lr: Series,
}

impl Curves {
    fn from_history(history: &[Value]) -> Self {
        let series = |key: &str| {
            let mut points: Vec<(f64, f64)> = history
                .iter()
                .filter_map(|entry| {
                    let obj = entry.as_object()?;
                    let step = obj.get("step")?.as_f64()?;
                    let value = obj.get(key)?.as_f64()?;
                    (step.is_finite() && value.is_finite()).then_some((step, value))
                })
                .collect();
            // A resumed run can log steps out of order; lines must go left to right.
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            points
        };
        Curves {
            train: Series {
                label: "train loss",
                color: TRAIN_COLOR,
                points: series("loss"),
                markers: false,
            },
            eval: Series {
                label: "eval loss",
                color: EVAL_COLOR,
                points: series("eval_loss"),
                markers: true,
            },
            lr: Series {
                label: "learning rate",
                color: LR_COLOR,
                points: series("learning_rate"),
                markers: false,
            },
        }
    }

    fn all(&self) -> [&Series; 3] {
        [&self.train, &self.eval, &self.lr]
    }

    /// The numbers people look for first, most important first; the layout
    /// keeps as many as fit on the line under the title.
    fn summary_parts(&self) -> Vec<String> {
        let mut parts = Vec::new();
        let last_step = self
            .all()
            .iter()
            .filter_map(|s| s.points.last().map(|p| p.0))
            .fold(f64::NAN, f64::max);
        if last_step.is_finite() {
            let plural = if last_step == 1.0 { "" } else { "s" };
            parts.push(format!("{} step{plural}", fmt_sig(last_step)));
        }
        if let Some(&(_, last)) = self.train.points.last() {
            parts.push(format!("final train loss {}", fmt_sig(last)));
        }
        if let Some(&(step, best)) = self.eval.points.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
            parts.push(format!(
                "best eval loss {} (step {})",
                fmt_sig(best),
                fmt_sig(step)
            ));
        }
        if let Some(&(_, peak)) = self.lr.points.iter().max_by(|a, b| a.1.total_cmp(&b.1)) {
            parts.push(format!("peak lr {}", fmt_lr(peak)));
        }
        if parts.is_empty() {
            parts.push("nothing logged yet".to_string());
        }
        parts
    }
}

// ---------------------------------------------------------------- SVG metrics

struct SvgMetrics;

impl SvgMetrics {
    fn font_size(role: TextRole) -> f64 {
        match role {
            TextRole::Title => 20.0,
            TextRole::Subtitle => 13.0,
            TextRole::AxisLabel => 14.0,
            TextRole::Tick => 12.0,
            TextRole::Legend => 13.0,
            TextRole::Note => 14.0,
        }
    }
}

impl TextMetrics for SvgMetrics {
    fn width(&self, text: &str, role: TextRole) -> f64 {
        // Average advance of DejaVu Sans / Arial digits and lowercase is 0.55-0.64 em;
        // the generous end keeps legend boxes wide enough in either font.
        text.chars().count() as f64 * 0.62 * Self::font_size(role)
    }
    fn cap_height(&self, role: TextRole) -> f64 {
        0.72 * Self::font_size(role)
    }
}

// ---------------------------------------------------------------- layout

struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    labels: Vec<String>,
}

impl Axis {
    /// An axis showing `[lo, hi]` with a `margin` (fraction of the range) on
    /// both sides, so points at the ends are not drawn on the frame, and
    /// ticks at the 1-2-5 multiples inside it (matplotlib's style).
    fn new(lo: f64, hi: f64, target_ticks: usize, integer: bool, margin: f64) -> Self {
        let (lo, hi) = padded(lo, hi, margin);
        let step = nice_step(hi - lo, target_ticks, integer);
        let (first, last) = ((lo / step).ceil() as i64, (hi / step).floor() as i64);
        let ticks: Vec<f64> = (first..=last)
            .map(|k| {
                let t = k as f64 * step;
                // Snap float noise such as 2.7e-20 to 0.
                if t.abs() < step * 1e-9 {
                    0.0
                } else {
                    t
                }
            })
            .collect();
        let labels = tick_labels(&ticks, step);
        Axis {
            lo,
            hi,
            ticks,
            labels,
        }
    }
}

fn padded(lo: f64, hi: f64, margin: f64) -> (f64, f64) {
    if hi > lo {
        let m = (hi - lo) * margin;
        (lo - m, hi + m)
    } else {
        // One point or a flat line: open a window around it.
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - pad, hi + pad)
    }
}

/// A 1-2-5 step giving about `target` ticks over `span`.
fn nice_step(span: f64, target: usize, integer: bool) -> f64 {
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let step = mag
        * if norm < 1.5 {
            1.0
        } else if norm < 3.0 {
            2.0
        } else if norm < 7.0 {
            5.0
        } else {
            10.0
        };
    if integer {
        step.max(1.0).round()
    } else {
        step
    }
}

fn tick_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let max_abs = ticks.iter().fold(0.0f64, |m, t| m.max(t.abs()));
    let step_exp = step.log10().floor() as i32;
    if max_abs != 0.0 && !(1e-3..1e6).contains(&max_abs) {
        // Learning rates: a shared exponent, e.g. 0, 1e-4, 2e-4 or 5.0e-5, 1.0e-4, 1.5e-4.
        let exp = max_abs.log10().floor() as i32;
        let decimals = (exp - step_exp).max(0) as usize;
        ticks
            .iter()
            .map(|&t| {
                if t == 0.0 {
                    "0".to_string()
                } else {
                    format!("{:.*}e{}", decimals, t / 10f64.powi(exp), exp)
                }
            })
            .collect()
    } else {
        let decimals = (-step_exp).max(0) as usize;
        ticks.iter().map(|&t| format!("{t:.decimals$}")).collect()
    }
}

/// Learning rates read best in scientific notation: 5e-4, 2.5e-5.
fn fmt_lr(v: f64) -> String {
    if v == 0.0 || !v.is_finite() || v.abs() >= 1e-2 {
        return fmt_sig(v);
    }
    let s = format!("{:.3e}", v);
    let (mantissa, e) = s.split_once('e').unwrap_or((&s, "0"));
    format!(
        "{}e{e}",
        mantissa.trim_end_matches('0').trim_end_matches('.')
    )
}

/// A number with 4 significant digits and no trailing zeros (1.052, 0.0005, 300).
fn fmt_sig(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let exp = v.abs().log10().floor() as i32;
    if !(-4..6).contains(&exp) {
        let s = format!("{:.3e}", v);
        // 5.000e-4 → 5e-4
        let (mantissa, e) = s.split_once('e').unwrap_or((&s, "0"));
        let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
        return format!("{mantissa}e{e}");
    }
    let decimals = (3 - exp).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// One panel placed on the page: its pixel edges, the shared step axis and
/// its own value axis, which together map data to pixels.
struct Panel<'a> {
    top: f64,
    bottom: f64,
    left: f64,
    right: f64,
    x: &'a Axis,
    y: Axis,
    y_label: &'static str,
    series: Vec<&'a Series>,
    empty_note: &'static str,
}

impl Panel<'_> {
    fn sx(&self, v: f64) -> f64 {
        self.left + (v - self.x.lo) / (self.x.hi - self.x.lo) * (self.right - self.left)
    }

    fn sy(&self, v: f64) -> f64 {
        self.bottom - (v - self.y.lo) / (self.y.hi - self.y.lo) * (self.bottom - self.top)
    }
}

fn layout(curves: &Curves, width: f64, height: f64, m: &dyn TextMetrics) -> Scene {
    let x = step_axis(curves);
    let y_axes = [loss_axis(curves), lr_axis(curves)];
    let rows = Rows::new(height, m);
    let columns = plot_columns(width, &x, &y_axes, m);

    let mut shapes = vec![Shape::Rect {
        x: 0.0,
        y: 0.0,
        w: width,
        h: height,
        fill: Some(WHITE),
        stroke: None,
    }];
    draw_titles(&mut shapes, curves, width, &rows, m);
    for panel in &stack_panels(curves, &x, y_axes, &rows, columns) {
        draw_panel(&mut shapes, panel, m);
    }
    let (left, right) = columns;
    shapes.push(text(
        (left + right) / 2.0,
        rows.x_label_base,
        "step",
        TextRole::AxisLabel,
        TEXT_COLOR,
        Anchor::Middle,
    ));
    Scene {
        width,
        height,
        shapes,
    }
}

/// Shared by both panels; it starts at 0 (or earlier) like the run itself.
fn step_axis(curves: &Curves) -> Axis {
    let steps = curves
        .all()
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect::<Vec<_>>();
    let (smin, smax) = min_max(&steps).unwrap_or((0.0, 1.0));
    Axis::new(smin.min(0.0), smax, 8, true, 0.02)
}

/// Train and eval loss share one axis so the two curves can be compared.
fn loss_axis(curves: &Curves) -> Axis {
    let losses: Vec<f64> = curves
        .train
        .points
        .iter()
        .chain(&curves.eval.points)
        .map(|p| p.1)
        .collect();
    match min_max(&losses) {
        Some((lo, hi)) => Axis::new(lo, hi, 6, false, 0.05),
        None => Axis::new(0.0, 1.0, 5, false, 0.0),
    }
}

fn lr_axis(curves: &Curves) -> Axis {
    let lrs: Vec<f64> = curves.lr.points.iter().map(|p| p.1).collect();
    match min_max(&lrs) {
        // Schedules start from and decay to 0, so 0 stays on the axis.
        Some((lo, hi)) => Axis::new(lo.min(0.0), hi.max(0.0), 3, false, 0.05),
        None => Axis::new(0.0, 1.0, 2, false, 0.0),
    }
}

/// The vertical budget: text baselines and the plotting area, top to bottom.
struct Rows {
    title_base: f64,
    subtitle_base: f64,
    x_label_base: f64,
    plots_top: f64,
    plots_bottom: f64,
    /// Between the panels: the loss panel's step labels sit in it.
    gap: f64,
    loss_h: f64,
}

impl Rows {
    fn new(height: f64, m: &dyn TextMetrics) -> Self {
        let title_base = 14.0 + m.cap_height(TextRole::Title);
        let subtitle_base = title_base + 10.0 + m.cap_height(TextRole::Subtitle);
        let tick_h = m.cap_height(TextRole::Tick);
        let x_label_base = height - 14.0;
        let plots_top = (subtitle_base + 22.0).round();
        let plots_bottom =
            (x_label_base - m.cap_height(TextRole::AxisLabel) - 16.0 - tick_h - 10.0).round();
        let gap = (tick_h + 30.0).round();
        let loss_h = ((plots_bottom - plots_top - gap) * 0.68).round();
        Rows {
            title_base,
            subtitle_base,
            x_label_base,
            plots_top,
            plots_bottom,
            gap,
            loss_h,
        }
    }
}

/// The horizontal budget, as the plots' left and right edges: room for the
/// widest y tick label and the rotated axis label on the left, for half of
/// the last (centred) step label on the right.
fn plot_columns(width: f64, x: &Axis, y_axes: &[Axis], m: &dyn TextMetrics) -> (f64, f64) {
    let widest = y_axes
        .iter()
        .flat_map(|axis| &axis.labels)
        .map(|l| m.width(l, TextRole::Tick))
        .fold(0.0, f64::max);
    let left = (14.0 + m.cap_height(TextRole::AxisLabel) + 14.0 + widest + 8.0).round() + 0.5;
    let last_x_label = x.labels.last().map_or(0.0, |l| m.width(l, TextRole::Tick));
    let right = (width - 20.0 - last_x_label / 2.0).round() + 0.5;
    (left, right)
}

/// The title and, under it, as many summary numbers as fit the width.
fn draw_titles(
    shapes: &mut Vec<Shape>,
    curves: &Curves,
    width: f64,
    rows: &Rows,
    m: &dyn TextMetrics,
) {
    shapes.push(text(
        width / 2.0,
        rows.title_base,
        "Training curves",
        TextRole::Title,
        TEXT_COLOR,
        Anchor::Middle,
    ));
    let mut parts = curves.summary_parts();
    let summary = loop {
        let line = parts.join("  |  ");
        if parts.len() <= 1 || m.width(&line, TextRole::Subtitle) <= width - 40.0 {
            break line;
        }
        parts.pop();
    };
    shapes.push(text(
        width / 2.0,
        rows.subtitle_base,
        &summary,
        TextRole::Subtitle,
        MUTED_COLOR,
        Anchor::Middle,
    ));
}

/// Loss on top, learning rate below it. Edges sit on half pixels so that
/// 1-pixel lines cover one pixel row instead of blurring over two.
fn stack_panels<'a>(
    curves: &'a Curves,
    x: &'a Axis,
    [loss_axis, lr_axis]: [Axis; 2],
    rows: &Rows,
    (left, right): (f64, f64),
) -> [Panel<'a>; 2] {
    [
        Panel {
            top: rows.plots_top + 0.5,
            bottom: rows.plots_top + rows.loss_h + 0.5,
            left,
            right,
            x,
            y: loss_axis,
            y_label: "loss",
            series: vec![&curves.train, &curves.eval],
            empty_note: "no loss logged",
        },
        Panel {
            top: rows.plots_top + rows.loss_h + rows.gap + 0.5,
            bottom: rows.plots_bottom + 0.5,
            left,
            right,
            x,
            y: lr_axis,
            y_label: "learning rate",
            series: vec![&curves.lr],
            empty_note: "no learning rate logged",
        },
    ]
}

fn draw_panel(shapes: &mut Vec<Shape>, p: &Panel, m: &dyn TextMetrics) {
    draw_value_grid(shapes, p, m);
    draw_step_grid(shapes, p, m);
    draw_frame(shapes, p, m);
    let drawn: Vec<&Series> = p
        .series
        .iter()
        .copied()
        .filter(|s| !s.points.is_empty())
        .collect();
    if drawn.is_empty() {
        let y = (p.top + p.bottom) / 2.0 + m.cap_height(TextRole::Note) / 2.0;
        shapes.push(text(
            (p.left + p.right) / 2.0,
            y,
            p.empty_note,
            TextRole::Note,
            MUTED_COLOR,
            Anchor::Middle,
        ));
        return;
    }
    let screen_points = draw_series(shapes, p, &drawn);
    draw_legend(shapes, p, &drawn, &screen_points, m);
}

/// Horizontal grid lines, tick marks and labels for the value axis.
fn draw_value_grid(shapes: &mut Vec<Shape>, p: &Panel, m: &dyn TextMetrics) {
    let tick_h = m.cap_height(TextRole::Tick);
    for (t, label) in p.y.ticks.iter().zip(&p.y.labels) {
        let y = p.sy(*t).round() + 0.5;
        shapes.push(Shape::Line {
            x1: p.left,
            y1: y,
            x2: p.right,
            y2: y,
            color: GRID_COLOR,
            width: 1.0,
        });
        shapes.push(Shape::Line {
            x1: p.left - 5.0,
            y1: y,
            x2: p.left,
            y2: y,
            color: AXIS_COLOR,
            width: 1.0,
        });
        shapes.push(text(
            p.left - 8.0,
            y + tick_h / 2.0,
            label,
            TextRole::Tick,
            TEXT_COLOR,
            Anchor::End,
        ));
    }
}

/// Vertical grid lines, tick marks and labels for the step axis; each panel
/// gets its own labels so the learning rate reads without looking up.
fn draw_step_grid(shapes: &mut Vec<Shape>, p: &Panel, m: &dyn TextMetrics) {
    let tick_h = m.cap_height(TextRole::Tick);
    for (t, label) in p.x.ticks.iter().zip(&p.x.labels) {
        let xx = p.sx(*t).round() + 0.5;
        shapes.push(Shape::Line {
            x1: xx,
            y1: p.top,
            x2: xx,
            y2: p.bottom,
            color: GRID_COLOR,
            width: 1.0,
        });
        shapes.push(Shape::Line {
            x1: xx,
            y1: p.bottom,
            x2: xx,
            y2: p.bottom + 5.0,
            color: AXIS_COLOR,
            width: 1.0,
        });
        shapes.push(text(
            xx,
            p.bottom + 8.0 + tick_h,
            label,
            TextRole::Tick,
            TEXT_COLOR,
            Anchor::Middle,
        ));
    }
}

/// The panel's border and its rotated value-axis label, clear of the widest
/// tick label.
fn draw_frame(shapes: &mut Vec<Shape>, p: &Panel, m: &dyn TextMetrics) {
    shapes.push(Shape::Rect {
        x: p.left,
        y: p.top,
        w: p.right - p.left,
        h: p.bottom - p.top,
        fill: None,
        stroke: Some(AXIS_COLOR),
    });
    let widest =
        p.y.labels
            .iter()
            .map(|l| m.width(l, TextRole::Tick))
            .fold(0.0, f64::max);
    shapes.push(Shape::Text {
        x: p.left - 8.0 - widest - 12.0,
        y: (p.top + p.bottom) / 2.0,
        text: p.y_label.to_string(),
        role: TextRole::AxisLabel,
        color: TEXT_COLOR,
        anchor: Anchor::Middle,
        vertical: true,
    });
}

/// The curves themselves; returns every drawn point in pixels, which the
/// legend avoids.
fn draw_series(shapes: &mut Vec<Shape>, p: &Panel, drawn: &[&Series]) -> Vec<(f64, f64)> {
    let mut screen_points = Vec::new();
    for s in drawn {
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(a, b)| (p.sx(a), p.sy(b))).collect();
        screen_points.extend_from_slice(&pts);
        if pts.len() > 1 {
            shapes.push(Shape::Polyline {
                points: pts.clone(),
                color: s.color,
                width: 2.0,
            });
        }
        // A lone point would draw no line at all.
        if s.markers || pts.len() == 1 {
            for &(px, py) in &pts {
                shapes.push(Shape::Marker {
                    x: px,
                    y: py,
                    r: 4.0,
                    color: s.color,
                });
            }
        }
    }
    screen_points
}

/// Width of a legend row's line sample.
const LEGEND_SWATCH: f64 = 26.0;

fn draw_legend(
    shapes: &mut Vec<Shape>,
    p: &Panel,
    drawn: &[&Series],
    screen_points: &[(f64, f64)],
    m: &dyn TextMetrics,
) {
    let row_h = m.cap_height(TextRole::Legend) + 10.0;
    let text_w = drawn
        .iter()
        .map(|s| m.width(s.label, TextRole::Legend))
        .fold(0.0, f64::max);
    let size = (
        (LEGEND_SWATCH + 8.0 + text_w + 20.0).round(),
        (row_h * drawn.len() as f64 + 10.0).round(),
    );
    let (cx, cy) = legend_corner(p, size, screen_points);
    shapes.push(Shape::Rect {
        x: cx,
        y: cy,
        w: size.0,
        h: size.1,
        fill: Some(WHITE),
        stroke: Some(Rgb(0xbb, 0xbb, 0xbb)),
    });
    for (i, s) in drawn.iter().enumerate() {
        let mid = cy + 5.0 + row_h * (i as f64 + 0.5);
        let (x0, x1) = (cx + 10.0, cx + 10.0 + LEGEND_SWATCH);
        shapes.push(Shape::Line {
            x1: x0,
            y1: mid,
            x2: x1,
            y2: mid,
            color: s.color,
            width: 2.0,
        });
        if s.markers {
            shapes.push(Shape::Marker {
                x: (x0 + x1) / 2.0,
                y: mid,
                r: 4.0,
                color: s.color,
            });
        }
        let baseline = mid + m.cap_height(TextRole::Legend) / 2.0;
        shapes.push(text(
            x1 + 8.0,
            baseline,
            s.label,
            TextRole::Legend,
            TEXT_COLOR,
            Anchor::Start,
        ));
    }
}

/// The legend goes in the corner that covers the fewest data points
/// (matplotlib's loc="best", simplified); segment midpoints count too, so a
/// line crossing a corner between two far-apart points still counts.
fn legend_corner(p: &Panel, (w, h): (f64, f64), screen_points: &[(f64, f64)]) -> (f64, f64) {
    let inset = 10.0;
    let corners = [
        (p.right - inset - w, p.top + inset),
        (p.left + inset, p.top + inset),
        (p.right - inset - w, p.bottom - inset - h),
        (p.left + inset, p.bottom - inset - h),
    ];
    let covered = |&(cx, cy): &(f64, f64)| {
        let inside = |&(px, py): &(f64, f64)| {
            px >= cx - 6.0 && px <= cx + w + 6.0 && py >= cy - 6.0 && py <= cy + h + 6.0
        };
        let midpoints = screen_points
            .windows(2)
            .map(|ab| ((ab[0].0 + ab[1].0) / 2.0, (ab[0].1 + ab[1].1) / 2.0));
        screen_points.iter().filter(|pt| inside(pt)).count()
            + midpoints.filter(|pt| inside(pt)).count()
    };
    let (cx, cy) = corners
        .iter()
        .copied()
        .min_by_key(|c| covered(c))
        .unwrap_or(corners[0]);
    (cx.round() + 0.5, cy.round() + 0.5)
}

fn text(x: f64, y: f64, s: &str, role: TextRole, color: Rgb, anchor: Anchor) -> Shape {
    Shape::Text {
        x,
        y,
        text: s.to_string(),
        role,
        color,
        anchor,
        vertical: false,
    }
}

fn min_max(values: &[f64]) -> Option<(f64, f64)> {
    let mut it = values.iter().copied();
    let first = it.next()?;
    Some(it.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v))))
}

// ---------------------------------------------------------------- SVG

fn hex(c: Rgb) -> String {
    format!("#{:02x}{:02x}{:02x}", c.0, c.1, c.2)
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(c),
        }
    }
    out
}

fn to_svg(scene: &Scene) -> String {
    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#,
        w = scene.width,
        h = scene.height
    );
    for shape in &scene.shapes {
        write_svg_shape(&mut s, shape);
    }
    s.push_str("</svg>\n");
    s
}

/// One element per shape, on its own line.
fn write_svg_shape(s: &mut String, shape: &Shape) {
    match shape {
        Shape::Rect {
            x,
            y,
            w,
            h,
            fill,
            stroke,
        } => {
            let fill = fill.map_or("none".to_string(), hex);
            let stroke = stroke.map_or(String::new(), |c| {
                format!(r#" stroke="{}" stroke-width="1""#, hex(c))
            });
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{fill}"{stroke}/>"#
            );
        }
        Shape::Line {
            x1,
            y1,
            x2,
            y2,
            color,
            width,
        } => {
            let _ = writeln!(
                s,
                r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{}" stroke-width="{width}"/>"#,
                hex(*color)
            );
        }
        Shape::Polyline {
            points,
            color,
            width,
        } => write_svg_polyline(s, points, *color, *width),
        Shape::Marker { x, y, r, color } => {
            let _ = writeln!(
                s,
                r#"<circle cx="{x:.2}" cy="{y:.2}" r="{r}" fill="{}" stroke="white" stroke-width="1.5"/>"#,
                hex(*color)
            );
        }
        Shape::Text {
            x,
            y,
            text,
            role,
            color,
            anchor,
            vertical,
        } => write_svg_text(s, (*x, *y), text, *role, *color, *anchor, *vertical),
    }
}

fn write_svg_polyline(s: &mut String, points: &[(f64, f64)], color: Rgb, width: f64) {
    let pts: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{x:.2},{y:.2}"))
        .collect();
    let _ = writeln!(
        s,
        r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="{width}" stroke-linejoin="round" stroke-linecap="round"/>"#,
        pts.join(" "),
        hex(color)
    );
}

fn write_svg_text(
    s: &mut String,
    (x, y): (f64, f64),
    text: &str,
    role: TextRole,
    color: Rgb,
    anchor: Anchor,
    vertical: bool,
) {
    let anchor = match anchor {
        Anchor::Start => "start",
        Anchor::Middle => "middle",
        Anchor::End => "end",
    };
    let weight = if matches!(role, TextRole::Title) {
        r#" font-weight="bold""#
    } else {
        ""
    };
    // Rotating about the anchor point keeps the baseline where the layout put it.
    let rotate = if vertical {
        format!(r#" transform="rotate(-90 {x:.1} {y:.1})""#)
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        r#"<text x="{x:.1}" y="{y:.1}" font-size="{}" fill="{}" text-anchor="{anchor}"{weight}{rotate}>{}</text>"#,
        SvgMetrics::font_size(role),
        hex(color),
        xml_escape(text)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes() {
        let x = Axis::new(0.0, 300.0, 8, true, 0.02);
        assert_eq!((x.lo, x.hi), (-6.0, 306.0));
        assert_eq!(x.ticks, [0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0]);
        let lr = Axis::new(0.0, 5e-4, 3, false, 0.05);
        assert_eq!(lr.labels, ["0", "2e-4", "4e-4"]);
        // A single point gets a window instead of a zero-width range.
        let one = Axis::new(5.0, 5.0, 8, true, 0.02);
        assert!(one.lo < 5.0 && one.hi > 5.0 && one.ticks.contains(&5.0));
        let zero = Axis::new(0.0, 0.0, 5, false, 0.05);
        assert!(zero.lo < 0.0 && zero.hi > 0.0 && zero.ticks.contains(&0.0));
        assert_eq!(nice_step(0.5, 8, true), 1.0);
    }

    #[test]
    fn labels() {
        assert_eq!(tick_labels(&[0.0, 50.0, 100.0], 50.0), ["0", "50", "100"]);
        assert_eq!(tick_labels(&[0.5, 1.0, 1.5], 0.5), ["0.5", "1.0", "1.5"]);
        assert_eq!(
            tick_labels(&[0.0, 2e-4, 4e-4, 6e-4], 2e-4),
            ["0", "2e-4", "4e-4", "6e-4"]
        );
        assert_eq!(
            tick_labels(&[5e-5, 1e-4, 1.5e-4], 5e-5),
            ["0.5e-4", "1.0e-4", "1.5e-4"]
        );
        assert_eq!(fmt_sig(1.0523), "1.052");
        assert_eq!(fmt_sig(300.0), "300");
        assert_eq!(fmt_sig(5e-4), "0.0005");
        assert_eq!(fmt_sig(2e-5), "2e-5");
        assert_eq!(fmt_lr(5e-4), "5e-4");
        assert_eq!(fmt_lr(2.5e-5), "2.5e-5");
        assert_eq!(fmt_lr(0.1), "0.1");
    }
}
