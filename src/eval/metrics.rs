//! Evaluation metrics: image AUROC and AP, pixel AUROC and AUPRO, exact and in bounded memory.
//!
//! Input: per-image scores and labels; per-image anomaly maps (`f32`, row-major `width × height`)
//! with ground-truth masks (`bool`, same shape). Output: a [`Metric`] per quantity, either a value
//! or the reason it is undefined (never `NaN`). Failure modes: [`MetricsError`] for inputs that are
//! a bug upstream (non-finite scores, length mismatches); degenerate *data* (all-normal,
//! all-anomalous, no masks) is not an error but [`Metric::Undefined`].
//!
//! Semantics are those of the official AnomalyCLIP evaluation:
//! - image AUROC / AP: scikit-learn's `roc_auc_score` / `average_precision_score` (ties grouped;
//!   AP = Σₙ (Rₙ − Rₙ₋₁)·Pₙ over the distinct thresholds, descending);
//! - pixel AUROC: `roc_auc_score` over every pixel of the class;
//! - AUPRO: 200 thresholds `th_k = min + k·(max − min)/200`, `k = 0..199`, over the class's maps
//!   (computed in `f64`); a pixel is predicted anomalous when `value > th_k`; PRO(th) is the mean
//!   over all 8-connected ground-truth regions of all images of `|pred ∩ region| / |region|`;
//!   FPR(th) = `|pred ∩ normal| / |normal|` over the class; the points with FPR < 0.3 are kept,
//!   their FPRs rescaled min–max to [0, 1] and the area taken with the trapezoid rule.
//!
//! Design for bounded memory. The class's maps are never kept: [`PixelAccumulator`] streams them.
//! - Pixel AUROC and the FPR side of AUPRO come from [`ScoreHistogram`], an exact count of
//!   (normal, anomalous) pixels per distinct `f32` value, keyed by the value's bits in total order.
//!   It allocates 1 KiB pages of 256 consecutive `f32` values (two `u16` counters each, with an
//!   exact overflow table) under a fixed 512 KiB index. Memory is at most ~4 bytes per
//!   representable `f32` in the maps' range — 32 MiB per binade (power-of-two interval), e.g.
//!   ≤ 320 MiB for maps within [2⁻¹⁰, 1] — and at most ~3 KiB per distinct value when values are
//!   sparse; it does **not** grow with the number of images once the values seen are covered.
//!   (The official code keeps 4 B/pixel of maps and sorts them with ≥ 16 B/pixel.)
//! - The PRO side keeps, per ground-truth region, its pixels' values sorted (4 bytes per
//!   *anomalous* pixel, plus ~40 bytes per region), so overlaps at every threshold are exact.
//!
//! Parallelism ([`PixelAccumulator::add_images`]): each image is prepared on its own rayon task
//! (validation, 8-connected labelling, its values as sorted runs); the histogram is then updated
//! in parallel over disjoint key ranges; AUPRO's per-region overlaps are computed in parallel.
//! Everything is exact (integer counts; `f64` only in the final ratios, summed in a fixed order),
//! so the results do not depend on the number of rayon threads or on the batching.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Number of AUPRO thresholds (official `max_step`).
pub const PRO_STEPS: usize = 200;
/// AUPRO integrates FPR over `[0, PRO_MAX_FPR)` (official `expect_fpr`).
pub const PRO_MAX_FPR: f64 = 0.3;

/// Errors in metric *inputs*: these are bugs in the caller or the engine, not properties of a
/// dataset (those give [`Metric::Undefined`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    /// Labels and scores of different lengths.
    #[error("labels ({labels}) and scores ({scores}) differ in length")]
    LengthMismatch {
        /// Number of labels.
        labels: usize,
        /// Number of scores.
        scores: usize,
    },
    /// A NaN or infinite score or map value.
    #[error("non-finite value {value} at index {index}: the engine produced NaN/inf")]
    NonFinite {
        /// Position in the input.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A map or mask whose length is not `width × height`.
    #[error("{what} has {got} values, expected {expected} ({width}×{height})")]
    WrongSize {
        /// "map" or "mask".
        what: &'static str,
        /// Values received.
        got: usize,
        /// `width × height`.
        expected: usize,
        /// Map width.
        width: usize,
        /// Map height.
        height: usize,
    },
}

/// Why a metric has no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Undefined {
    /// No image (or no pixel) was evaluated.
    NoSamples,
    /// No anomalous image / pixel / ground-truth region (all normal).
    NoAnomalous,
    /// No normal image / pixel (all anomalous).
    NoNormal,
    /// The class has no ground-truth masks (image-only dataset): no pixel metrics.
    NoMasks,
    /// AUPRO: constant maps, fewer than two thresholds with FPR < 0.3, or all those FPRs equal
    /// (the official code returns NaN here).
    DegenerateFpr,
}

impl Undefined {
    /// Short human-readable reason.
    pub fn describe(self) -> &'static str {
        match self {
            Undefined::NoSamples => "no samples",
            Undefined::NoAnomalous => "all normal",
            Undefined::NoNormal => "all anomalous",
            Undefined::NoMasks => "no masks",
            Undefined::DegenerateFpr => "degenerate FPR curve",
        }
    }
}

/// A metric value, or the reason it is undefined.
///
/// Serialises as a JSON number, or as `{"undefined": "<reason>"}` — never `NaN`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(from = "MetricRepr", into = "MetricRepr")]
pub enum Metric {
    /// The value, in [0, 1].
    Defined(f64),
    /// No value, and why.
    Undefined(Undefined),
}

impl Metric {
    /// The value if defined.
    pub fn value(self) -> Option<f64> {
        match self {
            Metric::Defined(v) => Some(v),
            Metric::Undefined(_) => None,
        }
    }

    /// Formats as a percentage with one decimal (`"91.5"`), or `"n/a"`.
    pub fn percent(self) -> String {
        match self {
            Metric::Defined(v) => format!("{:.1}", v * 100.0),
            Metric::Undefined(_) => "n/a".to_owned(),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum MetricRepr {
    Value(f64),
    Undefined { undefined: Undefined },
}

impl From<MetricRepr> for Metric {
    fn from(r: MetricRepr) -> Self {
        match r {
            MetricRepr::Value(v) => Metric::Defined(v),
            MetricRepr::Undefined { undefined } => Metric::Undefined(undefined),
        }
    }
}

impl From<Metric> for MetricRepr {
    fn from(m: Metric) -> Self {
        match m {
            Metric::Defined(v) => MetricRepr::Value(v),
            Metric::Undefined(undefined) => MetricRepr::Undefined { undefined },
        }
    }
}

/// Maps an `f32` to a `u32` whose unsigned order is the numeric order (`-0.0` folded onto
/// `+0.0`). Callers reject NaN first.
#[inline]
fn key(v: f32) -> u32 {
    let v = if v == 0.0 { 0.0 } else { v };
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Inverse of [`key`].
#[inline]
fn unkey(k: u32) -> f32 {
    if k & 0x8000_0000 != 0 {
        f32::from_bits(k & 0x7fff_ffff)
    } else {
        f32::from_bits(!k)
    }
}

fn check_finite(values: &[f32]) -> Result<(), MetricsError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(MetricsError::NonFinite {
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

/// AUROC (Mann–Whitney with ties counted ½, which equals scikit-learn's trapezoid over the ROC
/// with ties grouped) from `(normal, anomalous)` counts per distinct score, ascending.
fn auroc_from_counts(counts: impl Iterator<Item = (u64, u64)>, n_neg: u64, n_pos: u64) -> Metric {
    if n_neg == 0 && n_pos == 0 {
        return Metric::Undefined(Undefined::NoSamples);
    }
    if n_pos == 0 {
        return Metric::Undefined(Undefined::NoAnomalous);
    }
    if n_neg == 0 {
        return Metric::Undefined(Undefined::NoNormal);
    }
    // 2·U = Σ_v neg_v · (2·#pos above v + pos_v); exact in u128.
    let mut pos_seen: u64 = 0;
    let mut twice_u: u128 = 0;
    for (neg, pos) in counts {
        pos_seen += pos;
        let above = n_pos - pos_seen;
        twice_u += neg as u128 * (2 * above as u128 + pos as u128);
    }
    let denom = 2.0 * n_neg as f64 * n_pos as f64;
    Metric::Defined(twice_u as f64 / denom)
}

/// AP from `(normal, anomalous)` counts per distinct score, **descending**.
fn ap_from_counts(counts: impl Iterator<Item = (u64, u64)>, n_pos: u64) -> Metric {
    if n_pos == 0 {
        return Metric::Undefined(Undefined::NoAnomalous);
    }
    // Σ (ΔR)·P = (1/P_total)·Σ pos_k·precision_k: one division at the end keeps a perfect
    // ranking at exactly 1.0.
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut sum = 0.0f64;
    for (neg, pos) in counts {
        tp += pos;
        fp += neg;
        if pos > 0 {
            sum += pos as f64 * (tp as f64 / (tp + fp) as f64);
        }
    }
    Metric::Defined(sum / n_pos as f64)
}

/// Distinct scores ascending with their `(normal, anomalous)` counts.
fn grouped(labels: &[bool], scores: &[f32]) -> Result<Vec<(u64, u64)>, MetricsError> {
    if labels.len() != scores.len() {
        return Err(MetricsError::LengthMismatch {
            labels: labels.len(),
            scores: scores.len(),
        });
    }
    check_finite(scores)?;
    let mut keyed: Vec<(u32, bool)> = scores
        .iter()
        .zip(labels)
        .map(|(&s, &l)| (key(s), l))
        .collect();
    keyed.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut last = None;
    for (k, l) in keyed {
        if last != Some(k) {
            out.push((0, 0));
            last = Some(k);
        }
        if let Some(slot) = out.last_mut() {
            if l {
                slot.1 += 1;
            } else {
                slot.0 += 1;
            }
        }
    }
    Ok(out)
}

/// Image AUROC (`sklearn.metrics.roc_auc_score` semantics). `labels[i]` is true for anomalous.
pub fn image_auroc(labels: &[bool], scores: &[f32]) -> Result<Metric, MetricsError> {
    let g = grouped(labels, scores)?;
    let n_pos = labels.iter().filter(|&&l| l).count() as u64;
    let n_neg = labels.len() as u64 - n_pos;
    Ok(auroc_from_counts(g.into_iter(), n_neg, n_pos))
}

/// Average precision (`sklearn.metrics.average_precision_score` semantics; all-anomalous gives
/// 1.0 as in scikit-learn, all-normal is undefined).
pub fn average_precision(labels: &[bool], scores: &[f32]) -> Result<Metric, MetricsError> {
    let g = grouped(labels, scores)?;
    let n_pos = labels.iter().filter(|&&l| l).count() as u64;
    Ok(ap_from_counts(g.into_iter().rev(), n_pos))
}

const PAGE_BITS: u32 = 8;
const PAGE_LEN: usize = 1 << PAGE_BITS;
const DIR_BITS: u32 = 8;
const DIR_LEN: usize = 1 << DIR_BITS;
const TOP_LEN: usize = 1 << (32 - PAGE_BITS - DIR_BITS);

/// Counts for 256 consecutive `f32` values (1 KiB).
struct Page {
    neg: [u16; PAGE_LEN],
    pos: [u16; PAGE_LEN],
}

type Dir = [Option<Box<Page>>; DIR_LEN];

#[inline]
fn top_index(k: u32) -> usize {
    (k >> (PAGE_BITS + DIR_BITS)) as usize
}

/// Allocations and counter overflows caused by updates to one index entry.
#[derive(Default)]
struct EntryDelta {
    dirs: usize,
    pages: usize,
    /// `(key, side, amount)` to add to the overflow table.
    carries: Vec<(u32, usize, u64)>,
}

/// Adds `count` to the counter of key `k` (side 0 = normal, 1 = anomalous) under one index
/// entry (the one `top_index(k)` selects).
#[inline]
fn add_in_entry(
    entry: &mut Option<Box<Dir>>,
    k: u32,
    side: usize,
    count: u32,
    delta: &mut EntryDelta,
) {
    let d = ((k >> PAGE_BITS) as usize) & (DIR_LEN - 1);
    let i = (k as usize) & (PAGE_LEN - 1);
    let dir = entry.get_or_insert_with(|| {
        delta.dirs += 1;
        Box::new(std::array::from_fn(|_| None))
    });
    let page = dir[d].get_or_insert_with(|| {
        delta.pages += 1;
        Box::new(Page {
            neg: [0; PAGE_LEN],
            pos: [0; PAGE_LEN],
        })
    });
    let slot = if side == 1 {
        &mut page.pos[i]
    } else {
        &mut page.neg[i]
    };
    let total = *slot as u64 + count as u64;
    *slot = (total & 0xffff) as u16;
    if total > 0xffff {
        delta.carries.push((k, side, total & !0xffff));
    }
}

/// Exact `(normal, anomalous)` counts per distinct `f32` value, in bounded memory (see the module
/// doc): a fixed 512 KiB index, 2 KiB directories per 65 536 consecutive values and 1 KiB pages
/// per 256 consecutive values, allocated on first use.
pub struct ScoreHistogram {
    top: Vec<Option<Box<Dir>>>,
    /// Exact overflow of the `u16` counters: `(normal, anomalous)` multiples of 65 536.
    carry: BTreeMap<u32, [u64; 2]>,
    n_neg: u64,
    n_pos: u64,
    pages: usize,
    dirs: usize,
}

impl Default for ScoreHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ScoreHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScoreHistogram")
            .field("n_neg", &self.n_neg)
            .field("n_pos", &self.n_pos)
            .field("pages", &self.pages)
            .finish()
    }
}

impl ScoreHistogram {
    /// An empty histogram (512 KiB index).
    pub fn new() -> Self {
        Self {
            top: (0..TOP_LEN).map(|_| None).collect(),
            carry: BTreeMap::new(),
            n_neg: 0,
            n_pos: 0,
            pages: 0,
            dirs: 0,
        }
    }

    /// Counts one value. The caller has checked it is finite.
    pub fn add(&mut self, value: f32, anomalous: bool) {
        let k = key(value);
        let mut delta = EntryDelta::default();
        add_in_entry(
            &mut self.top[top_index(k)],
            k,
            usize::from(anomalous),
            1,
            &mut delta,
        );
        if anomalous {
            self.n_pos += 1;
        } else {
            self.n_neg += 1;
        }
        self.apply(delta);
    }

    fn apply(&mut self, delta: EntryDelta) {
        self.dirs += delta.dirs;
        self.pages += delta.pages;
        for (k, side, v) in delta.carries {
            self.carry.entry(k).or_insert([0, 0])[side] += v;
        }
    }

    /// Counts several sets of `(key, count)` runs, each sorted by key, in parallel over disjoint
    /// index entries (each entry's pages are touched by one thread, in key order). Integer
    /// counts: the result does not depend on the thread count.
    fn add_sorted(&mut self, sets: &[(&[(u32, u32)], bool)]) {
        type Segments<'a> = Vec<(&'a [(u32, u32)], usize)>;
        let mut by_entry: BTreeMap<usize, Segments<'_>> = BTreeMap::new();
        for &(runs, anomalous) in sets {
            let side = usize::from(anomalous);
            let mut start = 0;
            while start < runs.len() {
                let t = top_index(runs[start].0);
                let end = start + runs[start..].partition_point(|r| top_index(r.0) == t);
                let seg = &runs[start..end];
                let total: u64 = seg.iter().map(|r| r.1 as u64).sum();
                if anomalous {
                    self.n_pos += total;
                } else {
                    self.n_neg += total;
                }
                by_entry.entry(t).or_default().push((seg, side));
                start = end;
            }
        }
        let deltas: Vec<EntryDelta> = self
            .top
            .par_iter_mut()
            .enumerate()
            .filter_map(|(t, entry)| {
                let segs = by_entry.get(&t)?;
                let mut delta = EntryDelta::default();
                for &(runs, side) in segs {
                    for &(k, c) in runs {
                        add_in_entry(entry, k, side, c, &mut delta);
                    }
                }
                Some(delta)
            })
            .collect();
        for d in deltas {
            self.apply(d);
        }
    }

    /// Normal values counted.
    pub fn n_normal(&self) -> u64 {
        self.n_neg
    }

    /// Anomalous values counted.
    pub fn n_anomalous(&self) -> u64 {
        self.n_pos
    }

    /// Heap bytes held (pages, directories, index).
    pub fn memory_bytes(&self) -> usize {
        self.pages * std::mem::size_of::<Page>()
            + self.dirs * std::mem::size_of::<Dir>()
            + TOP_LEN * std::mem::size_of::<Option<Box<Dir>>>()
            + self.carry.len() * 48
    }

    /// Calls `f(value, normal, anomalous)` for every distinct value, ascending.
    pub fn for_each(&self, mut f: impl FnMut(f32, u64, u64)) {
        let mut carry = self.carry.iter().peekable();
        for (t, dir) in self.top.iter().enumerate() {
            let Some(dir) = dir else { continue };
            for (d, page) in dir.iter().enumerate() {
                let Some(page) = page else { continue };
                let base = ((t << (PAGE_BITS + DIR_BITS)) | (d << PAGE_BITS)) as u32;
                for i in 0..PAGE_LEN {
                    let k = base | i as u32;
                    let mut neg = page.neg[i] as u64;
                    let mut pos = page.pos[i] as u64;
                    if let Some(&(&ck, c)) = carry.peek()
                        && ck == k
                    {
                        neg += c[0];
                        pos += c[1];
                        carry.next();
                    }
                    if neg != 0 || pos != 0 {
                        f(unkey(k), neg, pos);
                    }
                }
            }
        }
    }

    /// AUROC over the counted values (`roc_auc_score` semantics).
    pub fn auroc(&self) -> Metric {
        let mut counts = Vec::new();
        self.for_each(|_, n, p| counts.push((n, p)));
        auroc_from_counts(counts.into_iter(), self.n_neg, self.n_pos)
    }

    /// For each threshold (ascending), the number of normal values `<= th`.
    fn normal_at_or_below(&self, thresholds: &[f64]) -> Vec<u64> {
        let mut out = vec![self.n_neg; thresholds.len()];
        let mut k = 0;
        let mut cum = 0u64;
        self.for_each(|v, n, _| {
            let v = v as f64;
            while k < thresholds.len() && thresholds[k] < v {
                out[k] = cum;
                k += 1;
            }
            cum += n;
        });
        out
    }
}

/// One 8-connected ground-truth region: its pixels' map values, sorted ascending.
#[derive(Debug, Clone)]
struct Region {
    values: Vec<f32>,
}

/// 8-connected components of `mask` (raster order of first pixel, as `scipy.ndimage.label` and
/// `skimage.measure.label`); returns, per component, the `map` values of its pixels, sorted.
fn regions_of(map: &[f32], mask: &[bool], width: usize, height: usize) -> Vec<Region> {
    let mut seen = vec![false; mask.len()];
    let mut stack = Vec::new();
    let mut out = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut values = Vec::new();
        while let Some(p) = stack.pop() {
            values.push(map[p]);
            let (x, y) = (p % width, p / width);
            for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                    let q = ny * width + nx;
                    if mask[q] && !seen[q] {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
        }
        values.sort_unstable_by_key(|&v| key(v));
        out.push(Region { values });
    }
    out
}

/// Sorts keys and run-length encodes them: `(key, count)` ascending.
fn runs(mut keys: Vec<u32>) -> Vec<(u32, u32)> {
    keys.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for k in keys {
        match out.last_mut() {
            Some((last, c)) if *last == k => *c += 1,
            _ => out.push((k, 1)),
        }
    }
    out
}

/// The parallel part of adding one image: validation, labelling, region extraction, range, and
/// the image's values as sorted runs (so the sequential merge walks the histogram in order).
struct PreparedImage {
    normal: Vec<(u32, u32)>,
    anomalous: Vec<(u32, u32)>,
    regions: Vec<Region>,
    min: f32,
    max: f32,
}

/// Results of [`PixelAccumulator::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PixelMetrics {
    /// Pixel AUROC.
    pub pixel_auroc: Metric,
    /// AUPRO (FPR ≤ 0.3, normalised).
    pub aupro: Metric,
    /// Images accumulated.
    pub images: usize,
    /// Ground-truth regions (8-connected).
    pub regions: usize,
    /// Peak heap bytes held by the accumulator.
    pub memory_bytes: usize,
}

/// Streams a class's maps and masks into exact pixel-AUROC and AUPRO state; see the module doc
/// for the memory bound. Results do not depend on the thread count; they depend on the image
/// order only through the order of `f64` sums over regions (fixed: insertion order).
#[derive(Debug)]
pub struct PixelAccumulator {
    width: usize,
    height: usize,
    hist: ScoreHistogram,
    regions: Vec<Region>,
    region_values: usize,
    images: usize,
    min: f32,
    max: f32,
}

impl PixelAccumulator {
    /// An accumulator for maps of `width × height`.
    pub fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            hist: ScoreHistogram::new(),
            regions: Vec::new(),
            region_values: 0,
            images: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }

    fn prepare(&self, map: &[f32], mask: &[bool]) -> Result<PreparedImage, MetricsError> {
        let expected = self.width * self.height;
        for (what, got) in [("map", map.len()), ("mask", mask.len())] {
            if got != expected {
                return Err(MetricsError::WrongSize {
                    what,
                    got,
                    expected,
                    width: self.width,
                    height: self.height,
                });
            }
        }
        check_finite(map)?;
        let (min, max) = map
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let regions = regions_of(map, mask, self.width, self.height);
        let n_anomalous = mask.iter().filter(|&&m| m).count();
        let mut normal = Vec::with_capacity(map.len() - n_anomalous);
        let mut anomalous = Vec::with_capacity(n_anomalous);
        for (&v, &m) in map.iter().zip(mask) {
            if m {
                anomalous.push(key(v));
            } else {
                normal.push(key(v));
            }
        }
        Ok(PreparedImage {
            normal: runs(normal),
            anomalous: runs(anomalous),
            regions,
            min,
            max,
        })
    }

    fn merge(&mut self, p: PreparedImage) {
        self.region_values += p.regions.iter().map(|r| r.values.len()).sum::<usize>();
        self.regions.extend(p.regions);
        self.min = self.min.min(p.min);
        self.max = self.max.max(p.max);
        self.images += 1;
    }

    /// Adds one image: its map and its ground-truth mask (all `false` for a normal image).
    pub fn add_image(&mut self, map: &[f32], mask: &[bool]) -> Result<(), MetricsError> {
        self.add_images(&[(map, mask)])
    }

    /// Adds several images: each prepared in parallel (validation, labelling, sorting), then the
    /// histogram updated in parallel over disjoint key ranges, regions appended in the given
    /// order. On error nothing is added.
    pub fn add_images(&mut self, images: &[(&[f32], &[bool])]) -> Result<(), MetricsError> {
        let prepared: Vec<PreparedImage> = images
            .par_iter()
            .map(|(map, mask)| self.prepare(map, mask))
            .collect::<Result<_, _>>()?;
        let sets: Vec<(&[(u32, u32)], bool)> = prepared
            .iter()
            .flat_map(|p| [(p.normal.as_slice(), false), (p.anomalous.as_slice(), true)])
            .collect();
        self.hist.add_sorted(&sets);
        drop(sets);
        for p in prepared {
            self.merge(p);
        }
        Ok(())
    }

    /// Images added so far.
    pub fn images(&self) -> usize {
        self.images
    }

    /// Heap bytes held now (histogram + region values).
    pub fn memory_bytes(&self) -> usize {
        self.hist.memory_bytes()
            + self.region_values * std::mem::size_of::<f32>()
            + self.regions.len() * std::mem::size_of::<Region>()
    }

    /// Pixel AUROC and AUPRO over everything added.
    pub fn finish(&self) -> PixelMetrics {
        PixelMetrics {
            pixel_auroc: if self.images == 0 {
                Metric::Undefined(Undefined::NoSamples)
            } else {
                self.hist.auroc()
            },
            aupro: self.aupro(),
            images: self.images,
            regions: self.regions.len(),
            memory_bytes: self.memory_bytes(),
        }
    }

    fn aupro(&self) -> Metric {
        if self.images == 0 {
            return Metric::Undefined(Undefined::NoSamples);
        }
        if self.regions.is_empty() {
            return Metric::Undefined(Undefined::NoAnomalous);
        }
        let n_neg = self.hist.n_normal();
        if n_neg == 0 {
            return Metric::Undefined(Undefined::NoNormal);
        }
        let (lo, hi) = (self.min as f64, self.max as f64);
        if hi <= lo {
            return Metric::Undefined(Undefined::DegenerateFpr);
        }
        let delta = (hi - lo) / PRO_STEPS as f64;
        let th: Vec<f64> = (0..PRO_STEPS).map(|k| lo + k as f64 * delta).collect();

        let below = self.hist.normal_at_or_below(&th);
        let fpr: Vec<f64> = below
            .iter()
            .map(|&b| (n_neg - b) as f64 / n_neg as f64)
            .collect();

        // Per region, the overlap at every threshold (parallel); summed in region order.
        let overlaps: Vec<Vec<f64>> = self
            .regions
            .par_iter()
            .map(|r| {
                let area = r.values.len() as f64;
                th.iter()
                    .map(|&t| {
                        let at_or_below = r.values.partition_point(|&v| v as f64 <= t);
                        (r.values.len() - at_or_below) as f64 / area
                    })
                    .collect()
            })
            .collect();
        let mut pro = vec![0.0f64; PRO_STEPS];
        for o in &overlaps {
            for (acc, v) in pro.iter_mut().zip(o) {
                *acc += v;
            }
        }
        let n_regions = self.regions.len() as f64;
        for p in &mut pro {
            *p /= n_regions;
        }
        pro_area(&fpr, &pro)
    }
}

/// The official area: keep FPR < 0.3, rescale min–max, trapezoid (`sklearn.metrics.auc`).
fn pro_area(fpr: &[f64], pro: &[f64]) -> Metric {
    let kept: Vec<(f64, f64)> = fpr
        .iter()
        .zip(pro)
        .filter(|&(&f, _)| f < PRO_MAX_FPR)
        .map(|(&f, &p)| (f, p))
        .collect();
    if kept.len() < 2 {
        return Metric::Undefined(Undefined::DegenerateFpr);
    }
    let fmin = kept.iter().map(|k| k.0).fold(f64::INFINITY, f64::min);
    let fmax = kept.iter().map(|k| k.0).fold(f64::NEG_INFINITY, f64::max);
    if fmax <= fmin {
        return Metric::Undefined(Undefined::DegenerateFpr);
    }
    let x: Vec<f64> = kept.iter().map(|k| (k.0 - fmin) / (fmax - fmin)).collect();
    // FPR is non-increasing in the threshold, so |Δx| is sklearn's `direction · Δx`.
    let area: f64 = x
        .windows(2)
        .zip(kept.windows(2))
        .map(|(xs, ks)| (xs[0] - xs[1]).abs() * (ks[0].1 + ks[1].1) / 2.0)
        .sum();
    Metric::Defined(area)
}

/// Pixel AUROC over a set of maps and masks (convenience over [`PixelAccumulator`]).
pub fn pixel_auroc(
    maps: &[&[f32]],
    masks: &[&[bool]],
    width: usize,
    height: usize,
) -> Result<Metric, MetricsError> {
    Ok(accumulate(maps, masks, width, height)?.finish().pixel_auroc)
}

/// AUPRO over a set of maps and masks (convenience over [`PixelAccumulator`]).
pub fn aupro(
    maps: &[&[f32]],
    masks: &[&[bool]],
    width: usize,
    height: usize,
) -> Result<Metric, MetricsError> {
    Ok(accumulate(maps, masks, width, height)?.finish().aupro)
}

fn accumulate(
    maps: &[&[f32]],
    masks: &[&[bool]],
    width: usize,
    height: usize,
) -> Result<PixelAccumulator, MetricsError> {
    if maps.len() != masks.len() {
        return Err(MetricsError::LengthMismatch {
            labels: masks.len(),
            scores: maps.len(),
        });
    }
    let mut acc = PixelAccumulator::new(width, height);
    let pairs: Vec<(&[f32], &[bool])> = maps.iter().copied().zip(masks.iter().copied()).collect();
    acc.add_images(&pairs)?;
    Ok(acc)
}

/// Mean of the defined values and how many there were (`None` when none is defined).
pub fn mean_defined(values: impl IntoIterator<Item = Metric>) -> (Option<f64>, usize) {
    let mut sum = 0.0;
    let mut n = 0usize;
    for v in values.into_iter().filter_map(Metric::value) {
        sum += v;
        n += 1;
    }
    if n == 0 {
        (None, 0)
    } else {
        (Some(sum / n as f64), n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_orders_like_floats() {
        let vals = [
            f32::NEG_INFINITY,
            -3.0,
            -1e-30,
            -0.0,
            0.0,
            1e-40,
            0.5,
            1.0,
            f32::MAX,
        ];
        for w in vals.windows(2) {
            assert!(key(w[0]) <= key(w[1]), "{} {}", w[0], w[1]);
            assert_eq!(unkey(key(w[1])), w[1]);
        }
        assert_eq!(key(-0.0), key(0.0));
    }

    #[test]
    fn histogram_counts_overflow_exactly() {
        let mut h = ScoreHistogram::new();
        for _ in 0..70_000 {
            h.add(0.25, false);
        }
        for _ in 0..3 {
            h.add(0.25, true);
        }
        h.add(0.75, true);
        let mut seen = Vec::new();
        h.for_each(|v, n, p| seen.push((v, n, p)));
        assert_eq!(seen, vec![(0.25, 70_000, 3), (0.75, 0, 1)]);
        assert_eq!(h.n_normal(), 70_000);
        assert_eq!(h.n_anomalous(), 4);
    }

    #[test]
    fn sorted_runs_equal_single_adds() {
        let values = [0.5f32, -2.0, 0.5, 1e-30, 0.25, 0.5, 3.0];
        let labels = [false, true, true, false, false, false, true];
        let mut one = ScoreHistogram::new();
        for (&v, &l) in values.iter().zip(&labels) {
            one.add(v, l);
        }
        // 200 000 copies in one run overflow the u16 counter three times.
        one.add(0.75, false);
        for _ in 0..199_999 {
            one.add(0.75, false);
        }
        let keys = |l: bool| {
            values
                .iter()
                .zip(&labels)
                .filter(|&(_, &x)| x == l)
                .map(|(&v, _)| key(v))
                .collect::<Vec<_>>()
        };
        let mut normal = runs(keys(false));
        normal.push((key(0.75), 200_000));
        normal.sort_unstable();
        let anomalous = runs(keys(true));
        let mut batch = ScoreHistogram::new();
        batch.add_sorted(&[(&normal, false), (&anomalous, true)]);
        let dump = |h: &ScoreHistogram| {
            let mut v = Vec::new();
            h.for_each(|x, n, p| v.push((x, n, p)));
            v
        };
        assert_eq!(dump(&one), dump(&batch));
        assert_eq!(dump(&batch).last(), Some(&(3.0, 0, 1)));
        assert!(dump(&batch).contains(&(0.75, 200_000, 0)));
        assert_eq!(batch.n_normal(), one.n_normal());
    }

    #[test]
    fn simple_auroc_and_ap() {
        let labels = [false, false, true, true];
        let scores = [0.1, 0.4, 0.35, 0.8];
        assert_eq!(
            image_auroc(&labels, &scores).unwrap(),
            Metric::Defined(0.75)
        );
        // sklearn: 0.8333333333333333
        let ap = average_precision(&labels, &scores)
            .unwrap()
            .value()
            .unwrap();
        assert!((ap - 0.833_333_333_333_333_3).abs() < 1e-12);
    }

    #[test]
    fn undefined_cases() {
        assert_eq!(
            image_auroc(&[false, false], &[0.1, 0.2]).unwrap(),
            Metric::Undefined(Undefined::NoAnomalous)
        );
        assert_eq!(
            image_auroc(&[true, true], &[0.1, 0.2]).unwrap(),
            Metric::Undefined(Undefined::NoNormal)
        );
        assert_eq!(
            average_precision(&[true, true], &[0.1, 0.2]).unwrap(),
            Metric::Defined(1.0)
        );
        assert!(matches!(
            image_auroc(&[true], &[f32::NAN]),
            Err(MetricsError::NonFinite { index: 0, .. })
        ));
    }

    #[test]
    fn diagonal_pixels_are_one_region() {
        let mask = [true, false, false, true];
        let map = [0.0f32; 4];
        assert_eq!(regions_of(&map, &mask, 2, 2).len(), 1);
        let mask = [true, false, false, false, false, false, false, false, true];
        assert_eq!(regions_of(&[0.0; 9], &mask, 3, 3).len(), 2);
    }

    #[test]
    fn metric_serialises_without_nan() {
        let s =
            serde_json::to_string(&[Metric::Defined(0.5), Metric::Undefined(Undefined::NoNormal)])
                .unwrap();
        assert_eq!(s, r#"[0.5,{"undefined":"no_normal"}]"#);
        let back: Vec<Metric> = serde_json::from_str(&s).unwrap();
        assert_eq!(back[1], Metric::Undefined(Undefined::NoNormal));
    }
}
