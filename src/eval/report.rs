//! Evaluation reports: per-class and mean metrics, issue counts; JSON, CSV and a terminal table.
//!
//! Input: what the driver measured. Output: [`EvalReport`] (serde), its JSON / CSV files and a
//! text table. Failure modes: [`ReportError`] when a file cannot be written. The JSON and CSV
//! hold no timings or absolute times, so two runs on the same data give byte-identical files;
//! timings live in [`Timing`] (not serialised) and in the table footer.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::dataset::{Issue, IssueCounts};
use super::metrics::{Metric, Undefined, mean_defined};

/// One class's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassReport {
    /// Class name.
    pub name: String,
    /// Images scored.
    pub images: usize,
    /// Normal images scored.
    pub normal: usize,
    /// Anomalous images scored.
    pub anomalous: usize,
    /// Images in the pixel metrics (normal + anomalous with a mask).
    pub pixel_images: usize,
    /// Ground-truth regions (8-connected) in AUPRO.
    pub regions: usize,
    /// Items skipped (errors in validation or scoring).
    pub skipped: usize,
    /// Image AUROC.
    pub image_auroc: Metric,
    /// Image AP.
    pub image_ap: Metric,
    /// Pixel AUROC.
    pub pixel_auroc: Metric,
    /// AUPRO (FPR ≤ 0.3, normalised).
    pub aupro: Metric,
    /// Image AUROC and AP of the other decision statistics (the daemon's `statistic`): the
    /// anomaly map's maximum, and the blend `(score + map_max) / 2`. `image_auroc` /
    /// `image_ap` above are those of `global`, the model's image score.
    pub map_max_auroc: Metric,
    pub map_max_ap: Metric,
    pub blend_auroc: Metric,
    pub blend_ap: Metric,
}

impl ClassReport {
    /// A class with nothing evaluated.
    pub fn empty(name: &str, skipped: usize) -> Self {
        let u = Metric::Undefined(Undefined::NoSamples);
        Self {
            name: name.to_owned(),
            images: 0,
            normal: 0,
            anomalous: 0,
            pixel_images: 0,
            regions: 0,
            skipped,
            image_auroc: u,
            image_ap: u,
            pixel_auroc: u,
            aupro: u,
            map_max_auroc: u,
            map_max_ap: u,
            blend_auroc: u,
            blend_ap: u,
        }
    }

    fn metrics(&self) -> [(&'static str, Metric); 4] {
        [
            ("image_auroc", self.image_auroc),
            ("image_ap", self.image_ap),
            ("pixel_auroc", self.pixel_auroc),
            ("aupro", self.aupro),
        ]
    }
}

/// A mean over the classes where a metric is defined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanMetric {
    /// The mean; `null` when no class has the metric.
    pub value: Option<f64>,
    /// Classes averaged.
    pub classes: usize,
}

/// Means over classes (undefined values excluded).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanReport {
    /// Image AUROC.
    pub image_auroc: MeanMetric,
    /// Image AP.
    pub image_ap: MeanMetric,
    /// Pixel AUROC.
    pub pixel_auroc: MeanMetric,
    /// AUPRO.
    pub aupro: MeanMetric,
    /// Image AUROC / AP of `map_max` and `blend`.
    pub map_max_auroc: MeanMetric,
    pub map_max_ap: MeanMetric,
    pub blend_auroc: MeanMetric,
    pub blend_ap: MeanMetric,
}

impl MeanReport {
    /// Means of `classes`, summed in the given order.
    pub fn of(classes: &[ClassReport]) -> Self {
        let m = |f: fn(&ClassReport) -> Metric| {
            let (value, classes) = mean_defined(classes.iter().map(f));
            MeanMetric { value, classes }
        };
        Self {
            image_auroc: m(|c| c.image_auroc),
            image_ap: m(|c| c.image_ap),
            pixel_auroc: m(|c| c.pixel_auroc),
            aupro: m(|c| c.aupro),
            map_max_auroc: m(|c| c.map_max_auroc),
            map_max_ap: m(|c| c.map_max_ap),
            blend_auroc: m(|c| c.blend_auroc),
            blend_ap: m(|c| c.blend_ap),
        }
    }

    fn all(&self) -> [MeanMetric; 8] {
        [
            self.image_auroc,
            self.image_ap,
            self.pixel_auroc,
            self.aupro,
            self.map_max_auroc,
            self.map_max_ap,
            self.blend_auroc,
            self.blend_ap,
        ]
    }
}

/// Wall-clock figures of a run (not serialised: they differ between runs).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// Images scored.
    pub images: usize,
    /// Seconds for the whole evaluation.
    pub seconds: f64,
    /// Largest heap held by one class's pixel accumulator, bytes.
    pub peak_pixel_memory: usize,
}

/// The result of `eval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Dataset ROOT as given.
    pub root: String,
    /// Where the item list came from (`meta.json` path or discovered layout).
    pub source: String,
    /// Side of the square anomaly maps (518 for the reference).
    pub map_size: usize,
    /// Per class, in name order.
    pub classes: Vec<ClassReport>,
    /// Means over classes.
    pub mean: MeanReport,
    /// Issue counts (validation and evaluation).
    pub issue_counts: IssueCounts,
    /// Every issue.
    pub issues: Vec<Issue>,
    /// Timings (not serialised).
    #[serde(skip)]
    pub timing: Timing,
}

/// A report file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct ReportError {
    /// The file.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn csv_metric(m: Metric) -> String {
    match m {
        Metric::Defined(v) => format!("{v}"),
        Metric::Undefined(_) => "n/a".to_owned(),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{:.1}", v * 100.0))
}

impl EvalReport {
    /// Pretty JSON (deterministic: no timings).
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// CSV: one row per class, then `mean` and `classes_averaged`. Values are full-precision
    /// fractions (not percentages); undefined values are `n/a`.
    pub fn to_csv(&self) -> String {
        let mut s = String::from(
            "class,images,normal,anomalous,pixel_images,regions,skipped,image_auroc,image_ap,pixel_auroc,aupro,map_max_auroc,map_max_ap,blend_auroc,blend_ap\n",
        );
        for c in &self.classes {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                csv_field(&c.name),
                c.images,
                c.normal,
                c.anomalous,
                c.pixel_images,
                c.regions,
                c.skipped,
                csv_metric(c.image_auroc),
                csv_metric(c.image_ap),
                csv_metric(c.pixel_auroc),
                csv_metric(c.aupro),
                csv_metric(c.map_max_auroc),
                csv_metric(c.map_max_ap),
                csv_metric(c.blend_auroc),
                csv_metric(c.blend_ap),
            );
        }
        let means = self.mean.all();
        let vals: Vec<String> = means
            .iter()
            .map(|m| m.value.map_or_else(|| "n/a".to_owned(), |v| format!("{v}")))
            .collect();
        let _ = writeln!(s, "mean,,,,,,,{}", vals.join(","));
        let counts: Vec<String> = means.iter().map(|m| m.classes.to_string()).collect();
        let _ = writeln!(s, "classes_averaged,,,,,,,{}", counts.join(","));
        s
    }

    /// Writes [`Self::to_json`] to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), ReportError> {
        std::fs::write(path, self.to_json()).map_err(|source| ReportError {
            path: path.to_owned(),
            source,
        })
    }

    /// Writes [`Self::to_csv`] to `path`.
    pub fn write_csv(&self, path: &Path) -> Result<(), ReportError> {
        std::fs::write(path, self.to_csv()).map_err(|source| ReportError {
            path: path.to_owned(),
            source,
        })
    }

    /// The terminal table (percentages, one decimal, like the official log), the mean with the
    /// number of classes averaged per metric, the reasons for `n/a`, issue counts and timing.
    pub fn table(&self) -> String {
        let headers = [
            "class",
            "images",
            "I-AUROC",
            "I-AP",
            "P-AUROC",
            "AUPRO",
            "I-AUROC map_max",
            "I-AUROC blend",
        ];
        let mut rows: Vec<[String; 8]> = Vec::new();
        for c in &self.classes {
            rows.push([
                c.name.clone(),
                format!("{}/{}", c.normal, c.anomalous),
                c.image_auroc.percent(),
                c.image_ap.percent(),
                c.pixel_auroc.percent(),
                c.aupro.percent(),
                c.map_max_auroc.percent(),
                c.blend_auroc.percent(),
            ]);
        }
        let means = self.mean.all();
        rows.push([
            "mean".to_owned(),
            String::new(),
            pct(means[0].value),
            pct(means[1].value),
            pct(means[2].value),
            pct(means[3].value),
            pct(means[4].value),
            pct(means[6].value),
        ]);
        let n = self.classes.len();
        rows.push([
            "classes averaged".to_owned(),
            String::new(),
            format!("{}/{n}", means[0].classes),
            format!("{}/{n}", means[1].classes),
            format!("{}/{n}", means[2].classes),
            format!("{}/{n}", means[3].classes),
            format!("{}/{n}", means[4].classes),
            format!("{}/{n}", means[6].classes),
        ]);
        let mut width = headers.map(str::len);
        for r in &rows {
            for (w, cell) in width.iter_mut().zip(r) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut l = String::new();
            for (i, (c, w)) in cells.iter().zip(width).enumerate() {
                if i == 0 {
                    let _ = write!(l, "{c:<w$}");
                } else {
                    let _ = write!(l, "  {c:>w$}");
                }
            }
            l.trim_end().to_owned()
        };
        let mut out = String::new();
        let hdr: Vec<String> = headers.iter().map(|s| s.to_string()).collect();
        out.push_str(&line(&hdr));
        out.push('\n');
        let total: usize = width.iter().sum::<usize>() + 2 * (width.len() - 1);
        let rule = "-".repeat(total);
        out.push_str(&rule);
        out.push('\n');
        for (i, r) in rows.iter().enumerate() {
            if i == self.classes.len() {
                out.push_str(&rule);
                out.push('\n');
            }
            out.push_str(&line(r));
            out.push('\n');
        }
        for c in &self.classes {
            // One line per class: the undefined metrics grouped by reason.
            let mut by_reason: Vec<(Undefined, Vec<&str>)> = Vec::new();
            for (name, m) in c.metrics() {
                if let Metric::Undefined(u) = m {
                    match by_reason.iter_mut().find(|(r, _)| *r == u) {
                        Some((_, names)) => names.push(name),
                        None => by_reason.push((u, vec![name])),
                    }
                }
            }
            if !by_reason.is_empty() {
                let parts: Vec<String> = by_reason
                    .iter()
                    .map(|(u, names)| format!("{} ({})", names.join(", "), u.describe()))
                    .collect();
                let _ = writeln!(out, "n/a {}: {}", c.name, parts.join("; "));
            }
        }
        let _ = writeln!(
            out,
            "issues: {} errors, {} warnings",
            self.issue_counts.errors, self.issue_counts.warnings
        );
        if self.timing.seconds > 0.0 {
            let _ = writeln!(
                out,
                "{} images in {:.1} s ({:.2} img/s); pixel metrics peak {:.1} MiB",
                self.timing.images,
                self.timing.seconds,
                self.timing.images as f64 / self.timing.seconds,
                self.timing.peak_pixel_memory as f64 / (1024.0 * 1024.0)
            );
        }
        out
    }
}
