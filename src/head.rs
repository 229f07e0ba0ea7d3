//! The anomaly head: image features → anomaly score and anomaly map (spec §5). This module owns
//! the head interface ([`AnomalyHead`]) that the CPU head here and the CUDA head
//! ([`crate::gpu::GpuHead`]) both implement, and the CPU head itself, in plain Rust.
//!
//! Input: the text constant `T = [t_n; t_a]` (`[2, D]`, once), then per image the global feature
//! `g` (`[D]`) and the local features of each enabled layer (`[grid², D]`, row-major over the patch
//! grid) — host slices, or for the GPU head the engine's outputs left in device memory
//! ([`HeadInput`]). Output ([`HeadOutput`]): the score `sigmoid(⟨ĝ, w⟩)` with `w = (t_a − t_n)/τ`,
//! the patch probabilities `sigmoid(⟨F̂_j, w⟩)` summed over layers (`grid²`), the map upsampled to
//! `size × size` with bilinear interpolation (`align_corners=False`, like PyTorch's
//! `F.interpolate`), and that map smoothed with scipy's `gaussian_filter` (σ = 4, truncate 4,
//! border `reflect` = half-sample symmetric, repeated for maps smaller than the radius).
//! Per frame, [`AnomalyHead::run_frame`] adds the map's maximum and `area` ([`MapStats`]).
//!
//! The pixel threshold has one meaning everywhere (here, the CUDA kernels, the mask, the docs and
//! the CLI): a pixel counts toward `area` and is set in a binary mask when
//! `value >= pixel_threshold`.
//!
//! The CPU head is the reference the GPU head is checked against. Agreement with the PyTorch +
//! scipy reference (`tests/head.rs`, fixtures from `engines/make_head_fixtures.py`): |Δ| ≤ 1e-5 on
//! maps and probabilities.
//!
//! Two departures from the reference's operation order, both exact in real arithmetic: layers are
//! summed on the patch grid before the (linear) upsampling rather than after it, and the Gaussian
//! accumulates in `f32` where scipy accumulates in `f64` (both store `f32` between the two passes).
//!
//! Failure modes: [`CpuHead::new`] rejects an inconsistent configuration or text constant and
//! [`CpuHead::run`] rejects features of the wrong length ([`HeadError`]). A NaN or infinity in a
//! feature reaches the score or the map (never hidden as probability 0.5), and
//! [`AnomalyHead::run_frame`] fails such a frame with [`HeadError::NonFinite`], naming the feature
//! or output that held it. The free functions take slices whose lengths the caller controls and
//! panic when they disagree (documented on each).

use thiserror::Error;

use crate::payload::MaskKind;

/// Why the head could not be built or run.
#[derive(Debug, Error)]
pub enum HeadError {
    /// A configuration value is out of range.
    #[error("invalid head configuration: {0}")]
    Config(String),
    /// The text constant does not hold `2 × dim` floats.
    #[error("text constant holds {got} floats, expected 2 x {dim} = {}", 2 * dim)]
    Text { got: usize, dim: usize },
    /// A feature tensor has the wrong number of floats.
    #[error("{what} holds {got} floats, expected {expected}")]
    Shape {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    /// At least one layer of local features is needed.
    #[error("no local feature layer given")]
    NoLayers,
    /// A feature or an output of this frame holds NaN or infinity.
    #[error(transparent)]
    NonFinite(#[from] NonFinite),
    /// Features in device memory were given to a head that reads host memory only.
    #[error("the {0} head cannot read features in device memory")]
    DeviceInput(&'static str),
    /// The GPU head failed (driver call, launch, copy).
    #[error("gpu: {0}")]
    Gpu(#[from] crate::gpu::GpuError),
}

/// The value of a frame that held NaN or infinity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameValue {
    /// The encoder's global feature.
    GlobalFeature,
    /// The encoder's local features of one layer (index in the package's `feature_layers`).
    LocalFeatures {
        /// Layer index, from 0.
        layer: usize,
    },
    /// The head's image score (the features were finite: the head overflowed).
    Score,
    /// The head's anomaly map (the features were finite: the head overflowed).
    Map,
}

impl std::fmt::Display for FrameValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameValue::GlobalFeature => f.write_str("the encoder's global feature"),
            FrameValue::LocalFeatures { layer } => {
                write!(f, "the encoder's local features of layer {layer}")
            }
            FrameValue::Score => f.write_str("the anomaly head's image score"),
            FrameValue::Map => f.write_str("the anomaly head's map"),
        }
    }
}

/// A frame whose features or head outputs hold NaN or infinity: it gives no result.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error(
    "non-finite output: {what} holds {count} NaN or infinite value(s); the frame gives no result (check the model export)"
)]
pub struct NonFinite {
    /// Which value.
    pub what: FrameValue,
    /// How many of its floats are NaN or infinite.
    pub count: usize,
}

fn count_non_finite(v: &[f32]) -> usize {
    v.iter().filter(|x| !x.is_finite()).count()
}

/// The first feature (global, then local layers in order) holding NaN or infinity, if any.
pub fn find_non_finite(global: &[f32], locals: &[&[f32]]) -> Option<NonFinite> {
    let g = count_non_finite(global);
    if g > 0 {
        return Some(NonFinite {
            what: FrameValue::GlobalFeature,
            count: g,
        });
    }
    locals.iter().enumerate().find_map(|(layer, l)| {
        let count = count_non_finite(l);
        (count > 0).then_some(NonFinite {
            what: FrameValue::LocalFeatures { layer },
            count,
        })
    })
}

/// Fails a frame whose score or map is not finite, naming the feature that caused it (found by
/// `features`, which only runs on this error path) or else the head output itself.
pub(crate) fn check_finite(
    score: f32,
    map_non_finite: usize,
    features: impl FnOnce() -> Result<Option<NonFinite>, HeadError>,
) -> Result<(), HeadError> {
    if score.is_finite() && map_non_finite == 0 {
        return Ok(());
    }
    if let Some(nf) = features()? {
        return Err(nf.into());
    }
    Err(if score.is_finite() {
        NonFinite {
            what: FrameValue::Map,
            count: map_non_finite,
        }
    } else {
        NonFinite {
            what: FrameValue::Score,
            count: 1,
        }
    }
    .into())
}

/// Where a head reads one image's features.
#[derive(Clone, Copy, Debug)]
pub enum HeadInput<'a> {
    /// In host memory: `global` is `[dim]`, each entry of `locals` one layer's `[grid², dim]`.
    Host {
        global: &'a [f32],
        locals: &'a [&'a [f32]],
    },
    /// One image of a batch the engine left in CUDA device memory (GPU head only; see
    /// [`AnomalyHead::reads_device_memory`]).
    Device(crate::gpu::DeviceImage<'a>),
}

/// What a head gives for one image.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadFrame {
    /// Image anomaly score in [0, 1], finite.
    pub score: f32,
    /// Final anomaly map, `height × width`, row-major, every value finite.
    pub map: Vec<f32>,
    /// Rows of `map`.
    pub height: usize,
    /// Columns of `map`.
    pub width: usize,
    /// Maximum and `area` of `map` at the caller's pixel threshold.
    pub stats: MapStats,
}

/// The anomaly head, wherever it runs: the CPU head ([`CpuHead`], the reference) or the CUDA head
/// ([`crate::gpu::GpuHead`]). The scorer holds one `Box<dyn AnomalyHead>` and calls
/// [`AnomalyHead::run_frame`] per image, whatever the head.
pub trait AnomalyHead: Send {
    /// Where it runs: `"cpu"` or `"gpu"`.
    fn device(&self) -> &'static str;

    /// Whether [`AnomalyHead::run_frame`] accepts [`HeadInput::Device`] (the scorer then asks the
    /// engine to leave its outputs in device memory).
    fn reads_device_memory(&self) -> bool {
        false
    }

    /// Runs the head on one image and summarises the map at `pixel_threshold` (a pixel counts
    /// toward `area` when `value >= pixel_threshold`).
    ///
    /// # Errors
    /// Features of the wrong shape ([`HeadError::Shape`], [`HeadError::NoLayers`], or the GPU
    /// head's [`HeadError::Gpu`]); NaN or infinity in a feature or an output
    /// ([`HeadError::NonFinite`]: the frame has no result); device input to a host-only head
    /// ([`HeadError::DeviceInput`]); a failing GPU ([`HeadError::Gpu`]).
    fn run_frame(
        &mut self,
        input: HeadInput<'_>,
        pixel_threshold: f32,
    ) -> Result<HeadFrame, HeadError>;
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `⟨v/‖v‖, w⟩`; a zero vector gives 0 (probability 0.5) rather than NaN; a vector holding NaN
/// or infinity gives NaN.
#[inline(always)]
fn normalised_dot(v: &[f32], w: &[f32]) -> f32 {
    let mut acc_d = [0f32; 8];
    let mut acc_n = [0f32; 8];
    let cv = v.chunks_exact(8);
    let cw = w.chunks_exact(8);
    let (rv, rw) = (cv.remainder(), cw.remainder());
    for (x, y) in cv.zip(cw) {
        for i in 0..8 {
            acc_d[i] += x[i] * y[i];
            acc_n[i] += x[i] * x[i];
        }
    }
    let (mut td, mut tn) = (0f32, 0f32);
    for (x, y) in rv.iter().zip(rw) {
        td += x * y;
        tn += x * x;
    }
    let sum = |a: [f32; 8]| ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    let d = sum(acc_d) + td;
    let n = (sum(acc_n) + tn).sqrt();
    // `n` is NaN or infinite when `v` holds NaN or infinity: the quotient is then NaN and reaches
    // the score or the map, where `AnomalyHead::run_frame` reports it (a `n > 0` test would turn
    // it into probability 0.5).
    if n == 0.0 { 0.0 } else { d / n }
}

/// The text direction `w = (t_a − t_n)/τ` from `T = [t_n; t_a]` (`[2, dim]`, row-major).
///
/// # Panics
/// If `text` holds fewer than `2 * dim` floats.
pub fn text_direction(text: &[f32], dim: usize, tau: f32) -> Vec<f32> {
    let (tn, ta) = (&text[..dim], &text[dim..2 * dim]);
    ta.iter().zip(tn).map(|(a, n)| (a - n) / tau).collect()
}

/// Image score `sigmoid(⟨g/‖g‖, w⟩)` (= the softmax over the two prompts at temperature τ).
///
/// # Panics
/// Never; a length mismatch uses the common prefix (callers check shapes, see [`CpuHead`]).
pub fn image_score(global: &[f32], w: &[f32]) -> f32 {
    let n = global.len().min(w.len());
    sigmoid(normalised_dot(&global[..n], &w[..n]))
}

crate::simd::dispatch_avx2! {
    /// Patch probabilities `sigmoid(⟨F_j/‖F_j‖, w⟩)` for the tokens `[n, dim]` into `out[..n]`.
    ///
    /// # Panics
    /// If `w` is shorter than `dim`, `dim` is 0, or `out` is shorter than `tokens.len() / dim`.
    pub fn patch_probabilities(tokens: &[f32], dim: usize, w: &[f32], out: &mut [f32])
        => probabilities_impl
}

#[inline(always)]
fn probabilities_impl(tokens: &[f32], dim: usize, w: &[f32], out: &mut [f32]) {
    let w = &w[..dim];
    for (tok, o) in tokens.chunks_exact(dim).zip(out.iter_mut()) {
        *o = sigmoid(normalised_dot(tok, w));
    }
}

/// Source indices and weights of one axis of a bilinear resize (PyTorch, `align_corners=False`).
#[derive(Clone, Debug, Default)]
struct Axis {
    i0: Vec<usize>,
    i1: Vec<usize>,
    l0: Vec<f32>,
    l1: Vec<f32>,
    /// Runs of consecutive outputs with the same source pair: `(start, end, i0, i1)`.
    runs: Vec<(usize, usize, usize, usize)>,
}

impl Axis {
    /// PyTorch's `area_pixel_compute_source_index` and `guard_index_and_lambda`, in `f32`.
    fn new(src: usize, dst: usize) -> Axis {
        let scale = src as f32 / dst as f32;
        let mut a = Axis::default();
        for i in 0..dst {
            let real = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (real.floor() as usize).min(src - 1);
            let lambda = (real - i0 as f32).clamp(0.0, 1.0);
            a.i0.push(i0);
            a.i1.push(if i0 < src - 1 { i0 + 1 } else { i0 });
            a.l0.push(1.0 - lambda);
            a.l1.push(lambda);
        }
        let mut start = 0;
        for i in 1..=dst {
            if i == dst || (a.i0[i], a.i1[i]) != (a.i0[start], a.i1[start]) {
                a.runs.push((start, i, a.i0[start], a.i1[start]));
                start = i;
            }
        }
        a
    }
}

/// A bilinear resize plan (`align_corners=False`) between two fixed sizes; reusable.
#[derive(Clone, Debug)]
pub struct Bilinear {
    src_h: usize,
    src_w: usize,
    dst_h: usize,
    dst_w: usize,
    ys: Axis,
    xs: Axis,
    /// `src_h × dst_w`: the rows interpolated horizontally.
    tmp: Vec<f32>,
}

impl Bilinear {
    /// Plans `src_h × src_w` → `dst_h × dst_w`. All sizes must be non-zero.
    pub fn new(src_h: usize, src_w: usize, dst_h: usize, dst_w: usize) -> Bilinear {
        let ok = src_h > 0 && src_w > 0 && dst_h > 0 && dst_w > 0;
        let (ys, xs) = if ok {
            (Axis::new(src_h, dst_h), Axis::new(src_w, dst_w))
        } else {
            (Axis::default(), Axis::default())
        };
        Bilinear {
            src_h,
            src_w,
            dst_h,
            dst_w,
            ys,
            xs,
            tmp: vec![0.0; if ok { src_h * dst_w } else { 0 }],
        }
    }

    /// Resizes `src` (`src_h * src_w`) into `dst` (`dst_h * dst_w`).
    ///
    /// # Panics
    /// If a buffer is shorter than its size says.
    pub fn run(&mut self, src: &[f32], dst: &mut [f32]) {
        bilinear_run(self, src, dst);
    }
}

crate::simd::dispatch_avx2! {
    fn bilinear_run(plan: &mut Bilinear, src: &[f32], dst: &mut [f32]) => bilinear_impl
}

impl Bilinear {
    #[inline(always)]
    fn run_impl(&mut self, src: &[f32], dst: &mut [f32]) {
        let (sw, dw) = (self.src_w, self.dst_w);
        if self.ys.i0.is_empty() || self.xs.i0.is_empty() {
            return;
        }
        let xs = &self.xs;
        for (row, out) in src[..self.src_h * sw]
            .chunks_exact(sw)
            .zip(self.tmp.chunks_exact_mut(dw))
        {
            // Per run of outputs between the same two source samples: no gathers.
            for &(x0, x1, i0, i1) in &xs.runs {
                let (p, q) = (row[i0], row[i1]);
                for ((o, &l0), &l1) in out[x0..x1]
                    .iter_mut()
                    .zip(&xs.l0[x0..x1])
                    .zip(&xs.l1[x0..x1])
                {
                    *o = l0 * p + l1 * q;
                }
            }
        }
        let ys = &self.ys;
        for (y, out) in dst[..self.dst_h * dw].chunks_exact_mut(dw).enumerate() {
            let (a, b) = (ys.i0[y] * dw, ys.i1[y] * dw);
            let (r0, r1) = (&self.tmp[a..a + dw], &self.tmp[b..b + dw]);
            let (l0, l1) = (ys.l0[y], ys.l1[y]);
            for ((o, &p), &q) in out.iter_mut().zip(r0).zip(r1) {
                *o = l0 * p + l1 * q;
            }
        }
    }
}

#[inline(always)]
fn bilinear_impl(plan: &mut Bilinear, src: &[f32], dst: &mut [f32]) {
    plan.run_impl(src, dst);
}

/// Bilinear resize like `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`
/// (no antialias), any sizes up or down, non-square. Empty sizes do nothing.
///
/// # Panics
/// If `src` is shorter than `src_h * src_w` or `dst` shorter than `dst_h * dst_w`.
pub fn upsample_bilinear(
    src: &[f32],
    src_h: usize,
    src_w: usize,
    dst: &mut [f32],
    dst_h: usize,
    dst_w: usize,
) {
    Bilinear::new(src_h, src_w, dst_h, dst_w).run(src, dst);
}

/// Bilinear resize of a map to another size (e.g. back to the camera frame), see
/// [`upsample_bilinear`].
pub fn resize_map(map: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    let mut out = vec![0.0; out_h * out_w];
    upsample_bilinear(map, h, w, &mut out, out_h, out_w);
    out
}

/// scipy's Gaussian kernel: radius `int(truncate·σ + 0.5)`, weights `exp(−x²/(2σ²))` normalised
/// to sum 1 (computed in `f64`, returned as `f32`). σ = 4, truncate = 4 gives 33 taps. A σ that is
/// not positive and finite gives the identity kernel `[1.0]`.
pub fn gaussian_kernel(sigma: f32, truncate: f32) -> Vec<f32> {
    let (sigma, truncate) = (f64::from(sigma), f64::from(truncate));
    if !(sigma > 0.0 && sigma.is_finite() && truncate.is_finite() && truncate >= 0.0) {
        return vec![1.0];
    }
    let radius = (truncate * sigma + 0.5) as i64;
    let s2 = sigma * sigma;
    let phi: Vec<f64> = (-radius..=radius)
        .map(|x| (-0.5 / s2 * (x * x) as f64).exp())
        .collect();
    let sum: f64 = phi.iter().sum();
    phi.iter().map(|p| (p / sum) as f32).collect()
}

/// scipy's `reflect` (half-sample symmetric, `d c b a | a b c d | d c b a`) index for any offset,
/// reflecting repeatedly when the signal is shorter than the kernel radius.
#[inline]
fn reflect(i: isize, n: usize) -> usize {
    let period = 2 * n as isize;
    let m = i.rem_euclid(period) as usize;
    if m >= n { 2 * n - 1 - m } else { m }
}

crate::simd::dispatch_avx2! {
    /// Separable Gaussian blur in place, like `scipy.ndimage.gaussian_filter(map, σ, mode="reflect")`
    /// on a float32 `h × w` map: axis 0 (down the columns) first, then axis 1, `f32` in between.
    /// `kernel` comes from [`gaussian_kernel`] (odd length, symmetric); `scratch` is reused across
    /// calls (grown to `h * w + w + len(kernel)` floats).
    ///
    /// # Panics
    /// If `map` is shorter than `h * w` or the kernel has an even length.
    pub fn gaussian_blur(map: &mut [f32], h: usize, w: usize, kernel: &[f32], scratch: &mut Vec<f32>)
        => blur_impl
}

#[inline(always)]
fn blur_impl(map: &mut [f32], h: usize, w: usize, kernel: &[f32], scratch: &mut Vec<f32>) {
    assert!(
        kernel.len() % 2 == 1,
        "gaussian kernel must have an odd length"
    );
    if h == 0 || w == 0 {
        return;
    }
    let r = kernel.len() / 2;
    let map = &mut map[..h * w];
    let need = h * w + w + 2 * r;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let (src, pad) = scratch.split_at_mut(h * w);
    // Axis 0: each output row is a weighted sum of whole (reflected) input rows.
    src.copy_from_slice(map);
    for (y, out) in map.chunks_exact_mut(w).enumerate() {
        let row = |t: usize| {
            let i = reflect(y as isize + t as isize - r as isize, h);
            &src[i * w..(i + 1) * w]
        };
        let k0 = kernel[r];
        for (o, &c) in out.iter_mut().zip(row(r)) {
            *o = k0 * c;
        }
        for t in 1..=r {
            let k = kernel[r + t];
            for ((o, &a), &b) in out.iter_mut().zip(row(r - t)).zip(row(r + t)) {
                *o += k * (a + b);
            }
        }
    }
    // Axis 1: each row is copied with reflected margins, then convolved in place.
    let pad = &mut pad[..w + 2 * r];
    for line in map.chunks_exact_mut(w) {
        for (j, p) in pad.iter_mut().enumerate() {
            *p = line[reflect(j as isize - r as isize, w)];
        }
        let k0 = kernel[r];
        for (o, &c) in line.iter_mut().zip(&pad[r..]) {
            *o = k0 * c;
        }
        for t in 1..=r {
            let k = kernel[r + t];
            for ((o, &a), &b) in line.iter_mut().zip(&pad[r - t..]).zip(&pad[r + t..]) {
                *o += k * (a + b);
            }
        }
    }
}

/// Summary of a map against a pixel threshold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapStats {
    /// Largest value (`-inf` for an empty map; NaN values are ignored).
    pub max: f32,
    /// Number of values at or above the threshold (`value >= pixel_threshold`).
    pub above: usize,
    /// `above / len` (0 for an empty map).
    pub area: f32,
    /// Number of NaN or infinite values.
    pub non_finite: usize,
}

/// Maximum, count and fraction of values at or above `pixel_threshold`, and the number of
/// non-finite values.
pub fn map_stats(map: &[f32], pixel_threshold: f32) -> MapStats {
    let mut max = f32::NEG_INFINITY;
    let mut above = 0usize;
    let mut non_finite = 0usize;
    for &v in map {
        max = max.max(v);
        above += usize::from(v >= pixel_threshold);
        non_finite += usize::from(!v.is_finite());
    }
    MapStats {
        max,
        above,
        area: area(above, map.len()),
        non_finite,
    }
}

/// `above / len` in `f64`, rounded to `f32` (0 for an empty map); shared by both heads.
pub(crate) fn area(above: usize, len: usize) -> f32 {
    if len == 0 {
        0.0
    } else {
        (above as f64 / len as f64) as f32
    }
}

/// `255` where the value is at or above `threshold` (`value >= threshold`), else `0` (over the
/// common length).
pub fn binary_mask(map: &[f32], threshold: f32, out: &mut [u8]) {
    for (o, &v) in out.iter_mut().zip(map) {
        *o = if v >= threshold { 255 } else { 0 };
    }
}

/// `round(clamp(v, 0, 1) · 255)` per value (NaN → 0), over the common length.
pub fn quantize_u8(map: &[f32], out: &mut [u8]) {
    for (o, &v) in out.iter_mut().zip(map) {
        *o = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    }
}

/// Shape and constants of the head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadConfig {
    /// Map edge in pixels (the model input size, 518 for the real model).
    pub size: usize,
    /// Patches per side (37 for the real model).
    pub grid: usize,
    /// Feature dimension D (768 for the real model).
    pub dim: usize,
    /// Temperature τ (0.07).
    pub tau: f32,
    /// Gaussian σ in pixels (4; 0 disables the blur). Truncated at 4σ like scipy's default.
    pub sigma: f32,
}

/// What the head computes for one image.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadOutput {
    /// Image anomaly score in [0, 1].
    pub score: f32,
    /// Patch probabilities summed over layers, `grid × grid` row-major.
    pub patch: Vec<f32>,
    /// Map after upsampling, before the Gaussian, `size × size`.
    pub map_raw: Vec<f32>,
    /// Final map, `size × size`.
    pub map: Vec<f32>,
}

impl HeadOutput {
    /// Buffers sized for `config`, so that [`CpuHead::run`] does not allocate.
    pub fn new(config: &HeadConfig) -> HeadOutput {
        HeadOutput {
            score: 0.0,
            patch: vec![0.0; config.grid * config.grid],
            map_raw: vec![0.0; config.size * config.size],
            map: vec![0.0; config.size * config.size],
        }
    }
}

/// The CPU head: owns `w`, the Gaussian kernel, the bilinear plan and every scratch buffer, so a
/// frame allocates nothing once the output buffers have their size.
#[derive(Clone, Debug)]
pub struct CpuHead {
    config: HeadConfig,
    w: Vec<f32>,
    kernel: Vec<f32>,
    upsample: Bilinear,
    layer: Vec<f32>,
    scratch: Vec<f32>,
    /// Buffers of [`AnomalyHead::run_frame`] (sized on its first call).
    frame: HeadOutput,
}

/// Gaussian truncation used by the reference (scipy's default).
pub const GAUSSIAN_TRUNCATE: f32 = 4.0;

impl CpuHead {
    /// Builds the head from its configuration and the text constant `T = [t_n; t_a]` (`[2, dim]`).
    pub fn new(config: HeadConfig, text: &[f32]) -> Result<CpuHead, HeadError> {
        let HeadConfig {
            size,
            grid,
            dim,
            tau,
            sigma,
        } = config;
        if size == 0 || grid == 0 || dim == 0 {
            return Err(HeadError::Config(format!(
                "size ({size}), grid ({grid}) and dim ({dim}) must be positive"
            )));
        }
        if !(tau > 0.0 && tau.is_finite()) {
            return Err(HeadError::Config(format!(
                "tau must be positive and finite, got {tau}"
            )));
        }
        if !(sigma >= 0.0 && sigma.is_finite()) {
            return Err(HeadError::Config(format!(
                "sigma must be zero or positive and finite, got {sigma}"
            )));
        }
        if text.len() != 2 * dim {
            return Err(HeadError::Text {
                got: text.len(),
                dim,
            });
        }
        let kernel = if sigma > 0.0 {
            gaussian_kernel(sigma, GAUSSIAN_TRUNCATE)
        } else {
            vec![1.0]
        };
        let r = kernel.len() / 2;
        Ok(CpuHead {
            config,
            w: text_direction(text, dim, tau),
            kernel,
            upsample: Bilinear::new(grid, grid, size, size),
            layer: vec![0.0; grid * grid],
            scratch: vec![0.0; size * size + size + 2 * r],
            frame: HeadOutput::default(),
        })
    }

    /// The configuration this head was built with.
    pub fn config(&self) -> &HeadConfig {
        &self.config
    }

    /// The text direction `w = (t_a − t_n)/τ`.
    pub fn direction(&self) -> &[f32] {
        &self.w
    }

    /// The Gaussian kernel in use.
    pub fn kernel(&self) -> &[f32] {
        &self.kernel
    }

    /// Runs the head on one image: `global` is `[dim]`, each entry of `locals` is one layer's
    /// `[grid², dim]` local features. Output buffers are resized if needed (no allocation when
    /// they come from [`HeadOutput::new`]).
    pub fn run(
        &mut self,
        global: &[f32],
        locals: &[&[f32]],
        out: &mut HeadOutput,
    ) -> Result<(), HeadError> {
        let HeadConfig {
            size, grid, dim, ..
        } = self.config;
        let n = grid * grid;
        if global.len() != dim {
            return Err(HeadError::Shape {
                what: "global feature",
                got: global.len(),
                expected: dim,
            });
        }
        if locals.is_empty() {
            return Err(HeadError::NoLayers);
        }
        for l in locals {
            if l.len() != n * dim {
                return Err(HeadError::Shape {
                    what: "local features",
                    got: l.len(),
                    expected: n * dim,
                });
            }
        }
        out.patch.resize(n, 0.0);
        out.map_raw.resize(size * size, 0.0);
        out.map.resize(size * size, 0.0);

        out.score = image_score(global, &self.w);
        patch_probabilities(locals[0], dim, &self.w, &mut out.patch);
        for l in &locals[1..] {
            patch_probabilities(l, dim, &self.w, &mut self.layer);
            for (p, q) in out.patch.iter_mut().zip(&self.layer) {
                *p += q;
            }
        }
        self.upsample.run(&out.patch, &mut out.map_raw);
        out.map.copy_from_slice(&out.map_raw);
        if self.kernel.len() > 1 {
            gaussian_blur(&mut out.map, size, size, &self.kernel, &mut self.scratch);
        }
        Ok(())
    }
}

impl AnomalyHead for CpuHead {
    fn device(&self) -> &'static str {
        "cpu"
    }

    fn run_frame(
        &mut self,
        input: HeadInput<'_>,
        pixel_threshold: f32,
    ) -> Result<HeadFrame, HeadError> {
        let HeadInput::Host { global, locals } = input else {
            return Err(HeadError::DeviceInput("cpu"));
        };
        let mut out = std::mem::take(&mut self.frame);
        let res = self.run(global, locals, &mut out);
        let frame = res.and_then(|()| {
            let stats = map_stats(&out.map, pixel_threshold);
            check_finite(out.score, stats.non_finite, || {
                Ok(find_non_finite(global, locals))
            })?;
            let size = self.config.size;
            Ok(HeadFrame {
                score: out.score,
                map: out.map.clone(),
                height: size,
                width: size,
                stats,
            })
        });
        self.frame = out;
        frame
    }
}
/// Resamples a `map_w × map_h` anomaly map (row-major, values in [0, 1]) to `size × size` with
/// the head's bilinear resize ([`resize_map`], `align_corners=False`) and quantises
/// it as `kind` says with the head's functions: [`quantize_u8`] for
/// [`MaskKind::GrayMap`], [`binary_mask`] (`value >= pixel_threshold`) for
/// [`MaskKind::Binary`]. The GPU head's `download_u8`/`download_mask` at frame size `size × size`
/// give the same pixels. An empty or mis-sized map gives an all-zero mask.
pub fn render_mask(
    map: &[f32],
    map_w: usize,
    map_h: usize,
    size: u32,
    kind: MaskKind,
    pixel_threshold: f32,
) -> Vec<u8> {
    let n = size as usize;
    let mut out = vec![0u8; n * n];
    if map_w == 0 || map_h == 0 || map.len() != map_w * map_h || n == 0 {
        return out;
    }
    let resized = resize_map(map, map_h, map_w, n, n);
    match kind {
        MaskKind::GrayMap => quantize_u8(&resized, &mut out),
        MaskKind::Binary => binary_mask(&resized, pixel_threshold, &mut out),
        MaskKind::ThresholdMap => {
            for (o, v) in out.iter_mut().zip(&resized) {
                *o = threshold_grey(*v, pixel_threshold);
            }
        }
    }
    out
}

/// [`MaskKind::ThresholdMap`]'s grey level of a map value for pixel threshold `t`: 0..=127
/// below `t`, 128..=255 from `t` to 1 (a non-finite value is 0).
pub fn threshold_grey(v: f32, t: f32) -> u8 {
    if !v.is_finite() {
        return 0;
    }
    let v = v.clamp(0.0, 1.0);
    let t = t.clamp(0.0, 1.0);
    if v < t {
        (127.0 * v / t).round() as u8
    } else if t >= 1.0 {
        255
    } else {
        128 + (127.0 * (v - t) / (1.0 - t)).round() as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_map_puts_mid_grey_at_the_pixel_threshold_on_every_frame() {
        assert_eq!(threshold_grey(0.3, 0.3), 128);
        assert_eq!(threshold_grey(0.0, 0.3), 0);
        assert_eq!(threshold_grey(1.0, 0.3), 255);
        assert_eq!(threshold_grey(0.15, 0.3), 64);
        assert_eq!(threshold_grey(0.29, 0.3), 123);
        assert_eq!(threshold_grey(0.3 - 1e-6, 0.3), 127);
        assert_eq!(threshold_grey(0.9, 0.9), 128);
        assert_eq!(threshold_grey(f32::NAN, 0.5), 0);
        // Same value, same grey, whatever else is in the frame.
        let a = render_mask(&[0.6, 0.1, 0.1, 0.1], 2, 2, 2, MaskKind::ThresholdMap, 0.5);
        let b = render_mask(&[0.6, 0.9, 0.9, 0.9], 2, 2, 2, MaskKind::ThresholdMap, 0.5);
        assert!(a[0] >= 128 && b[1] > a[0]);
    }

    #[test]
    fn render_mask_gray_and_binary() {
        // 2x2 map upsampled to 4x4.
        let map = [0.0, 1.0, 0.0, 1.0];
        let g = render_mask(&map, 2, 2, 4, MaskKind::GrayMap, 0.5);
        assert_eq!(g.len(), 16);
        assert_eq!(g[0], 0);
        assert_eq!(g[3], 255);
        assert!(g[1] > 0 && g[1] < 128 && g[2] > 128 && g[2] < 255);
        let b = render_mask(&map, 2, 2, 4, MaskKind::Binary, 0.5);
        assert_eq!(&b[0..4], &[0, 0, 255, 255]);
        assert_eq!(
            render_mask(&map, 3, 2, 4, MaskKind::Binary, 0.5),
            vec![0; 16]
        );
    }
}
