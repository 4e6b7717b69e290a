//! Charts of a run's metrics (`rtrain plot`): one chart per numeric metric of
//! `<run>/metrics.jsonl`, value against step, written as SVG or PNG.
//!
//! The file is replayed as TensorBoard would: when a process's rows move to a later attempt (a
//! restart that resumed from a checkpoint), what it had logged from the resumed step on is
//! replaced. SVG charts need no font; PNG text is drawn with a TrueType font found on the system.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::backend::{BitMapBackend, DrawingBackend, SVGBackend};
use plotters::chart::ChartBuilder;
use plotters::drawing::{DrawingAreaErrorKind, IntoDrawingArea};
use plotters::element::{Circle, PathElement};
use plotters::style::{Color, FontStyle, RGBColor, WHITE};
use plotters_backend::{BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind};
use serde::Deserialize;
use serde_json::Value;

/// Columns of a metrics line that say where and when it was logged rather than what was measured.
const BOOKKEEPING: [&str; 2] = ["restarts", "time"];
/// Pixels of every chart.
const SIZE: (u32, u32) = (900, 500);
/// Series this short also get a dot per point, so sparse metrics (evaluations, checkpoint
/// stalls) stay visible: a line through one point draws nothing.
const DOTS_UP_TO: usize = 50;
const LINE_COLOR: RGBColor = RGBColor(31, 119, 180);
/// Where PNG fonts are looked for, and the fonts preferred there, best first.
const FONT_DIRS: [&str; 2] = ["/usr/share/fonts", "/usr/local/share/fonts"];
const PREFERRED_FONTS: [&str; 4] =
    ["DejaVuSans.ttf", "LiberationSans-Regular.ttf", "NotoSans-Regular.ttf", "FreeSans.ttf"];

/// The file format of the charts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PlotFormat {
    #[default]
    Svg,
    Png,
}

impl PlotFormat {
    pub fn extension(self) -> &'static str {
        match self {
            PlotFormat::Svg => "svg",
            PlotFormat::Png => "png",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: no numeric metric with a finite value to plot", path.display())]
    NoMetrics { path: PathBuf },
    #[error(
        "PNG charts need a TrueType font: install fonts-dejavu-core, or use --format svg \
         (looked under {})", FONT_DIRS.join(" and ")
    )]
    NoFont,
    #[error("{}: cannot draw the chart: {reason}", path.display())]
    Draw { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PlotError + '_ {
    move |source| PlotError::Io { path: path.to_path_buf(), source }
}

/// What [`plot_run`] wrote; its `Display` is one line per file, then any warning.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotSummary {
    /// In the order role, rank, metric.
    pub charts: Vec<ChartFile>,
    /// Lines skipped because metrics.jsonl ended in a partial line (a run killed mid-write, or
    /// one still writing).
    pub truncated_lines: usize,
    /// Whole lines that are not metrics (damage, or a writer other than rtrain), skipped: how
    /// many, and the first one's place and reason.
    pub bad_lines: usize,
    pub first_bad: Option<String>,
}

/// One chart written.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartFile {
    /// The metric, as the chart's title names it (`loss`, `rollout/samples_per_s`).
    pub title: String,
    pub path: PathBuf,
    pub points: usize,
}

impl fmt::Display for PlotSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chart in &self.charts {
            writeln!(f, "wrote {} ({}, {} points)", chart.path.display(), chart.title, chart.points)?;
        }
        if self.truncated_lines > 0 {
            writeln!(
                f,
                "warning: skipped {} partial line(s) at the end of metrics.jsonl (a run killed mid-write, or still writing)",
                self.truncated_lines
            )?;
        }
        if let Some(first) = &self.first_bad {
            writeln!(f, "warning: skipped {} line(s) that are not metrics; the first: {first}", self.bad_lines)?;
        }
        Ok(())
    }
}

/// Writes a chart of each numeric metric of `<run>/metrics.jsonl` to `out` (default
/// `<run>/plots`), as `<role>-<metric>.<ext>` (`<role>-<rank>-<metric>` for ranks other than 0).
pub fn plot_run(run: &Path, out: Option<&Path>, format: PlotFormat) -> Result<PlotSummary, PlotError> {
    if format == PlotFormat::Png && png_font().is_none() {
        return Err(PlotError::NoFont);
    }
    let path = run.join("metrics.jsonl");
    let (replay, skipped) = read_metrics(&path)?;
    let series: Vec<_> = replay.series.into_iter().filter(|(_, points)| !points.is_empty()).collect();
    if series.is_empty() {
        return Err(PlotError::NoMetrics { path });
    }
    let out = out.map_or_else(|| run.join("plots"), Path::to_path_buf);
    std::fs::create_dir_all(&out).map_err(io(&out))?;
    let mut stems = HashSet::new();
    let mut charts = Vec::with_capacity(series.len());
    for (key, points) in series {
        let title = key.title();
        let path = out.join(format!("{}.{}", unique_stem(key.file_stem(), &mut stems), format.extension()));
        let bytes = match format {
            PlotFormat::Svg => render_svg(&title, &points),
            PlotFormat::Png => render_png(&title, &points),
        }
        .map_err(|reason| PlotError::Draw { path: path.clone(), reason })?;
        std::fs::write(&path, bytes).map_err(io(&path))?;
        charts.push(ChartFile { title, path, points: points.len() });
    }
    Ok(PlotSummary { charts, truncated_lines: skipped.truncated, bad_lines: skipped.bad, first_bad: skipped.first_bad })
}

/// One line of metrics.jsonl: a step of the training role (no rank), or the named metrics of
/// one process of any role.
#[derive(Deserialize)]
struct Row {
    #[serde(default = "training_role")]
    role: String,
    #[serde(default)]
    rank: u32,
    #[serde(default)]
    attempt: u32,
    step: u64,
    #[serde(flatten)]
    values: serde_json::Map<String, Value>,
}

fn training_role() -> String {
    "trainer".into()
}

/// One metric of one process.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SeriesKey {
    role: String,
    rank: u32,
    metric: String,
}

impl SeriesKey {
    /// The metric under its role and rank, as the TensorBoard tags name them, leaving out
    /// the trainer's rank 0.
    fn title(&self) -> String {
        match (self.role.as_str(), self.rank) {
            ("trainer", 0) => self.metric.clone(),
            (role, 0) => format!("{role}/{}", self.metric),
            (role, rank) => format!("{role}/{rank}/{}", self.metric),
        }
    }

    /// A file name without the characters a file system or a shell would trip on.
    fn file_stem(&self) -> String {
        let name = match self.rank {
            0 => format!("{}-{}", self.role, self.metric),
            rank => format!("{}-{rank}-{}", self.role, self.metric),
        };
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
    }
}

/// `stem`, or `stem-2`, `stem-3`... when names that differ only in replaced characters meet.
fn unique_stem(stem: String, taken: &mut HashSet<String>) -> String {
    let mut name = stem.clone();
    let mut n = 1;
    while !taken.insert(name.clone()) {
        n += 1;
        name = format!("{stem}-{n}");
    }
    name
}

/// metrics.jsonl replayed: each series' points by increasing step.
#[derive(Default)]
struct Replay {
    series: BTreeMap<SeriesKey, Vec<(u64, f64)>>,
    /// The latest attempt each process (role, rank) has logged from.
    attempts: HashMap<(String, u32), u32>,
}

impl Replay {
    fn add(&mut self, row: Row) {
        let latest = self.attempts.entry((row.role.clone(), row.rank)).or_insert(row.attempt);
        if row.attempt < *latest {
            // Logged by an attempt that a later one has replaced (a straggler of a lost attempt).
            return;
        }
        if row.attempt > *latest {
            *latest = row.attempt;
            // The process resumed from a checkpoint at this step: whatever it logged from here on
            // belongs to the lost attempt, including metrics the new attempt never logs again.
            for (key, points) in &mut self.series {
                if key.role == row.role && key.rank == row.rank {
                    truncate_from(points, row.step);
                }
            }
        }
        for (metric, value) in row.values {
            if BOOKKEEPING.contains(&metric.as_str()) {
                continue;
            }
            // Non-finite numbers are written as null: the step is logged, with no value to draw.
            let value = match value {
                Value::Number(n) => n.as_f64().filter(|v| v.is_finite()),
                Value::Null => None,
                _ => continue,
            };
            let points = self.series.entry(SeriesKey { role: row.role.clone(), rank: row.rank, metric }).or_default();
            truncate_from(points, row.step);
            points.extend(value.map(|v| (row.step, v)));
        }
    }
}

/// Drops the points at `step` and after: a value logged again replaces them.
fn truncate_from(points: &mut Vec<(u64, f64)>, step: u64) {
    let keep = points.partition_point(|&(s, _)| s < step);
    points.truncate(keep);
}

/// What reading metrics.jsonl left out.
#[derive(Debug, Default)]
struct Skipped {
    /// A partial last line.
    truncated: usize,
    /// Whole lines that are not metrics.
    bad: usize,
    first_bad: Option<String>,
}

/// Reads and replays metrics.jsonl; also says which lines were skipped.
fn read_metrics(path: &Path) -> Result<(Replay, Skipped), PlotError> {
    // Bytes, not a string: a line cut short may end inside a UTF-8 character.
    let bytes = std::fs::read(path).map_err(io(path))?;
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let mut replay = Replay::default();
    let mut skipped = Skipped::default();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_ascii().is_empty() {
            continue;
        }
        match serde_json::from_slice::<Row>(line) {
            Ok(row) => replay.add(row),
            // Each line is written whole with its newline in one write, so only the last one, with
            // no newline yet, can be cut short; a bad line that ends in a newline is damage.
            Err(_) if i + 1 == lines.len() => skipped.truncated += 1,
            Err(e) => {
                skipped.bad += 1;
                skipped.first_bad.get_or_insert_with(|| format!("{}:{}: {}", path.display(), i + 1, reason(&e)));
            }
        }
    }
    Ok((replay, skipped))
}

/// serde_json's message without its "at line 1": the line is the file's to name.
fn reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) => format!("{} (column {})", &text[..at], e.column()),
        None => text,
    }
}

fn render_svg(title: &str, points: &[(u64, f64)]) -> Result<Vec<u8>, String> {
    let mut svg = String::new();
    draw(SvgWithoutFonts(SVGBackend::with_string(&mut svg, SIZE)), title, points).map_err(|e| e.to_string())?;
    Ok(svg.into_bytes())
}

fn render_png(title: &str, points: &[(u64, f64)]) -> Result<Vec<u8>, String> {
    let (width, height) = SIZE;
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    draw(BitMapBackend::with_buffer(&mut rgb, SIZE), title, points).map_err(|e| e.to_string())?;
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(&rgb).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(png)
}

/// Draws one series (non-empty, by increasing step) as a line chart titled `title`.
fn draw<DB: DrawingBackend>(
    backend: DB,
    title: &str,
    points: &[(u64, f64)],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (Some(&(first, _)), Some(&(last, _))) = (points.first(), points.last()) else { return Ok(()) };
    let values = value_range(points);
    let root = backend.into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(first..last.max(first + 1), values.clone())?;
    chart.configure_mesh().x_desc("step").y_label_formatter(&tick_labels(&values)).draw()?;
    chart.draw_series(std::iter::once(PathElement::new(points.to_vec(), Color::stroke_width(&LINE_COLOR, 2))))?;
    if points.len() <= DOTS_UP_TO {
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, LINE_COLOR.filled())))?;
    }
    root.present()
}

/// The values' range with a margin of 5% each side, so the line stays off the frame; a flat
/// series gets a band around its value (±5%, or ±1 around 0).
fn value_range(points: &[(u64, f64)]) -> Range<f64> {
    let (lo, hi) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, v)| (lo.min(v), hi.max(v)));
    let pad = match (hi > lo, lo == 0.0) {
        (true, _) => (hi - lo) * 0.05,
        (false, true) => 1.0,
        (false, false) => lo.abs() * 0.05,
    };
    if (hi - lo + 2.0 * pad).is_finite() {
        lo - pad..hi + pad
    } else {
        // A span past the largest float: the axis keeps what it can hold, and the points
        // beyond are drawn at its edges.
        lo.max(-f64::MAX / 4.0)..hi.min(f64::MAX / 4.0)
    }
}

/// Labels for an axis over `range`, short enough for the label area and in one notation:
/// scientific when its largest magnitude is below 0.001 or from 100,000 (learning rates, token
/// rates), else with the decimals the ticks' spacing needs.
fn tick_labels(range: &Range<f64>) -> impl Fn(&f64) -> String {
    let scale = range.start.abs().max(range.end.abs());
    let scientific = scale != 0.0 && !(1e-3..1e5).contains(&scale);
    // plotters puts about ten labels on an axis: one decimal more than their spacing needs.
    let decimals = (1.0 - ((range.end - range.start) / 10.0).log10()).ceil().clamp(0.0, 8.0) as usize;
    move |&v| {
        let text = if v == 0.0 {
            "0".to_string()
        } else if scientific {
            let text = format!("{v:.3e}");
            match text.split_once('e') {
                Some((mantissa, exponent)) => format!("{}e{exponent}", trim_zeros(mantissa)),
                None => text,
            }
        } else {
            trim_zeros(&format!("{v:.decimals$}")).to_string()
        };
        if text == "-0" { "0".to_string() } else { text }
    }
}

/// `2.500` as `2.5`, `3.000` as `3`.
fn trim_zeros(number: &str) -> &str {
    if number.contains('.') { number.trim_end_matches('0').trim_end_matches('.') } else { number }
}

/// plotters' SVG backend, estimating text sizes from the character count as plotters does when
/// built without a font: whatever shows an SVG lays its text out, so SVG charts need no font file
/// even though plotters is built with one for PNG (which would otherwise fail without it).
struct SvgWithoutFonts<'a>(SVGBackend<'a>);

impl DrawingBackend for SvgWithoutFonts<'_> {
    type ErrorType = std::io::Error;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.present()
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.fill_polygon(vert, style)
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.0.draw_text(text, style, pos)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        // plotters' font-less estimate: an em of size / 1.24², characters 0.7 em wide, lines 1.24 em.
        let em = style.size() / 1.24 / 1.24;
        Ok(((em * 0.7 * text.chars().count() as f64).round() as u32, (em * 1.24).round() as u32))
    }
}

/// The system font PNG text is drawn with, registered as plotters' "sans-serif" on first use;
/// None when no usable TrueType font is installed.
fn png_font() -> Option<&'static Path> {
    static FONT: OnceLock<Option<PathBuf>> = OnceLock::new();
    FONT.get_or_init(|| {
        let mut fonts = Vec::new();
        for dir in FONT_DIRS {
            collect_fonts(Path::new(dir), 4, &mut fonts);
        }
        fonts.sort_by_cached_key(|path| (font_rank(path), path.clone()));
        fonts.into_iter().find(|path| register_font(path))
    })
    .as_deref()
}

/// The `.ttf` files under `dir`, down to `depth` folders below it.
fn collect_fonts(dir: &Path, depth: u32, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for path in entries.flatten().map(|entry| entry.path()) {
        if path.is_dir() {
            if depth > 0 {
                collect_fonts(&path, depth - 1, found);
            }
        } else if path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("ttf")) {
            found.push(path);
        }
    }
}

/// Lower is better: the preferred fonts in order, then plain faces, then styled ones.
fn font_rank(path: &Path) -> usize {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    PREFERRED_FONTS.iter().position(|&preferred| preferred == name).unwrap_or_else(|| {
        let styled = ["Bold", "Italic", "Oblique", "Mono", "Condensed", "Light"].iter().any(|s| name.contains(s));
        PREFERRED_FONTS.len() + usize::from(styled)
    })
}

fn register_font(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else { return false };
    // plotters keeps fonts for the life of the process, by 'static reference; this runs once.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attempt 0 logs steps 1-5 and an evaluation at 2 and 5, then dies; attempt 1 resumes from
    /// the checkpoint of step 3 and logs steps 4-6; the run is killed while writing step 7.
    /// Beside the trainer's steps: its RL metrics (rank 0) and two rollout actors' metrics.
    const RESTARTED_RUN: &str = r#"{"role":"trainer","rank":0,"attempt":0,"step":1,"time":10.0,"reward_mean":0.1}
{"role":"trainer","step":1,"loss":2.5,"lr":0.0001,"time":10.1,"grad_norm":null,"attempt":0,"restarts":0}
{"role":"rollout","rank":0,"attempt":0,"step":1,"time":10.2,"samples_per_s":40.0,"note":"warm"}
{"role":"rollout","rank":1,"attempt":0,"step":1,"time":10.2,"samples_per_s":42.0}
{"role":"trainer","rank":0,"attempt":0,"step":2,"time":11.0,"reward_mean":0.2}
{"role":"trainer","step":2,"loss":2.0,"lr":0.0002,"time":11.1,"grad_norm":1.5,"attempt":0,"restarts":0,"eval_loss":2.2}
{"role":"trainer","rank":0,"attempt":0,"step":3,"time":12.0,"reward_mean":0.3}
{"role":"trainer","step":3,"loss":1.5,"lr":0.0003,"time":12.1,"grad_norm":1.4,"attempt":0,"restarts":0,"checkpoint_stall_s":0.01}
{"role":"trainer","rank":0,"attempt":0,"step":4,"time":13.0,"reward_mean":0.4}
{"role":"trainer","step":4,"loss":1.0,"lr":0.0004,"time":13.1,"grad_norm":1.3,"attempt":0,"restarts":0}
{"role":"trainer","rank":0,"attempt":0,"step":5,"time":14.0,"reward_mean":0.5}
{"role":"trainer","step":5,"loss":0.5,"lr":0.0005,"time":14.1,"grad_norm":1.2,"attempt":0,"restarts":0,"eval_loss":0.9}
{"role":"trainer","rank":0,"attempt":1,"step":4,"time":20.0,"reward_mean":0.41}

{"role":"trainer","step":4,"loss":1.1,"lr":0.0004,"time":20.1,"grad_norm":1.3,"attempt":1,"restarts":1}
{"role":"trainer","rank":0,"attempt":1,"step":5,"time":21.0,"reward_mean":0.51}
{"role":"trainer","step":5,"loss":0.6,"lr":0.0005,"time":21.1,"grad_norm":1.2,"attempt":1,"restarts":1}
{"role":"trainer","rank":0,"attempt":1,"step":6,"time":22.0,"reward_mean":0.61}
{"role":"trainer","step":6,"loss":0.4,"lr":0.0005,"time":22.1,"grad_norm":1.1,"attempt":1,"restarts":1}
{"role":"trainer","step":7,"loss":0.3,"lr":0.00"#;

    fn run_with(metrics: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metrics.jsonl"), metrics).unwrap();
        dir
    }

    fn points(replay: &Replay, role: &str, rank: u32, metric: &str) -> Vec<(u64, f64)> {
        replay.series[&SeriesKey { role: role.into(), rank, metric: metric.into() }].clone()
    }

    /// The `points` of each series polyline of an SVG (the line colour's), as (x, y) pairs.
    fn polylines(svg: &str) -> Vec<Vec<(i32, i32)>> {
        let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", LINE_COLOR.0, LINE_COLOR.1, LINE_COLOR.2);
        svg.split("<polyline")
            .skip(1)
            .filter(|tag| tag[..tag.find("/>").unwrap()].contains(&stroke))
            .map(|tag| {
                let start = tag.find("points=\"").unwrap() + "points=\"".len();
                let end = start + tag[start..].find('"').unwrap();
                tag[start..end]
                    .split_whitespace()
                    .map(|xy| {
                        let (x, y) = xy.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_later_attempt_replaces_the_steps_it_logs_again() {
        let dir = run_with(RESTARTED_RUN);
        let (replay, skipped) = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!((skipped.truncated, skipped.bad), (1, 0), "the half-written step 7");
        assert_eq!(points(&replay, "trainer", 0, "loss"), [(1, 2.5), (2, 2.0), (3, 1.5), (4, 1.1), (5, 0.6), (6, 0.4)]);
        assert_eq!(
            points(&replay, "trainer", 0, "reward_mean"),
            [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.41), (5, 0.51), (6, 0.61)]
        );
        // The lost attempt's evaluation at step 5 goes although attempt 1 never evaluated again.
        assert_eq!(points(&replay, "trainer", 0, "eval_loss"), [(2, 2.2)]);
        assert_eq!(points(&replay, "trainer", 0, "grad_norm").len(), 5, "null at step 1 is no point");
        assert_eq!(points(&replay, "rollout", 1, "samples_per_s"), [(1, 42.0)]);
        let metrics: Vec<_> = replay.series.keys().map(SeriesKey::title).collect();
        assert_eq!(
            metrics,
            [
                "rollout/samples_per_s",
                "rollout/1/samples_per_s",
                "checkpoint_stall_s",
                "eval_loss",
                "grad_norm",
                "loss",
                "lr",
                "reward_mean"
            ],
            "bookkeeping columns and text are not metrics"
        );
    }

    #[test]
    fn a_straggler_of_a_lost_attempt_is_ignored() {
        let dir = run_with(concat!(
            r#"{"role":"rollout","rank":0,"attempt":1,"step":3,"x":1.0}"#,
            "\n",
            r#"{"role":"rollout","rank":0,"attempt":0,"step":4,"x":9.0}"#,
            "\n",
            r#"{"role":"rollout","rank":0,"attempt":1,"step":4,"x":2.0}"#,
            "\n",
        ));
        let (replay, _) = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(points(&replay, "rollout", 0, "x"), [(3, 1.0), (4, 2.0)]);
    }

    #[test]
    fn svg_charts_hold_one_point_per_step_after_the_restart() {
        let dir = run_with(RESTARTED_RUN);
        let summary = plot_run(dir.path(), None, PlotFormat::Svg).unwrap();
        let plots = dir.path().join("plots");
        let files: Vec<_> = summary.charts.iter().map(|c| c.path.strip_prefix(&plots).unwrap().to_owned()).collect();
        let expected = [
            "rollout-samples_per_s.svg",
            "rollout-1-samples_per_s.svg",
            "trainer-checkpoint_stall_s.svg",
            "trainer-eval_loss.svg",
            "trainer-grad_norm.svg",
            "trainer-loss.svg",
            "trainer-lr.svg",
            "trainer-reward_mean.svg",
        ];
        assert_eq!(files, expected.map(PathBuf::from));
        assert!(summary.charts.iter().all(|c| c.path.is_file()));
        assert_eq!(summary.truncated_lines, 1);
        assert!(summary.to_string().contains("warning: skipped 1 partial line"), "{summary}");

        let svg = std::fs::read_to_string(plots.join("trainer-loss.svg")).unwrap();
        assert!(svg.contains(">\nloss\n</text>"), "titled by the metric");
        let lines = polylines(&svg);
        assert_eq!(lines.len(), 1, "{svg}");
        let (xs, ys): (Vec<i32>, Vec<i32>) = lines[0].iter().copied().unzip();
        assert_eq!(xs.len(), 6, "steps 1-6, with 4 and 5 from attempt 1 only");
        assert!(xs.is_sorted_by(|a, b| a < b), "{xs:?}");
        // Loss falls on every step, so the line goes down (y grows down the image).
        assert!(ys.is_sorted_by(|a, b| a < b), "{ys:?}");
        let rollout = std::fs::read_to_string(plots.join("rollout-1-samples_per_s.svg")).unwrap();
        assert!(rollout.contains(">\nrollout/1/samples_per_s\n</text>"));
    }

    #[test]
    fn bad_lines_are_skipped_and_the_first_is_named() {
        let dir = run_with(concat!(
            r#"{"role":"trainer","step":1,"loss":2.5}"#,
            "\n",
            r#"{"role":"trainer","step":"#,
            "\n",
            r#"{"role":"trainer","step":3,"loss":2.0}"#,
            "\n",
            r#"{"step":-5,"loss":1}"#,
            "\n",
        ));
        let summary = plot_run(dir.path(), None, PlotFormat::Svg).unwrap();
        assert_eq!((summary.bad_lines, summary.truncated_lines), (2, 0));
        let text = summary.to_string();
        assert!(
            text.contains("skipped 2 line(s) that are not metrics; the first: ") && text.contains("metrics.jsonl:2: "),
            "{text}"
        );
        let loss = summary.charts.iter().find(|c| c.title == "loss").unwrap();
        assert_eq!(loss.points, 2, "steps 1 and 3");
    }

    #[test]
    fn values_spanning_more_than_a_float_still_plot() {
        let dir = run_with("{\"step\":1,\"loss\":1e308}\n{\"step\":2,\"loss\":-1e308}\n{\"step\":3,\"loss\":0}\n");
        let summary = plot_run(dir.path(), None, PlotFormat::Svg).unwrap();
        assert_eq!(summary.charts.len(), 1);
    }

    #[test]
    fn a_run_with_nothing_to_plot_says_so() {
        let dir = run_with("{\"role\":\"trainer\",\"step\":1,\"grad_norm\":null,\"time\":1.0}\n");
        let err = plot_run(dir.path(), None, PlotFormat::Svg).unwrap_err();
        assert!(matches!(err, PlotError::NoMetrics { .. }), "{err:?}");
        let missing = plot_run(&dir.path().join("nope"), None, PlotFormat::Svg).unwrap_err();
        assert!(missing.to_string().contains("nope/metrics.jsonl"), "{missing}");
    }

    #[test]
    fn png_charts_are_drawn_with_a_system_font_or_refused() {
        let dir = run_with(RESTARTED_RUN);
        let out = dir.path().join("png");
        match plot_run(dir.path(), Some(&out), PlotFormat::Png) {
            Ok(summary) => {
                let png = std::fs::read(out.join("trainer-loss.png")).unwrap();
                assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
                let decoder = png::Decoder::new(std::io::Cursor::new(png));
                let info = decoder.read_info().unwrap().info().clone();
                assert_eq!((info.width, info.height), SIZE);
                assert_eq!(summary.charts.len(), 8);
            }
            Err(err) => {
                assert!(png_font().is_none(), "{err}");
                assert!(err.to_string().contains("install fonts-dejavu-core, or use --format svg"));
            }
        }
    }

    #[test]
    fn file_names_keep_only_safe_characters() {
        let key = SeriesKey { role: "eval".into(), rank: 0, metric: "acc/top 1".into() };
        assert_eq!(key.file_stem(), "eval-acc_top_1");
        let mut taken = HashSet::new();
        assert_eq!(unique_stem("a_b".into(), &mut taken), "a_b");
        assert_eq!(unique_stem("a_b".into(), &mut taken), "a_b-2");
    }

    #[test]
    fn axis_labels_stay_short_and_in_one_notation() {
        let lr = tick_labels(&(0.0..0.0003));
        assert_eq!([lr(&0.00025), lr(&0.0001), lr(&0.0)], ["2.5e-4", "1e-4", "0"]);
        let stall = tick_labels(&(0.0004..0.0025));
        assert_eq!([stall(&0.0024), stall(&0.0008), stall(&-0.0)], ["0.0024", "0.0008", "0"]);
        let loss = tick_labels(&(0.4..2.5));
        assert_eq!([loss(&2.5), loss(&1.25), loss(&-0.001)], ["2.5", "1.25", "0"]);
        let tokens = tick_labels(&(0.0..60_000.0));
        assert_eq!(tokens(&55_280.46), "55280");
        assert_eq!(tick_labels(&(0.0..200_000.0))(&155_280.0), "1.553e5");
        assert_eq!(value_range(&[(1, 2.0), (2, 2.0)]), 1.9..2.1);
        assert_eq!(value_range(&[(1, 0.0), (2, 0.0)]), -1.0..1.0);
        assert_eq!(value_range(&[(1, 0.0), (2, 10.0)]), -0.5..10.5);
    }
}
