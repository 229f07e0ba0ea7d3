//! Calibration from good parts: score statistics, the thresholds T1/T2 for a target false-alarm
//! rate, the calibration file in the state directory (with rollback), its validity fingerprint,
//! the drift check and the normalised score. Pure library code: no camera, engine or MQTT here.
//!
//! Input: the decision-statistic scores of N good frames of one camera/region (probabilities in
//! `[0, 1]`), [`Options`] (target per-frame false-NG rate α, the rate for T1, the region's N-of-M
//! debounce) and the [`Fingerprint`] of what produced the scores. Output: a [`Calibration`]
//! ([`calibrate`]), written to and read from `<state_dir>/calibration/<camera>/<region>.json`
//! ([`save`], [`load`], [`rollback`]); per-frame helpers for the daemon ([`score_norm`],
//! [`psi`], [`DriftWindow`], [`Fingerprint::mismatch`]).
//!
//! Method (the formulas are in `docs/calibration.md`):
//! - **Thresholds** are order statistics of the sorted sample X₍₁₎ ≤ … ≤ X₍N₎. For N independent
//!   good frames and a new one from the same distribution, P(new ≥ X₍r₎) = (N+1−r)/(N+1)
//!   (continuous scores). [`threshold_for_rate`] returns X₍r₎ for the smallest r with
//!   (N+1−r)/(N+1) ≤ α, i.e. r = N+1−k with k = ⌊α(N+1)⌋; k = 0 (α < 1/(N+1)) is
//!   [`CalibError::TooFewFrames`] naming the frames needed, ⌈1/α − 1⌉, and the rate N supports.
//!   T2 (NG at or above) uses α = `target_rate`, T1 (start of UNKNOWN) uses `unknown_rate`
//!   (default 10·α, at most 0.5); `unknown_rate ≥ target_rate`, so T1 ≤ T2 always.
//! - **Quantiles** ([`quantile_sorted`]) are Hyndman–Fan type 6 (numpy `method="weibull"`,
//!   scipy `mquantiles(alphap=0, betap=0)`): position h = p(N+1), linear between neighbours; the
//!   same (N+1) convention as the thresholds. [`Stats::quantiles`] lists 0.5, 0.9, 0.95, 0.99,
//!   0.999 where the sample supports them (h ≤ N, i.e. 1−p ≥ 1/(N+1)).
//! - **Logit statistics**: logit(p) = ln(p/(1−p)) with p clamped to [`LOGIT_EPS`, 1 − `LOGIT_EPS`];
//!   mean and sample standard deviation (ddof 1; 0 for N = 1); the [`Histogram`] has
//!   [`HIST_BINS`] equal bins over logit [−8, 8], values outside counted in the end bins.
//! - **Alarm rate** under N-of-M debounce for independent frames: [`alarm_rate`] = P(Bin(M, α) ≥ N),
//!   summed in log space (no overflow or underflow for M ≤ 1000). Video frames are correlated, so
//!   the real rate is higher; the calibration run should show zero alarms.
//! - **Drift**: [`psi`] is the population stability index of recent scores against the
//!   calibration's decile bins (10 % expected in each), empty bins counted as [`PSI_EPSILON`];
//!   above [`PSI_DRIFT`] (0.2) the region has drifted. [`DriftWindow`] keeps the recent scores.
//! - **score_norm** = sigmoid(logit(score) − logit(T2)), 0.5 exactly at T2; see [`score_norm`].
//!
//! File: pretty JSON of [`Calibration`] (unknown keys refused), `v` = [`FORMAT_VERSION`]; `id`
//! is the first 12 hex digits of the SHA-256 of the compact JSON of the calibration with `id`
//! empty, re-checked on load (a hand-edited or damaged file is refused). [`save`] writes through
//! [`statedir::replace_file`] (atomic, no symlink followed) after shifting the previous versions
//! to `<name>.1.json` … `<name>.3.json` ([`KEEP_PREVIOUS`]); [`rollback`] checks `<name>.1.json`
//! and shifts it back to current (the current one is dropped). The whole frame of a camera
//! without regions is region `""`, file `_frame.json`.
//!
//! Failure modes ([`CalibError`], one line naming the file, camera/region or value): empty,
//! non-finite or out-of-range scores; too few frames for α; bad options; a name that is not a
//! topic level; a calibration file that is unreadable, truncated or not JSON, of another version,
//! for another camera/region, with non-finite or inconsistent values or a wrong id; rollback with
//! no previous version. Nothing here panics on input.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::statedir;

/// Version of the calibration file format (`v`).
pub const FORMAT_VERSION: u32 = 1;

/// Previous versions kept beside the current file for [`rollback`].
pub const KEEP_PREVIOUS: usize = 3;

/// Directory under the state directory.
pub const CALIBRATION_DIR: &str = "calibration";

/// File stem of the implicit whole-frame region (region `""`).
pub const FRAME_STEM: &str = "_frame";

/// Scores are clamped to `[LOGIT_EPS, 1 − LOGIT_EPS]` before the logit (logit range ±13.8).
pub const LOGIT_EPS: f64 = 1e-6;

/// Histogram bins over logit `[HIST_LOGIT_LO, HIST_LOGIT_HI]` (width 0.5).
pub const HIST_BINS: usize = 32;
/// Lower logit edge of the histogram (score ≈ 0.000335).
pub const HIST_LOGIT_LO: f64 = -8.0;
/// Upper logit edge of the histogram (score ≈ 0.999665).
pub const HIST_LOGIT_HI: f64 = 8.0;

/// The probabilities listed in [`Stats::quantiles`] (where the sample supports them).
pub const QUANTILE_PS: [f64; 5] = [0.5, 0.9, 0.95, 0.99, 0.999];

/// Population-stability index above which a region's recent scores have drifted from its
/// calibration (a common alert level).
pub const PSI_DRIFT: f64 = 0.2;

/// Share given to an empty bin in [`psi`] (so ln(0) never appears); shares are not renormalised.
pub const PSI_EPSILON: f64 = 1e-4;

/// Default number of recent scores a [`DriftWindow`] holds. Without drift the PSI is about
/// 9/n + 9/N on average (n recent, N calibration frames; chi-square approximation): 0.027 for
/// n = 500, N = 1000, far enough below [`PSI_DRIFT`].
pub const DRIFT_WINDOW: usize = 500;

/// Relative tolerance in ⌊α(N+1)⌋, so that α = 1/(N+1) typed in decimal counts as supported.
const RATE_TOL: f64 = 1e-9;

/// [`score_norm`] stays in `[NORM_EPS, 1 − NORM_EPS]` (2⁻²⁴: 1 − 2⁻²⁴ is the largest f32 below 1).
const NORM_EPS: f64 = 1.0 / 16_777_216.0;

/// Largest calibration file read back (a real one is a few KiB).
const MAX_FILE: u64 = 1 << 20;

/// Everything that can go wrong in this module.
#[derive(Debug, Error)]
pub enum CalibError {
    #[error("calibration: no scores (a calibration needs good frames)")]
    EmptySample,
    #[error("calibration: score #{index} is {value}, not a finite number")]
    NonFinite { index: usize, value: f32 },
    #[error("calibration: score #{index} is {value}, outside [0, 1] (scores are probabilities)")]
    OutOfRange { index: usize, value: f32 },
    #[error("calibration: the scores are not sorted ascending (score #{index})")]
    NotSorted { index: usize },
    #[error(
        "calibration: {have} good frames are too few for a false-alarm rate of {alpha} per frame: \
         it needs at least {need}; {have} frames support rates down to 1/(N+1) = {supported:.3e}"
    )]
    TooFewFrames {
        have: usize,
        need: u64,
        alpha: f64,
        /// 1/(have+1): the lowest rate this sample supports.
        supported: f64,
    },
    #[error("calibration: {what} = {value}: {expected}")]
    InvalidOption {
        what: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "calibration: {what} {name:?} is not a topic level ([A-Za-z0-9_-], 1 to 64 characters)"
    )]
    InvalidName { what: &'static str, name: String },
    #[error("calibration: psi: {0}")]
    Psi(String),
    #[error("calibration file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("calibration file {path}: corrupt ({reason}); recalibrate, or `--rollback`")]
    Corrupt { path: PathBuf, reason: String },
    #[error("calibration file {path}: {reason}")]
    Foreign { path: PathBuf, reason: String },
    #[error("calibration file {path}: invalid: {reason}; recalibrate, or `--rollback`")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "calibration for camera {camera:?} region {region:?}: no previous version to roll back to ({path} is missing)"
    )]
    NoPrevious {
        camera: String,
        region: String,
        path: PathBuf,
    },
}

/// What a calibration is valid for. The daemon applies a calibration only when the fingerprint
/// of the running region equals the recorded one ([`Fingerprint::mismatch`] is `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    /// SHA-256 (hex) of the ONNX model.
    pub model_sha256: String,
    /// SHA-256 (hex) of the text constant.
    pub text_sha256: String,
    /// Engine backend (`tensorrt`, `cuda`, `cpu`).
    pub backend: String,
    /// Precision (`fp32`, `fp16`, `int8`).
    pub precision: String,
    /// Model input size in pixels (square).
    pub input_size: u32,
    /// Canonical text of the region rectangle: [`rect_frac_text`], [`rect_px_text`] or `"full"`.
    pub rect: String,
    /// [`ignore_sha256`] of the ignore polygons, `""` if none.
    pub ignore_sha256: String,
    /// Decision statistic: `global`, `map_max` or `blend`.
    pub statistic: String,
    /// Few-shot reference bank id, `""` for none.
    pub reference: String,
}

impl Fingerprint {
    /// `None` when `current` matches; otherwise why not, naming the first differing field in
    /// the order of the struct, e.g. `model changed (0123456789ab… → fedcba987654…)`.
    pub fn mismatch(&self, current: &Fingerprint) -> Option<String> {
        let (a, b) = (self, current);
        let fields: [(&str, String, String, bool); 9] = [
            (
                "model",
                a.model_sha256.clone(),
                b.model_sha256.clone(),
                true,
            ),
            (
                "text embedding",
                a.text_sha256.clone(),
                b.text_sha256.clone(),
                true,
            ),
            ("backend", a.backend.clone(), b.backend.clone(), false),
            ("precision", a.precision.clone(), b.precision.clone(), false),
            (
                "input size",
                a.input_size.to_string(),
                b.input_size.to_string(),
                false,
            ),
            ("region rectangle", a.rect.clone(), b.rect.clone(), false),
            (
                "ignore polygons",
                a.ignore_sha256.clone(),
                b.ignore_sha256.clone(),
                true,
            ),
            ("statistic", a.statistic.clone(), b.statistic.clone(), false),
            (
                "reference bank",
                a.reference.clone(),
                b.reference.clone(),
                false,
            ),
        ];
        let show = |s: &str, hash: bool| -> String {
            if s.is_empty() {
                "none".to_owned()
            } else if hash && s.chars().count() > 12 {
                format!("{}…", s.chars().take(12).collect::<String>())
            } else {
                s.to_owned()
            }
        };
        fields
            .into_iter()
            .find(|(_, old, new, _)| old != new)
            .map(|(what, old, new, hash)| {
                format!(
                    "{what} changed ({} → {})",
                    show(&old, hash),
                    show(&new, hash)
                )
            })
    }
}

/// Canonical [`Fingerprint::rect`] of a rectangle in fractions of the frame (x, y, w, h):
/// `frac:<x>,<y>,<w>,<h>` with Rust's shortest round-trip formatting (`0.5`, `1`, `0.125`).
pub fn rect_frac_text(rect: [f64; 4]) -> String {
    format!("frac:{},{},{},{}", rect[0], rect[1], rect[2], rect[3])
}

/// Canonical [`Fingerprint::rect`] of a rectangle in pixels of the full frame (x, y, w, h).
pub fn rect_px_text(rect: [u32; 4]) -> String {
    format!("px:{},{},{},{}", rect[0], rect[1], rect[2], rect[3])
}

/// Canonical [`Fingerprint::rect`] of the implicit whole-frame region.
pub const RECT_FULL: &str = "full";

/// SHA-256 (hex) of the canonical text of ignore polygons, `""` for none. Canonical text: the
/// polygons in config order joined by `|`, each as its points `x,y` joined by `;`, numbers in
/// Rust's shortest round-trip formatting (so `[[[0.1,0.1],[0.2,0.1],[0.2,0.2]]]` →
/// `0.1,0.1;0.2,0.1;0.2,0.2`).
pub fn ignore_sha256(polygons: &[Vec<[f64; 2]>]) -> String {
    if polygons.is_empty() {
        return String::new();
    }
    let text = polygons
        .iter()
        .map(|poly| {
            poly.iter()
                .map(|[x, y]| format!("{x},{y}"))
                .collect::<Vec<_>>()
                .join(";")
        })
        .collect::<Vec<_>>()
        .join("|");
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// How to calibrate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// α: the per-frame false-NG rate that T2 is set for, in (0, 1).
    pub target_rate: f64,
    /// The per-frame rate of good frames at or above T1 (start of UNKNOWN), in
    /// [`target_rate`](Self::target_rate), 1).
    pub unknown_rate: f64,
    /// The region's debounce, N of M (raise count, window), for [`Calibration::alarm_rate`].
    pub debounce: Option<(u32, u32)>,
}

impl Options {
    /// α for T2, 10·α (at most 0.5, at least α) for T1, no debounce.
    pub fn new(target_rate: f64) -> Self {
        Self {
            target_rate,
            unknown_rate: (10.0 * target_rate).min(0.5).max(target_rate),
            debounce: None,
        }
    }

    /// Checks the rates and the debounce (done by [`calibrate`] too): α in (0, 1), the UNKNOWN
    /// rate in [α, 1), N of M with 1 ≤ N ≤ M ≤ [`crate::alarm::MAX_WINDOW`].
    pub fn validate(&self) -> Result<(), CalibError> {
        if !(self.target_rate > 0.0 && self.target_rate < 1.0) {
            return Err(CalibError::InvalidOption {
                what: "target false-alarm rate",
                value: self.target_rate.to_string(),
                expected: "expected a rate per frame in (0, 1), e.g. 0.001",
            });
        }
        if !(self.target_rate..1.0).contains(&self.unknown_rate) {
            return Err(CalibError::InvalidOption {
                what: "UNKNOWN rate",
                value: self.unknown_rate.to_string(),
                expected: "expected a rate per frame at least the target rate and below 1",
            });
        }
        if let Some((n, m)) = self.debounce
            && (n == 0 || m == 0 || n > m || m > crate::alarm::MAX_WINDOW)
        {
            return Err(CalibError::InvalidOption {
                what: "debounce",
                value: format!("{n} of {m}"),
                expected: "expected N of M with 1 ≤ N ≤ M ≤ 1000",
            });
        }
        Ok(())
    }
}

/// Fixed-bin histogram of the scores' logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Histogram {
    /// Lower logit edge of bin 0 ([`HIST_LOGIT_LO`]); values below count in bin 0.
    pub logit_lo: f64,
    /// Upper logit edge of the last bin ([`HIST_LOGIT_HI`]); values above count in it.
    pub logit_hi: f64,
    /// Frames per bin; bins of equal width (`(logit_hi − logit_lo) / counts.len()`).
    pub counts: Vec<u64>,
}

/// Statistics of the calibration sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    /// N: good frames.
    pub n: usize,
    pub min: f32,
    pub max: f32,
    /// Mean of logit(score) (scores clamped to [`LOGIT_EPS`]).
    pub mean_logit: f64,
    /// Sample standard deviation (ddof 1) of logit(score); 0 for N = 1.
    pub std_logit: f64,
    /// (p, type-6 quantile) for the [`QUANTILE_PS`] the sample supports.
    pub quantiles: Vec<(f64, f32)>,
    pub histogram: Histogram,
    /// The type-6 quantiles at 0.1 … 0.9 (9 edges, clamped to min/max for tiny samples): the
    /// bins of [`psi`].
    pub deciles: Vec<f32>,
}

/// One region's calibration, as stored in its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// [`FORMAT_VERSION`].
    pub v: u32,
    /// First 12 hex digits of the SHA-256 of the compact JSON of this struct with `id` empty.
    pub id: String,
    pub created_unix_ms: u64,
    pub camera: String,
    /// `""` = the whole frame of a camera without regions.
    pub region: String,
    /// `camera` or `folder:<path>`.
    pub source: String,
    pub fingerprint: Fingerprint,
    pub stats: Stats,
    /// Start of UNKNOWN (score ≥ t1).
    pub t1: f32,
    /// NG threshold (score ≥ t2).
    pub t2: f32,
    pub target_rate: f64,
    pub unknown_rate: f64,
    /// 1/(N+1): the lowest per-frame rate the sample supports (new good frame above the max).
    pub min_supported_rate: f64,
    /// P(alarm) per frame under the N-of-M debounce at `target_rate`, independent frames.
    pub alarm_rate: Option<f64>,
    /// Human-readable remarks on what the sample supports.
    pub notes: Vec<String>,
}

impl Calibration {
    /// The id of this calibration's content (see the module docs).
    pub fn compute_id(&self) -> String {
        let mut c = self.clone();
        c.id = String::new();
        // Serialising plain structs of strings and numbers cannot fail.
        let bytes = serde_json::to_vec(&c).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))[..12].to_owned()
    }

    /// Consistency of the values (finite, ordered, in range); `Err(reason)`.
    fn check(&self) -> Result<(), String> {
        let s = &self.stats;
        let f32s = [
            ("t1", self.t1),
            ("t2", self.t2),
            ("stats.min", s.min),
            ("stats.max", s.max),
        ];
        for (k, v) in f32s {
            if !v.is_finite() || !(0.0..=1.0).contains(&v) {
                return Err(format!("{k} = {v}, expected a score in [0, 1]"));
            }
        }
        let f64s = [
            ("stats.mean_logit", s.mean_logit),
            ("stats.std_logit", s.std_logit),
            ("target_rate", self.target_rate),
            ("unknown_rate", self.unknown_rate),
            ("min_supported_rate", self.min_supported_rate),
            ("alarm_rate", self.alarm_rate.unwrap_or(0.0)),
        ];
        for (k, v) in f64s {
            if !v.is_finite() {
                return Err(format!("{k} = {v}, expected a finite number"));
            }
        }
        if self.t1 > self.t2 {
            return Err(format!("t1 = {} is above t2 = {}", self.t1, self.t2));
        }
        if !(self.target_rate > 0.0 && self.target_rate < 1.0) {
            return Err(format!(
                "target_rate = {}, expected (0, 1)",
                self.target_rate
            ));
        }
        if s.n == 0 || s.min > s.max {
            return Err(format!(
                "stats: n = {}, min = {}, max = {}",
                s.n, s.min, s.max
            ));
        }
        if s.deciles.len() != 9 || !s.deciles.iter().all(|d| d.is_finite()) {
            return Err(format!(
                "stats.deciles: expected 9 finite edges, got {:?}",
                s.deciles
            ));
        }
        if s.deciles.windows(2).any(|w| w[0] > w[1]) {
            return Err("stats.deciles are not ascending".to_owned());
        }
        if s.quantiles
            .iter()
            .any(|(p, q)| !p.is_finite() || !q.is_finite())
        {
            return Err("stats.quantiles hold a non-finite value".to_owned());
        }
        let h = &s.histogram;
        if h.counts.is_empty()
            || !(h.logit_lo.is_finite() && h.logit_hi.is_finite() && h.logit_lo < h.logit_hi)
        {
            return Err("stats.histogram: expected bins and finite ascending edges".to_owned());
        }
        Ok(())
    }
}

/// Checks a score sample: non-empty, finite, in [0, 1].
fn check_scores(scores: &[f32]) -> Result<(), CalibError> {
    if scores.is_empty() {
        return Err(CalibError::EmptySample);
    }
    for (index, &value) in scores.iter().enumerate() {
        if !value.is_finite() {
            return Err(CalibError::NonFinite { index, value });
        }
        if !(0.0..=1.0).contains(&value) {
            return Err(CalibError::OutOfRange { index, value });
        }
    }
    Ok(())
}

/// k = ⌊α(N+1)⌋ (with [`RATE_TOL`]): how many of the N+1 frames may lie at or above the
/// threshold for rate α.
fn allowed_above(n: usize, alpha: f64) -> u64 {
    let k = (alpha * (n as f64 + 1.0) * (1.0 + RATE_TOL)).floor();
    if k <= 0.0 { 0 } else { k.min(n as f64) as u64 }
}

/// Good frames needed for rate α: the smallest N with ⌊α(N+1)⌋ ≥ 1, i.e. ⌈1/α − 1⌉.
pub fn frames_needed(alpha: f64) -> u64 {
    if alpha.is_nan() || alpha <= 0.0 {
        return u64::MAX;
    }
    let need = (1.0 / alpha - 1.0).ceil().max(1.0);
    if need >= u64::MAX as f64 {
        return u64::MAX;
    }
    let mut need = need as u64;
    // Agree exactly with `allowed_above` around the rounding tolerance.
    while need > 1 && allowed_above((need - 1) as usize, alpha) >= 1 {
        need -= 1;
    }
    while allowed_above(need as usize, alpha) < 1 {
        need += 1;
    }
    need
}

/// The threshold for a per-frame false-alarm rate α from `sorted` (ascending) good scores:
/// X₍r₎ for the smallest r with (N+1−r)/(N+1) ≤ α. Errors: empty, non-finite, not sorted,
/// α outside (0, 1), and [`CalibError::TooFewFrames`] when α < 1/(N+1).
pub fn threshold_for_rate(sorted: &[f32], alpha: f64) -> Result<f32, CalibError> {
    if sorted.is_empty() {
        return Err(CalibError::EmptySample);
    }
    if let Some((index, &value)) = sorted.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(CalibError::NonFinite { index, value });
    }
    if let Some(i) = sorted.windows(2).position(|w| w[0] > w[1]) {
        return Err(CalibError::NotSorted { index: i + 1 });
    }
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(CalibError::InvalidOption {
            what: "false-alarm rate",
            value: alpha.to_string(),
            expected: "expected a rate per frame in (0, 1)",
        });
    }
    let n = sorted.len();
    let k = allowed_above(n, alpha);
    if k == 0 {
        return Err(CalibError::TooFewFrames {
            have: n,
            need: frames_needed(alpha),
            alpha,
            supported: 1.0 / (n as f64 + 1.0),
        });
    }
    // r = N + 1 − k (1-based), k in 1..=N.
    let r = n + 1 - k as usize;
    Ok(sorted[r - 1])
}

/// The type-6 (Weibull, numpy `method="weibull"`) p-quantile of ascending `sorted` (non-empty):
/// h = p(N+1); X₍⌊h⌋₎ + (h − ⌊h⌋)(X₍⌊h⌋+1₎ − X₍⌊h⌋₎), clamped to X₍₁₎ below h = 1 and X₍N₎ above
/// h = N. Computed in f64.
pub fn quantile_sorted(sorted: &[f32], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    let h = p * (n as f64 + 1.0);
    if h <= 1.0 {
        return f64::from(sorted[0]);
    }
    if h >= n as f64 {
        return f64::from(sorted[n - 1]);
    }
    let j = h.floor();
    let g = h - j;
    let j = j as usize; // 1-based index, 1 ≤ j < N
    let a = f64::from(sorted[j - 1]);
    let b = f64::from(sorted[j]);
    a + g * (b - a)
}

/// logit of a score, clamped to [`LOGIT_EPS`].
fn logit(p: f64) -> f64 {
    let p = p.clamp(LOGIT_EPS, 1.0 - LOGIT_EPS);
    (p / (1.0 - p)).ln()
}

/// The statistics of a score sample (checked: non-empty, finite, in [0, 1]).
pub fn stats(scores: &[f32]) -> Result<Stats, CalibError> {
    check_scores(scores)?;
    let mut sorted = scores.to_vec();
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    let logits: Vec<f64> = sorted.iter().map(|&s| logit(f64::from(s))).collect();
    let mean = logits.iter().sum::<f64>() / n as f64;
    let std = if n > 1 {
        (logits.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>() / (n as f64 - 1.0)).sqrt()
    } else {
        0.0
    };
    let quantiles = QUANTILE_PS
        .iter()
        .filter(|&&p| quantile_supported(n, p))
        .map(|&p| (p, quantile_sorted(&sorted, p) as f32))
        .collect();
    let mut counts = vec![0u64; HIST_BINS];
    let width = (HIST_LOGIT_HI - HIST_LOGIT_LO) / HIST_BINS as f64;
    for &l in &logits {
        let b = ((l - HIST_LOGIT_LO) / width).floor();
        let b = b.clamp(0.0, (HIST_BINS - 1) as f64) as usize;
        counts[b] += 1;
    }
    let deciles = (1..=9)
        .map(|i| quantile_sorted(&sorted, f64::from(i) / 10.0) as f32)
        .collect();
    Ok(Stats {
        n,
        min: sorted[0],
        max: sorted[n - 1],
        mean_logit: mean,
        std_logit: std,
        quantiles,
        histogram: Histogram {
            logit_lo: HIST_LOGIT_LO,
            logit_hi: HIST_LOGIT_HI,
            counts,
        },
        deciles,
    })
}

/// A p-quantile is supported by N frames when 1/(N+1) ≤ p and 1 − p ≥ 1/(N+1) (h within 1..=N).
fn quantile_supported(n: usize, p: f64) -> bool {
    let h = p * (n as f64 + 1.0);
    (1.0 - RATE_TOL..=n as f64 * (1.0 + RATE_TOL)).contains(&h)
}

/// P(at least `n` of `m` independent frames over the threshold) at per-frame rate `alpha`:
/// Σ_{k≥n} C(m,k) αᵏ (1−α)^(m−k), summed in log space (ln C by a compensated running sum of logs). `n = 0`
/// gives 1, `n > m` gives 0; α is clamped to [0, 1] and a NaN α gives 1 (the pessimistic answer).
pub fn alarm_rate(alpha: f64, n: u32, m: u32) -> f64 {
    if n == 0 {
        return 1.0;
    }
    if n > m {
        return 0.0;
    }
    if alpha.is_nan() || alpha >= 1.0 {
        return 1.0;
    }
    if alpha <= 0.0 {
        return 0.0;
    }
    let (n, m) = (u64::from(n), u64::from(m));
    let ln_a = alpha.ln();
    let ln_b = (-alpha).ln_1p();
    // ln C(m, n) = Σ_{i=1..n} ln((m − n + i) / i), summed with compensation: the sum reaches
    // ~690 for m = 1000, and plain accumulation loses ~1e-12 of relative accuracy in exp(·).
    let mut ln_c = Neumaier::default();
    for i in 1..=n {
        ln_c.add(((m - n + i) as f64 / i as f64).ln());
    }
    let mut logs = Vec::with_capacity((m - n + 1) as usize);
    let mut k = n;
    loop {
        let mut l = ln_c;
        l.add(k as f64 * ln_a);
        l.add((m - k) as f64 * ln_b);
        logs.push(l.total());
        if k == m {
            break;
        }
        // C(m, k+1) = C(m, k) (m − k) / (k + 1).
        ln_c.add(((m - k) as f64 / (k + 1) as f64).ln());
        k += 1;
    }
    let top = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if top == f64::NEG_INFINITY {
        return 0.0;
    }
    let sum: f64 = logs.iter().map(|l| (l - top).exp()).sum();
    (top.exp() * sum).min(1.0)
}

/// Neumaier (improved Kahan) compensated sum.
#[derive(Debug, Clone, Copy, Default)]
struct Neumaier {
    sum: f64,
    comp: f64,
}

impl Neumaier {
    fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.comp += (self.sum - t) + x;
        } else {
            self.comp += (x - t) + self.sum;
        }
        self.sum = t;
    }

    fn total(self) -> f64 {
        self.sum + self.comp
    }
}

/// Calibrates one camera/region from the scores of good frames; see the module docs.
pub fn calibrate(
    scores: &[f32],
    opts: &Options,
    fingerprint: Fingerprint,
    camera: &str,
    region: &str,
    source: &str,
    now_unix_ms: u64,
) -> Result<Calibration, CalibError> {
    check_name("camera", camera)?;
    if !region.is_empty() {
        check_name("region", region)?;
    }
    opts.validate()?;
    let stats = stats(scores)?;
    let mut sorted = scores.to_vec();
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    let t2 = threshold_for_rate(&sorted, opts.target_rate)?;
    let t1 = threshold_for_rate(&sorted, opts.unknown_rate)?.min(t2);
    let min_supported_rate = 1.0 / (n as f64 + 1.0);
    let k2 = allowed_above(n, opts.target_rate);
    let mut notes = vec![format!(
        "with {n} good frames the maximum ({}) is exceeded by a new good frame with probability \
         1/(N+1) = {:.3}%",
        stats.max,
        100.0 * min_supported_rate
    )];
    notes.push(format!(
        "T2 = {t2} is the {}-th highest of {n} scores: a new good frame reaches it with \
         probability {k2}/{} = {:.4}% (target {:.4}%)",
        k2,
        n + 1,
        100.0 * k2 as f64 / (n as f64 + 1.0),
        100.0 * opts.target_rate
    ));
    let stable = 10.0 / opts.target_rate;
    if (n as f64) < stable {
        notes.push(format!(
            "a stable estimate for a rate of {} per frame needs about 10/α = {:.0} frames; with \
             {n} T2 rests on the top {k2} score(s) and may move with a new sample",
            opts.target_rate, stable
        ));
    }
    if t1 == t2 {
        notes.push("T1 equals T2: no UNKNOWN band in this sample".to_owned());
    }
    let alarm = opts.debounce.map(|(dn, dm)| {
        let a = alarm_rate(opts.target_rate, dn, dm);
        notes.push(format!(
            "under the {dn}-of-{dm} debounce an alarm condition holds at a frame with probability \
             {a:.3e} for independent frames; video frames are correlated, so the real rate is \
             higher: the calibration run must show zero alarms"
        ));
        a
    });
    let mut cal = Calibration {
        v: FORMAT_VERSION,
        id: String::new(),
        created_unix_ms: now_unix_ms,
        camera: camera.to_owned(),
        region: region.to_owned(),
        source: source.to_owned(),
        fingerprint,
        stats,
        t1,
        t2,
        target_rate: opts.target_rate,
        unknown_rate: opts.unknown_rate,
        min_supported_rate,
        alarm_rate: alarm,
        notes,
    };
    cal.id = cal.compute_id();
    Ok(cal)
}

/// The normalised score for HMIs: sigmoid(logit(value) − logit(t2)) =
/// v(1−t)/(v(1−t) + t(1−v)), with v and t clamped to [[`LOGIT_EPS`], 1 − [`LOGIT_EPS`]] and the
/// result to [2⁻²⁴, 1 − 2⁻²⁴], so it lies in (0, 1). Exactly 0.5 at `value == t2`, monotone
/// non-decreasing in `value`. A NaN value gives 0.5 (no evidence either way); the daemon never
/// passes one (non-finite scores are reported as such before this).
pub fn score_norm(value: f32, t2: f32) -> f32 {
    if value.is_nan() || t2.is_nan() {
        return 0.5;
    }
    let v = f64::from(value).clamp(LOGIT_EPS, 1.0 - LOGIT_EPS);
    let t = f64::from(t2).clamp(LOGIT_EPS, 1.0 - LOGIT_EPS);
    let a = v * (1.0 - t);
    let b = t * (1.0 - v);
    ((a / (a + b)).clamp(NORM_EPS, 1.0 - NORM_EPS)) as f32
}

/// Population stability index of `recent` scores against the 9 `deciles` of a calibration
/// (10 bins: ≤ d₁, (d₁, d₂], …, > d₉; 10 % expected in each): Σ (aᵢ − 0.1) ln(aᵢ / 0.1), aᵢ the
/// share of recent scores in bin i, an empty bin counted as [`PSI_EPSILON`]. Errors: deciles not
/// 9 finite ascending values; `recent` empty or non-finite.
pub fn psi(deciles: &[f32], recent: &[f32]) -> Result<f64, CalibError> {
    if deciles.len() != 9 || !deciles.iter().all(|d| d.is_finite()) {
        return Err(CalibError::Psi(format!(
            "expected 9 finite decile edges, got {}",
            deciles.len()
        )));
    }
    if deciles.windows(2).any(|w| w[0] > w[1]) {
        return Err(CalibError::Psi(
            "the decile edges are not ascending".to_owned(),
        ));
    }
    if recent.is_empty() {
        return Err(CalibError::Psi("no recent scores".to_owned()));
    }
    if let Some((i, v)) = recent.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(CalibError::Psi(format!(
            "recent score #{i} is {v}, not finite"
        )));
    }
    let mut counts = [0usize; 10];
    for &v in recent {
        counts[deciles.partition_point(|&d| d < v)] += 1;
    }
    let total = recent.len() as f64;
    let e = 0.1;
    Ok(counts
        .iter()
        .map(|&c| {
            let a = (c as f64 / total).max(PSI_EPSILON);
            (a - e) * (a / e).ln()
        })
        .sum())
}

/// The last `capacity` finite scores of a region, for the drift check.
#[derive(Debug, Clone)]
pub struct DriftWindow {
    capacity: usize,
    scores: std::collections::VecDeque<f32>,
}

impl DriftWindow {
    /// A window of `capacity` (at least 1) scores; [`DRIFT_WINDOW`] is a sensible default.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            scores: std::collections::VecDeque::with_capacity(capacity),
        }
    }

    /// Adds a score (non-finite ones are skipped), dropping the oldest when full.
    pub fn push(&mut self, score: f32) {
        if !score.is_finite() {
            return;
        }
        if self.scores.len() == self.capacity {
            self.scores.pop_front();
        }
        self.scores.push_back(score);
    }

    /// Whether the window holds `capacity` scores.
    pub fn is_full(&self) -> bool {
        self.scores.len() == self.capacity
    }

    /// Forgets all scores (after a new calibration or a reconnect).
    pub fn clear(&mut self) {
        self.scores.clear();
    }

    /// PSI of the window against `cal`'s deciles once the window is full; `None` before.
    pub fn psi(&self, cal: &Calibration) -> Option<f64> {
        if !self.is_full() {
            return None;
        }
        let recent: Vec<f32> = self.scores.iter().copied().collect();
        psi(&cal.stats.deciles, &recent).ok()
    }

    /// The type-6 p-quantile of the window (e.g. 0.99 to compare with the calibration's p99);
    /// `None` while empty.
    pub fn quantile(&self, p: f64) -> Option<f32> {
        if self.scores.is_empty() {
            return None;
        }
        let mut sorted: Vec<f32> = self.scores.iter().copied().collect();
        sorted.sort_by(f32::total_cmp);
        Some(quantile_sorted(&sorted, p) as f32)
    }
}

/// Camera and region names are topic levels: `[A-Za-z0-9_-]{1,64}` (so they are safe file names).
fn check_name(what: &'static str, name: &str) -> Result<(), CalibError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CalibError::InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

/// `<state_dir>/calibration/<camera>/`, checked names.
fn camera_dir(state_dir: &Path, camera: &str, region: &str) -> Result<PathBuf, CalibError> {
    check_name("camera", camera)?;
    if !region.is_empty() {
        check_name("region", region)?;
    }
    Ok(state_dir.join(CALIBRATION_DIR).join(camera))
}

fn stem(region: &str) -> &str {
    if region.is_empty() {
        FRAME_STEM
    } else {
        region
    }
}

/// The current calibration file of a camera/region: `<state_dir>/calibration/<camera>/<region
/// or _frame>.json`.
pub fn file_path(state_dir: &Path, camera: &str, region: &str) -> Result<PathBuf, CalibError> {
    Ok(camera_dir(state_dir, camera, region)?.join(format!("{}.json", stem(region))))
}

/// The i-th previous version (1 = the most recent).
fn previous_path(dir: &Path, region: &str, i: usize) -> PathBuf {
    dir.join(format!("{}.{i}.json", stem(region)))
}

/// Makes `dir` (and parents) as real directories: a symlink on the way is refused.
fn ensure_dir(dir: &Path) -> Result<(), CalibError> {
    let io_err = |path: &Path, source| CalibError::Io {
        path: path.to_owned(),
        source,
    };
    statedir::create_dir(dir).map_err(|e| io_err(dir, e))?;
    for d in [dir.parent().unwrap_or(dir), dir] {
        let meta = std::fs::symlink_metadata(d).map_err(|e| io_err(d, e))?;
        if !meta.is_dir() {
            return Err(io_err(
                d,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a real directory (a symbolic link or a file): remove it",
                ),
            ));
        }
    }
    Ok(())
}

/// Renames `from` to `to` if `from` exists (`Ok(false)` if it does not).
fn shift(from: &Path, to: &Path) -> Result<bool, CalibError> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CalibError::Io {
            path: from.to_owned(),
            source,
        }),
    }
}

/// Writes `cal` as the current calibration of its camera/region (atomically), after shifting
/// the current one and older ones to `.1.json` … `.3.json` (the oldest beyond that is dropped).
/// Returns the path written.
pub fn save(state_dir: &Path, cal: &Calibration) -> Result<PathBuf, CalibError> {
    let dir = camera_dir(state_dir, &cal.camera, &cal.region)?;
    let path = dir.join(format!("{}.json", stem(&cal.region)));
    if let Err(reason) = cal.check() {
        return Err(CalibError::Invalid { path, reason });
    }
    if cal.id != cal.compute_id() {
        return Err(CalibError::Invalid {
            path,
            reason: format!(
                "id {} does not match its content ({})",
                cal.id,
                cal.compute_id()
            ),
        });
    }
    ensure_dir(&dir)?;
    let mut text = serde_json::to_string_pretty(cal).map_err(|e| CalibError::Invalid {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    text.push('\n');
    for i in (1..KEEP_PREVIOUS).rev() {
        shift(
            &previous_path(&dir, &cal.region, i),
            &previous_path(&dir, &cal.region, i + 1),
        )?;
    }
    shift(&path, &previous_path(&dir, &cal.region, 1))?;
    statedir::replace_file(&path, text.as_bytes()).map_err(|source| CalibError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Parses and checks one calibration file for `camera`/`region`.
fn read_checked(
    path: &Path,
    camera: &str,
    region: &str,
) -> Result<Option<Calibration>, CalibError> {
    let bytes = match statedir::read_file(path) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(source) => {
            return Err(CalibError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    if bytes.len() as u64 > MAX_FILE {
        return Err(CalibError::Corrupt {
            path: path.to_owned(),
            reason: format!(
                "{} bytes, more than a calibration file holds ({MAX_FILE})",
                bytes.len()
            ),
        });
    }
    // Version first, so a file of another version says so instead of a field error.
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| CalibError::Corrupt {
            path: path.to_owned(),
            reason: if e.is_eof() {
                format!("truncated: {e}")
            } else {
                format!("not JSON: {e}")
            },
        })?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(CalibError::Foreign {
                path: path.to_owned(),
                reason: format!(
                    "format version {v}, this build reads version {FORMAT_VERSION}: recalibrate"
                ),
            });
        }
        None => {
            return Err(CalibError::Foreign {
                path: path.to_owned(),
                reason: "not an anomalyclip-edge calibration file (no version `v`)".to_owned(),
            });
        }
    }
    let cal: Calibration = serde_json::from_value(value).map_err(|e| CalibError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if cal.camera != camera || cal.region != region {
        return Err(CalibError::Foreign {
            path: path.to_owned(),
            reason: format!(
                "holds the calibration of camera {:?} region {:?}, not camera {camera:?} region \
                 {region:?}: recalibrate this one",
                cal.camera, cal.region
            ),
        });
    }
    if let Err(reason) = cal.check() {
        return Err(CalibError::Invalid {
            path: path.to_owned(),
            reason,
        });
    }
    let id = cal.compute_id();
    if cal.id != id {
        return Err(CalibError::Invalid {
            path: path.to_owned(),
            reason: format!(
                "id {:?} does not match its content ({id}): edited or damaged",
                cal.id
            ),
        });
    }
    Ok(Some(cal))
}

/// The current calibration of a camera/region; `Ok(None)` when it has none.
pub fn load(
    state_dir: &Path,
    camera: &str,
    region: &str,
) -> Result<Option<Calibration>, CalibError> {
    let path = file_path(state_dir, camera, region)?;
    read_checked(&path, camera, region)
}

/// Makes the previous version current (`.1.json` → current, `.2.json` → `.1.json`, …); the
/// current one is dropped. The previous version is checked first; nothing changes on error.
pub fn rollback(state_dir: &Path, camera: &str, region: &str) -> Result<Calibration, CalibError> {
    let dir = camera_dir(state_dir, camera, region)?;
    let path = dir.join(format!("{}.json", stem(region)));
    let prev = previous_path(&dir, region, 1);
    let Some(cal) = read_checked(&prev, camera, region)? else {
        return Err(CalibError::NoPrevious {
            camera: camera.to_owned(),
            region: region.to_owned(),
            path: prev,
        });
    };
    shift(&prev, &path)?;
    for i in 2..=KEEP_PREVIOUS {
        shift(
            &previous_path(&dir, region, i),
            &previous_path(&dir, region, i - 1),
        )?;
    }
    statedir::sync_dir(&path).map_err(|source| CalibError::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(cal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixture() -> Value {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calibration/expected.json");
        serde_json::from_slice(&std::fs::read(&path).expect("fixture")).expect("fixture JSON")
    }

    fn f32s(v: &Value) -> Vec<f32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number") as f32)
            .collect()
    }

    fn fp() -> Fingerprint {
        Fingerprint {
            model_sha256: "0123456789abcdef0123456789abcdef".into(),
            text_sha256: "fedcba9876543210fedcba9876543210".into(),
            backend: "cpu".into(),
            precision: "fp32".into(),
            input_size: 518,
            rect: rect_frac_text([0.0, 0.0, 0.5, 1.0]),
            ignore_sha256: String::new(),
            statistic: "global".into(),
            reference: String::new(),
        }
    }

    /// 19 scores 0.01, 0.02, … 0.19 (N = 19, so N + 1 = 20).
    fn nineteen() -> Vec<f32> {
        (1..=19).map(|i| i as f32 / 100.0).collect()
    }

    fn cal_for(camera: &str, region: &str, now: u64) -> Calibration {
        let scores: Vec<f32> = (0..200)
            .map(|i| (i as f32 * 0.618_034).fract() * 0.6)
            .collect();
        let mut o = Options::new(0.01);
        o.debounce = Some((3, 5));
        calibrate(&scores, &o, fp(), camera, region, "folder:/data/good", now).expect("calibrate")
    }

    #[test]
    fn the_threshold_is_the_order_statistic_for_the_smallest_r_with_rate_at_most_alpha() {
        let x = nineteen();
        // α = 0.05: k = ⌊0.05·20⌋ = 1 → r = 19 → the maximum.
        assert_eq!(threshold_for_rate(&x, 0.05).unwrap(), 0.19);
        // α = 0.1: k = 2 → r = 18; (20 − 18)/20 = 0.1 ≤ 0.1, while r = 17 gives 0.15 > 0.1.
        assert_eq!(threshold_for_rate(&x, 0.1).unwrap(), 0.18);
        // α = 0.149: k = 2 still.
        assert_eq!(threshold_for_rate(&x, 0.149).unwrap(), 0.18);
        assert_eq!(threshold_for_rate(&x, 0.15).unwrap(), 0.17);
        // α = 0.5: k = 10 → r = 10.
        assert_eq!(threshold_for_rate(&x, 0.5).unwrap(), 0.10);
        // α = 0.99: k = 19 → r = 1, the minimum.
        assert_eq!(threshold_for_rate(&x, 0.99).unwrap(), 0.01);
    }

    #[test]
    fn a_rate_below_one_over_n_plus_one_is_too_few_frames_naming_have_need_and_the_supported_rate()
    {
        let err = threshold_for_rate(&nineteen(), 0.04).unwrap_err();
        match &err {
            CalibError::TooFewFrames {
                have,
                need,
                supported,
                ..
            } => {
                assert_eq!((*have, *need), (19, 24));
                assert!((supported - 0.05).abs() < 1e-15);
            }
            e => panic!("{e:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("19 good frames") && msg.contains("at least 24"),
            "{msg}"
        );
        assert!(msg.contains("5.000e-2"), "{msg}");
    }

    #[test]
    fn frames_needed_is_the_smallest_sample_that_threshold_for_rate_accepts() {
        for alpha in [
            0.5,
            0.3,
            0.1,
            0.05,
            0.02,
            0.01,
            0.0033,
            0.001,
            1.0 / 300.0,
            1e-4,
        ] {
            let need = frames_needed(alpha) as usize;
            let ok = vec![0.5f32; need];
            assert!(
                threshold_for_rate(&ok, alpha).is_ok(),
                "α {alpha} need {need}"
            );
            let short = vec![0.5f32; need - 1];
            if need > 1 {
                assert!(
                    matches!(
                        threshold_for_rate(&short, alpha),
                        Err(CalibError::TooFewFrames { .. })
                    ),
                    "α {alpha} need {need}"
                );
            }
        }
        assert_eq!(frames_needed(0.001), 999);
        assert_eq!(frames_needed(0.01), 99);
        assert_eq!(frames_needed(1.0 / 300.0), 299);
    }

    #[test]
    fn thresholds_match_the_exact_rational_reference_on_the_fixture_samples() {
        let fx = fixture();
        for s in fx["samples"].as_array().unwrap() {
            let mut x = f32s(&s["scores"]);
            x.sort_by(f32::total_cmp);
            for t in s["thresholds"].as_array().unwrap() {
                let alpha = t["alpha"].as_f64().unwrap();
                let got = threshold_for_rate(&x, alpha);
                match t["threshold"].as_f64() {
                    Some(want) => assert_eq!(got.unwrap(), want as f32, "{} α {alpha}", s["name"]),
                    None => match got {
                        Err(CalibError::TooFewFrames { need, .. }) => {
                            assert_eq!(need, t["need"].as_u64().unwrap(), "{} α {alpha}", s["name"])
                        }
                        other => panic!("{} α {alpha}: {other:?}", s["name"]),
                    },
                }
            }
        }
    }

    #[test]
    fn quantiles_deciles_and_logit_statistics_match_numpy() {
        let fx = fixture();
        for s in fx["samples"].as_array().unwrap() {
            let name = &s["name"];
            let x = f32s(&s["scores"]);
            let mut sorted = x.clone();
            sorted.sort_by(f32::total_cmp);
            for q in s["quantiles"].as_array().unwrap() {
                let (p, want) = (q[0].as_f64().unwrap(), q[1].as_f64().unwrap());
                let got = quantile_sorted(&sorted, p);
                assert!((got - want).abs() <= 1e-12, "{name} p {p}: {got} vs {want}");
            }
            let st = stats(&x).unwrap();
            assert_eq!(st.n, x.len());
            for (got, want) in st.deciles.iter().zip(f32s(&s["deciles"])) {
                assert!((got - want).abs() <= 1e-7, "{name} deciles {got} vs {want}");
            }
            for (p, got) in &st.quantiles {
                assert!(quantile_supported(x.len(), *p), "{name} p {p}");
                let want = quantile_sorted(&sorted, *p) as f32;
                assert_eq!(*got, want);
            }
            let mean = s["mean_logit"].as_f64().unwrap();
            let std = s["std_logit"].as_f64().unwrap();
            assert!(
                (st.mean_logit - mean).abs() <= 1e-12 * mean.abs().max(1.0),
                "{name}"
            );
            assert!((st.std_logit - std).abs() <= 1e-12 * std.max(1.0), "{name}");
            let hist: Vec<u64> = s["histogram"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(st.histogram.counts, hist, "{name}");
            assert_eq!(st.histogram.counts.iter().sum::<u64>(), x.len() as u64);
        }
    }

    #[test]
    fn listed_quantiles_are_those_the_sample_supports() {
        // N = 99: 0.99 needs h = 99 ≤ 99 (kept), 0.999 needs h = 99.9 > 99 (dropped).
        let x: Vec<f32> = (1..=99).map(|i| i as f32 / 100.0).collect();
        let ps: Vec<f64> = stats(&x).unwrap().quantiles.iter().map(|q| q.0).collect();
        assert_eq!(ps, vec![0.5, 0.9, 0.95, 0.99]);
        let ps: Vec<f64> = stats(&[0.3])
            .unwrap()
            .quantiles
            .iter()
            .map(|q| q.0)
            .collect();
        assert_eq!(ps, vec![0.5]);
    }

    #[test]
    fn alarm_rate_matches_scipy_binom_sf_to_1e_12_relative() {
        let fx = fixture();
        for c in fx["alarm_rate"].as_array().unwrap() {
            let (a, n, m) = (
                c["alpha"].as_f64().unwrap(),
                c["n"].as_u64().unwrap() as u32,
                c["m"].as_u64().unwrap() as u32,
            );
            let want = c["p"].as_f64().unwrap();
            let got = alarm_rate(a, n, m);
            assert!(
                (got - want).abs() <= 1e-12 * want,
                "α {a} {n} of {m}: {got:e} vs scipy {want:e} (rel {:e})",
                (got - want).abs() / want
            );
        }
        assert_eq!(alarm_rate(0.1, 0, 5), 1.0);
        assert_eq!(alarm_rate(0.1, 6, 5), 0.0);
        assert_eq!(alarm_rate(0.0, 1, 5), 0.0);
        assert_eq!(alarm_rate(1.0, 5, 5), 1.0);
        assert_eq!(alarm_rate(f64::NAN, 1, 5), 1.0);
        // Tiny but representable: 1000 frames, all over at α = 0.5 → 2⁻¹⁰⁰⁰.
        let got = alarm_rate(0.5, 1000, 1000);
        assert!(
            (got - 2f64.powi(-1000)).abs() <= 1e-12 * 2f64.powi(-1000),
            "{got:e}"
        );
    }

    #[test]
    fn psi_matches_numpy_and_flags_a_shifted_distribution() {
        let fx = fixture();
        for s in fx["samples"].as_array().unwrap() {
            let deciles = f32s(&s["deciles"]);
            for c in s["psi"].as_array().unwrap() {
                let got = psi(&deciles, &f32s(&c["recent"])).unwrap();
                let want = c["psi"].as_f64().unwrap();
                assert!(
                    (got - want).abs() <= 1e-12 * want.max(1.0),
                    "{} {}: {got} vs {want}",
                    s["name"],
                    c["name"]
                );
            }
        }
        let b = &fx["samples"][0];
        let deciles = f32s(&b["deciles"]);
        let psi_of = |n: &str| {
            let c = b["psi"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == n)
                .unwrap();
            psi(&deciles, &f32s(&c["recent"])).unwrap()
        };
        assert!(psi_of("same") < PSI_DRIFT);
        assert!(psi_of("shifted") > PSI_DRIFT);
        assert!(psi(&deciles, &[]).is_err());
        assert!(psi(&deciles[..8], &[0.1]).is_err());
        assert!(
            psi(&deciles, &[f32::NAN])
                .unwrap_err()
                .to_string()
                .contains("#0 is NaN")
        );
    }

    #[test]
    fn score_norm_is_one_half_at_t2_matches_the_logit_formula_and_stays_inside_zero_one() {
        let fx = fixture();
        for c in fx["score_norm"].as_array().unwrap() {
            let (v, t) = (
                c["value"].as_f64().unwrap() as f32,
                c["t2"].as_f64().unwrap() as f32,
            );
            let want = c["norm"].as_f64().unwrap();
            let got = f64::from(score_norm(v, t));
            assert!((got - want).abs() <= 1e-6, "{v} {t}: {got} vs {want}");
        }
        for t in [0.0f32, 1e-9, 0.1, 0.37, 0.5, 0.93, 1.0] {
            assert_eq!(score_norm(t, t), 0.5, "t2 {t}");
        }
        let mut last = 0.0;
        for i in 0..=1000 {
            let v = score_norm(i as f32 / 1000.0, 0.3);
            assert!(v > 0.0 && v < 1.0, "{v}");
            assert!(v >= last);
            last = v;
        }
        assert!(score_norm(1.0, 0.0) < 1.0 && score_norm(0.0, 1.0) > 0.0);
        assert_eq!(score_norm(f32::NAN, 0.3), 0.5);
    }

    #[test]
    fn calibrate_sets_t1_at_or_below_t2_and_records_what_the_sample_supports() {
        let c = cal_for("line1", "left", 1_700_000_000_000);
        assert!(c.t1 <= c.t2);
        assert_eq!(c.stats.n, 200);
        assert!((c.min_supported_rate - 1.0 / 201.0).abs() < 1e-15);
        let mut s: Vec<f32> = (0..200)
            .map(|i| (i as f32 * 0.618_034).fract() * 0.6)
            .collect();
        s.sort_by(f32::total_cmp);
        assert_eq!(c.t2, threshold_for_rate(&s, 0.01).unwrap());
        assert_eq!(c.t1, threshold_for_rate(&s, 0.1).unwrap());
        assert_eq!(c.alarm_rate, Some(alarm_rate(0.01, 3, 5)));
        assert_eq!(c.id.len(), 12);
        assert_eq!(c.id, c.compute_id());
        let notes = c.notes.join("\n");
        assert!(notes.contains("1/(N+1)"), "{notes}");
        assert!(notes.contains("needs about 10/α = 1000 frames"), "{notes}");
        assert!(notes.contains("zero alarms"), "{notes}");
        // Equal rates give T1 = T2.
        let o = Options {
            target_rate: 0.01,
            unknown_rate: 0.01,
            debounce: None,
        };
        let c = calibrate(&s, &o, fp(), "line1", "", "camera", 0).unwrap();
        assert_eq!(c.t1, c.t2);
    }

    #[test]
    fn bad_samples_and_options_are_refused_with_what_was_expected() {
        let o = Options::new(0.01);
        let go = |s: &[f32], o: &Options| {
            calibrate(s, o, fp(), "cam", "", "camera", 0)
                .unwrap_err()
                .to_string()
        };
        assert!(go(&[], &o).contains("no scores"));
        let many = vec![0.2f32; 150];
        let mut bad = many.clone();
        bad[7] = f32::NAN;
        assert!(go(&bad, &o).contains("score #7 is NaN"), "{}", go(&bad, &o));
        bad[7] = 1.5;
        assert!(go(&bad, &o).contains("outside [0, 1]"));
        assert!(
            go(&many[..50], &o).contains("at least 99"),
            "{}",
            go(&many[..50], &o)
        );
        for r in [0.0, 1.0, -0.1, f64::NAN] {
            assert!(go(&many, &Options::new(r)).contains("target false-alarm rate"));
        }
        let o2 = Options {
            target_rate: 0.01,
            unknown_rate: 0.005,
            debounce: None,
        };
        assert!(go(&many, &o2).contains("UNKNOWN rate"));
        let o3 = Options {
            debounce: Some((6, 5)),
            ..Options::new(0.01)
        };
        assert!(go(&many, &o3).contains("6 of 5"));
        let e = calibrate(&many, &o, fp(), "../etc", "", "camera", 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("camera \"../etc\""), "{e}");
        assert!(
            threshold_for_rate(&[0.3, 0.2], 0.5)
                .unwrap_err()
                .to_string()
                .contains("not sorted")
        );
    }

    #[test]
    fn fingerprint_mismatch_names_the_first_differing_field() {
        let a = fp();
        assert_eq!(a.mismatch(&a.clone()), None);
        let mut b = a.clone();
        b.model_sha256 = "ffffffffffffffffffffffffffff".into();
        b.backend = "cuda".into();
        assert_eq!(
            a.mismatch(&b).unwrap(),
            "model changed (0123456789ab… → ffffffffffff…)"
        );
        let mut b = a.clone();
        b.input_size = 336;
        assert_eq!(a.mismatch(&b).unwrap(), "input size changed (518 → 336)");
        let mut b = a.clone();
        b.rect = rect_px_text([0, 0, 960, 1080]);
        assert_eq!(
            a.mismatch(&b).unwrap(),
            "region rectangle changed (frac:0,0,0.5,1 → px:0,0,960,1080)"
        );
        let mut b = a.clone();
        b.ignore_sha256 = ignore_sha256(&[vec![[0.1, 0.1], [0.2, 0.1], [0.2, 0.2]]]);
        let m = a.mismatch(&b).unwrap();
        assert!(m.starts_with("ignore polygons changed (none → "), "{m}");
        let mut b = a.clone();
        b.statistic = "map_max".into();
        assert_eq!(
            a.mismatch(&b).unwrap(),
            "statistic changed (global → map_max)"
        );
        let mut b = a.clone();
        b.reference = "bank7".into();
        assert_eq!(
            a.mismatch(&b).unwrap(),
            "reference bank changed (none → bank7)"
        );
    }

    #[test]
    fn ignore_hash_is_the_sha256_of_the_documented_canonical_text() {
        let polys = vec![
            vec![[0.1, 0.1], [0.2, 0.1], [0.2, 0.2]],
            vec![[1.0, 2.0], [3.0, 4.0], [5.0, 6.5]],
        ];
        let want = hex::encode(Sha256::digest(b"0.1,0.1;0.2,0.1;0.2,0.2|1,2;3,4;5,6.5"));
        assert_eq!(ignore_sha256(&polys), want);
        assert_eq!(ignore_sha256(&[]), "");
    }

    #[test]
    fn save_then_load_round_trips_and_keeps_three_previous_versions() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path(), "line1", "left").unwrap().is_none());
        let mut cals = Vec::new();
        for i in 0..5u64 {
            let c = cal_for("line1", "left", 1000 + i);
            let path = save(dir.path(), &c).unwrap();
            assert_eq!(path, dir.path().join("calibration/line1/left.json"));
            assert_eq!(
                load(dir.path(), "line1", "left").unwrap().as_ref(),
                Some(&c)
            );
            cals.push(c);
        }
        let d = dir.path().join("calibration/line1");
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["left.1.json", "left.2.json", "left.3.json", "left.json"]
        );
        // The whole frame of a camera without regions.
        let c = cal_for("line1", "", 7);
        assert_eq!(save(dir.path(), &c).unwrap(), d.join("_frame.json"));
        assert_eq!(load(dir.path(), "line1", "").unwrap(), Some(c));
    }

    #[test]
    fn rollback_restores_the_previous_file_byte_identically_and_fails_when_none_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let cur = dir.path().join("calibration/cam/r1.json");
        let mut bytes = Vec::new();
        for i in 0..3u64 {
            save(dir.path(), &cal_for("cam", "r1", i)).unwrap();
            bytes.push(std::fs::read(&cur).unwrap());
        }
        let back = rollback(dir.path(), "cam", "r1").unwrap();
        assert_eq!(back.created_unix_ms, 1);
        assert_eq!(std::fs::read(&cur).unwrap(), bytes[1]);
        assert_eq!(load(dir.path(), "cam", "r1").unwrap(), Some(back));
        rollback(dir.path(), "cam", "r1").unwrap();
        assert_eq!(std::fs::read(&cur).unwrap(), bytes[0]);
        let err = rollback(dir.path(), "cam", "r1").unwrap_err();
        assert!(matches!(err, CalibError::NoPrevious { .. }), "{err:?}");
        assert!(err.to_string().contains("r1.1.json"), "{err}");
        // Nothing changed by the failed rollback.
        assert_eq!(std::fs::read(&cur).unwrap(), bytes[0]);
    }

    /// Writes `text` as the current file of cam/r1 and returns the load error message.
    fn load_err(text: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("calibration/cam");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("r1.json"), text).unwrap();
        let e = load(dir.path(), "cam", "r1").unwrap_err().to_string();
        assert!(e.contains(&d.join("r1.json").display().to_string()), "{e}");
        e
    }

    #[test]
    fn corrupt_truncated_foreign_and_non_finite_files_are_refused_naming_the_file() {
        let good = serde_json::to_string_pretty(&cal_for("cam", "r1", 5)).unwrap();
        let e = load_err(&good.as_bytes()[..good.len() / 2]);
        assert!(e.contains("truncated"), "{e}");
        let e = load_err(b"\x00\x01garbage");
        assert!(e.contains("not JSON"), "{e}");
        let e = load_err(b"{\"hello\": 1}");
        assert!(
            e.contains("not an anomalyclip-edge calibration file"),
            "{e}"
        );
        let e = load_err(good.replacen("\"v\": 1", "\"v\": 2", 1).as_bytes());
        assert!(e.contains("format version 2"), "{e}");
        let other = serde_json::to_string_pretty(&cal_for("other", "r1", 5)).unwrap();
        let e = load_err(other.as_bytes());
        assert!(
            e.contains("camera \"other\"") && e.contains("not camera \"cam\""),
            "{e}"
        );
        let t2 = format!("\"t2\": {}", cal_for("cam", "r1", 5).t2);
        assert!(good.contains(&t2));
        let e = load_err(good.replacen(&t2, "\"t2\": NaN", 1).as_bytes());
        assert!(e.contains("corrupt"), "{e}");
        let e = load_err(good.replacen(&t2, "\"t2\": null", 1).as_bytes());
        assert!(e.contains("corrupt") && e.contains("null"), "{e}");
        let e = load_err(good.replacen(&t2, "\"t2\": 1e999", 1).as_bytes());
        assert!(e.contains("corrupt"), "{e}");
        let e = load_err(good.replacen(&t2, "\"t2\": 0.99", 1).as_bytes());
        assert!(e.contains("does not match its content"), "{e}");
        let e = load_err(good.replacen(&t2, "\"t2\": 0.0", 1).as_bytes());
        assert!(e.contains("t1 = ") && e.contains("is above t2"), "{e}");
    }

    #[test]
    fn a_symlink_at_the_calibration_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("calibration/cam");
        std::fs::create_dir_all(&d).unwrap();
        let target = dir.path().join("elsewhere.json");
        std::fs::write(&target, "{}").unwrap();
        std::os::unix::fs::symlink(&target, d.join("r1.json")).unwrap();
        let e = load(dir.path(), "cam", "r1").unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }

    #[test]
    fn the_drift_window_reports_psi_once_full() {
        let c = cal_for("cam", "r1", 5);
        let mut w = DriftWindow::new(50);
        for i in 0..49 {
            w.push((i as f32 * 0.618_034).fract() * 0.6);
        }
        w.push(f32::NAN);
        assert_eq!(w.psi(&c), None);
        w.push(0.3);
        let same = w.psi(&c).unwrap();
        assert!(same < PSI_DRIFT, "{same}");
        for _ in 0..50 {
            w.push(0.95);
        }
        let high = w.psi(&c).unwrap();
        assert!(high > PSI_DRIFT, "{high}");
        assert_eq!(w.quantile(0.99), Some(0.95));
        w.clear();
        assert_eq!(w.quantile(0.5), None);
    }
}
