//! Frame preprocessing: Pillow-exact resampling of 8-bit images and the CLIP normalisation.
//!
//! Input: interleaved 8-bit pixels (1 to 4 channels), rows possibly padded (`stride` bytes
//! apart, as GStreamer delivers RGB). Output: a tight resized `u8` image, or the model input, a
//! float32 `[3, H, W]` tensor (`x/255`, then `(x − mean)/std`, like torchvision's `ToTensor` +
//! `Normalize`).
//!
//! The resampler reproduces Pillow's `Image.resize` on uint8 images bit for bit (checked against
//! Pillow 13 by `tests/preprocess.rs` on the fixtures of `engines/make_head_fixtures.py`):
//! - `Bilinear`/`Bicubic` are Pillow's separable convolution: the filter support grows with the
//!   downscale factor (antialias), weights are computed in `f64`, normalised to sum 1, then turned
//!   into fixed point with 22 fractional bits; the horizontal pass runs first, over the source rows
//!   the vertical pass needs only, and its result is rounded and clipped to `u8` before the
//!   vertical pass. A pass whose dimension does not change is skipped.
//! - `Nearest` is Pillow's nearest scaling: source coordinate `(x + 0.5)·in/out`, accumulated step by
//!   step in `f64` exactly as Pillow does, then truncated.
//! - Equal input and output sizes give a copy.
//!
//! Pillow's bicubic uses `a = −0.5`. Channels are independent: alpha pre-multiplication (Pillow
//! resizes RGBA as RGBa) is the caller's business (`image_io`).
//!
//! Failure modes: [`Resizer`] returns [`PreprocessError`] for empty sizes, a channel count
//! outside 1..=4, a stride shorter than a row or a buffer shorter than the geometry says. The
//! convenience functions ([`resize_u8`], [`preprocess_rgb`]) take buffers from our own pipeline and
//! panic on such programming errors (documented on each).

use thiserror::Error;

/// CLIP's normalisation mean, as the reference (and `manifest.toml`) writes it.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];

/// CLIP's normalisation standard deviation, as the reference (and `manifest.toml`) writes it.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Fractional bits of Pillow's fixed-point resampling weights (`32 − 8 − 2`).
const PRECISION_BITS: u32 = 22;

/// Resampling filter, named and defined as in Pillow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Filter {
    /// Pillow's `NEAREST` (also what Pillow uses for palette and 1-bit images).
    Nearest,
    /// Pillow's `BILINEAR`: triangle filter, support 1, antialiased when downscaling.
    Bilinear,
    /// Pillow's `BICUBIC`: cubic convolution with a = −0.5, support 2, antialiased when
    /// downscaling.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Nearest => 0.0,
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Nearest => 0.0,
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Why a resize could not run.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PreprocessError {
    /// A width or height of zero, on either side.
    #[error("empty image size: {src_w}x{src_h} -> {dst_w}x{dst_h}")]
    EmptySize {
        src_w: usize,
        src_h: usize,
        dst_w: usize,
        dst_h: usize,
    },
    /// Only 1 to 4 interleaved channels are supported.
    #[error("unsupported channel count {0} (1 to 4 supported)")]
    Channels(usize),
    /// Rows must be at least `width * channels` bytes apart.
    #[error("stride {stride} is shorter than a row of {row} bytes")]
    Stride { stride: usize, row: usize },
    /// The buffer is shorter than `stride * (height − 1) + width * channels`.
    #[error("buffer of {got} bytes is shorter than the {need} bytes the geometry needs")]
    Buffer { got: usize, need: usize },
    /// Dimensions too large for Pillow's arithmetic (it uses `int` and `float`).
    #[error("image dimension {0} is too large (limit {MAX_DIM})")]
    TooLarge(usize),
}

/// Largest width or height accepted by the resampler (Pillow's coordinates are `float`, exact up
/// to 2^24).
pub const MAX_DIM: usize = 1 << 24;

/// Fixed-point weights of one pass (one row of `ksize` weights per output pixel).
#[derive(Clone, Debug)]
struct Coeffs {
    ksize: usize,
    /// Per output pixel: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `bounds.len() * ksize` weights, zero past each pixel's tap count.
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs`: normalised `f64` weights for resampling `in_size` samples to
/// `out_size` (box = whole input). Returns `ksize`, per-output `(first, taps)` and the weights.
fn float_coeffs(
    in_size: usize,
    out_size: usize,
    filter: Filter,
) -> (usize, Vec<(usize, usize)>, Vec<f64>) {
    // Pillow keeps the box in `float` and converts the difference to `double`.
    let scale = f64::from(in_size as f32) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0f64; out_size * ksize];
    for (xx, k) in weights.chunks_exact_mut(ksize).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        // C `(int)` truncates towards zero; negative values are clamped to 0 just after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin as i64).max(0) as usize;
        let mut ww = 0.0f64;
        for (x, kx) in k.iter_mut().take(n).enumerate() {
            let w = filter.eval(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            ww += w;
        }
        if ww != 0.0 {
            k[..n].iter_mut().for_each(|kx| *kx /= ww);
        }
        bounds.push((xmin, n));
    }
    (ksize, bounds, weights)
}

impl Coeffs {
    /// Pillow's coefficient table in 8-bit fixed point (`normalize_coeffs_8bpc`).
    fn new(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
        let (ksize, bounds, float) = float_coeffs(in_size, out_size, filter);
        let one = f64::from(1u32 << PRECISION_BITS);
        let weights = float
            .iter()
            .map(|&w| {
                if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                }
            })
            .collect();
        Coeffs {
            ksize,
            bounds,
            weights,
        }
    }

    fn first_last(&self) -> (usize, usize) {
        let first = self.bounds.first().map_or(0, |b| b.0);
        let last = self.bounds.last().map_or(0, |b| b.0 + b.1);
        (first, last.max(first))
    }
}

/// Rounds a fixed-point accumulator to `u8` the way Pillow does (arithmetic shift, then clip).
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass for `C` interleaved channels: `rows` rows of `src` (stride `stride`, starting at
/// row `first`) into tight rows of `out_w * C` bytes.
fn horizontal<const C: usize>(
    src: &[u8],
    stride: usize,
    first: usize,
    rows: usize,
    coeffs: &Coeffs,
    dst: &mut [u8],
) {
    let out_row = coeffs.bounds.len() * C;
    for (r, out) in dst.chunks_exact_mut(out_row).take(rows).enumerate() {
        let line = &src[(first + r) * stride..];
        for ((px, &(xmin, n)), k) in out
            .chunks_exact_mut(C)
            .zip(&coeffs.bounds)
            .zip(coeffs.weights.chunks_exact(coeffs.ksize))
        {
            let mut acc = [HALF; C];
            let taps = &line[xmin * C..(xmin + n) * C];
            for (p, &w) in taps.chunks_exact(C).zip(&k[..n]) {
                for c in 0..C {
                    acc[c] += i32::from(p[c]) * w;
                }
            }
            for c in 0..C {
                px[c] = clip8(acc[c]);
            }
        }
    }
}

/// Vertical pass: `src` rows `row_len` bytes wide (`stride` apart) into `out_h` tight rows.
fn vertical(
    src: &[u8],
    stride: usize,
    row_len: usize,
    coeffs: &Coeffs,
    acc: &mut Vec<i32>,
    dst: &mut [u8],
) {
    acc.clear();
    acc.resize(row_len, HALF);
    for ((out, &(ymin, n)), k) in dst
        .chunks_exact_mut(row_len)
        .zip(&coeffs.bounds)
        .zip(coeffs.weights.chunks_exact(coeffs.ksize))
    {
        acc.fill(HALF);
        for (t, &w) in k[..n].iter().enumerate() {
            let row = &src[(ymin + t) * stride..(ymin + t) * stride + row_len];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * w;
            }
        }
        for (o, &a) in out.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
}

/// Pillow's nearest-neighbour source indices for `out_size` samples over `in_size` samples
/// (`None` where Pillow leaves the zero fill, which does not happen for whole-image scaling).
fn nearest_table(in_size: usize, out_size: usize) -> Vec<Option<usize>> {
    let step = f64::from(in_size as f32) / out_size as f64;
    let mut pos = step * 0.5;
    let mut table = Vec::with_capacity(out_size);
    for _ in 0..out_size {
        let i = if pos < 0.0 { -1 } else { pos as i64 };
        table.push((i >= 0 && (i as usize) < in_size).then_some(i as usize));
        pos += step;
    }
    table
}

/// A resize plan for one geometry: weights are computed once, buffers reused across frames.
#[derive(Clone, Debug)]
pub struct Resizer {
    src_w: usize,
    src_h: usize,
    dst_w: usize,
    dst_h: usize,
    channels: usize,
    filter: Filter,
    plan: Plan,
    tmp: Vec<u8>,
    acc: Vec<i32>,
}

#[derive(Clone, Debug)]
enum Plan {
    Copy,
    Nearest {
        xs: Vec<Option<usize>>,
        ys: Vec<Option<usize>>,
    },
    Convolve {
        horiz: Option<Coeffs>,
        /// Vertical weights; when a horizontal pass runs first, bounds are relative to `rows.0`.
        vert: Option<Coeffs>,
        /// Source rows the horizontal pass covers: first row and count.
        rows: (usize, usize),
    },
}

impl Resizer {
    /// Plans a resize of `src_w × src_h` images with `channels` interleaved channels to
    /// `dst_w × dst_h`.
    pub fn new(
        src_w: usize,
        src_h: usize,
        channels: usize,
        dst_w: usize,
        dst_h: usize,
        filter: Filter,
    ) -> Result<Resizer, PreprocessError> {
        if src_w == 0 || src_h == 0 || dst_w == 0 || dst_h == 0 {
            return Err(PreprocessError::EmptySize {
                src_w,
                src_h,
                dst_w,
                dst_h,
            });
        }
        if !(1..=4).contains(&channels) {
            return Err(PreprocessError::Channels(channels));
        }
        for d in [src_w, src_h, dst_w, dst_h] {
            if d > MAX_DIM {
                return Err(PreprocessError::TooLarge(d));
            }
        }
        let plan = if src_w == dst_w && src_h == dst_h {
            Plan::Copy
        } else if filter == Filter::Nearest {
            Plan::Nearest {
                xs: nearest_table(src_w, dst_w),
                ys: nearest_table(src_h, dst_h),
            }
        } else {
            let horiz = (src_w != dst_w).then(|| Coeffs::new(src_w, dst_w, filter));
            let mut vert = (src_h != dst_h).then(|| Coeffs::new(src_h, dst_h, filter));
            // Pillow's horizontal pass only covers the source rows the vertical pass reads.
            let mut rows = (0, src_h);
            if let (Some(_), Some(v)) = (&horiz, &mut vert) {
                let (first, last) = v.first_last();
                for b in &mut v.bounds {
                    b.0 -= first;
                }
                rows = (first, last - first);
            }
            Plan::Convolve { horiz, vert, rows }
        };
        Ok(Resizer {
            src_w,
            src_h,
            dst_w,
            dst_h,
            channels,
            filter,
            plan,
            tmp: Vec::new(),
            acc: Vec::new(),
        })
    }

    /// The filter this plan uses.
    pub fn filter(&self) -> Filter {
        self.filter
    }

    /// Output length in bytes (`dst_w * dst_h * channels`).
    pub fn output_len(&self) -> usize {
        self.dst_w * self.dst_h * self.channels
    }

    /// Resizes `src` (rows `stride` bytes apart) into the tight buffer `dst`
    /// (`dst_w * dst_h * channels` bytes).
    pub fn resize(
        &mut self,
        src: &[u8],
        stride: usize,
        dst: &mut [u8],
    ) -> Result<(), PreprocessError> {
        let c = self.channels;
        let row = self.src_w * c;
        if stride < row {
            return Err(PreprocessError::Stride { stride, row });
        }
        let need = stride * (self.src_h - 1) + row;
        if src.len() < need {
            return Err(PreprocessError::Buffer {
                got: src.len(),
                need,
            });
        }
        if dst.len() < self.output_len() {
            return Err(PreprocessError::Buffer {
                got: dst.len(),
                need: self.output_len(),
            });
        }
        let dst = &mut dst[..self.output_len()];
        let out_row = self.dst_w * c;
        match &self.plan {
            Plan::Copy => {
                for (y, out) in dst.chunks_exact_mut(out_row).enumerate() {
                    out.copy_from_slice(&src[y * stride..y * stride + row]);
                }
            }
            Plan::Nearest { xs, ys } => {
                for (out, yi) in dst.chunks_exact_mut(out_row).zip(ys) {
                    out.fill(0);
                    let Some(yi) = *yi else { continue };
                    let line = &src[yi * stride..yi * stride + row];
                    for (px, xi) in out.chunks_exact_mut(c).zip(xs) {
                        // Pillow's table is zero-initialised: an unmapped column reads pixel 0.
                        let xi = xi.unwrap_or(0);
                        px.copy_from_slice(&line[xi * c..xi * c + c]);
                    }
                }
            }
            Plan::Convolve { horiz, vert, rows } => match (horiz, vert) {
                (Some(h), None) => run_horizontal(c, src, stride, rows.0, rows.1, h, dst),
                (None, Some(v)) => vertical(src, stride, row, v, &mut self.acc, dst),
                (Some(h), Some(v)) => {
                    let (first, count) = *rows;
                    self.tmp.resize(count * out_row, 0);
                    run_horizontal(c, src, stride, first, count, h, &mut self.tmp);
                    vertical(&self.tmp, out_row, out_row, v, &mut self.acc, dst);
                }
                (None, None) => {
                    for (y, out) in dst.chunks_exact_mut(out_row).enumerate() {
                        out.copy_from_slice(&src[y * stride..y * stride + row]);
                    }
                }
            },
        }
        Ok(())
    }
}

fn run_horizontal(
    channels: usize,
    src: &[u8],
    stride: usize,
    first: usize,
    rows: usize,
    coeffs: &Coeffs,
    dst: &mut [u8],
) {
    match channels {
        1 => horizontal::<1>(src, stride, first, rows, coeffs, dst),
        2 => horizontal::<2>(src, stride, first, rows, coeffs, dst),
        3 => horizontal::<3>(src, stride, first, rows, coeffs, dst),
        _ => horizontal::<4>(src, stride, first, rows, coeffs, dst),
    }
}

/// Resizes an interleaved 8-bit image exactly like Pillow's `Image.resize(…, filter)` on an image
/// of the same mode (`channels` = 1 for L, 3 for RGB, …; see the module doc for alpha).
///
/// `stride` is the distance between rows in bytes (≥ `width * channels`); the output is tight,
/// `dst_w * dst_h * channels` bytes. An empty size on either side gives an empty vector.
///
/// # Panics
/// If `channels` is not 1..=4, `stride < width * channels`, or `src` is shorter than
/// `stride * (height − 1) + width * channels`: these buffers come from our own pipeline. Use
/// [`Resizer`] to get an error instead.
#[allow(clippy::too_many_arguments)]
pub fn resize_u8(
    src: &[u8],
    width: usize,
    height: usize,
    stride: usize,
    channels: usize,
    dst_w: usize,
    dst_h: usize,
    filter: Filter,
) -> Vec<u8> {
    if width == 0 || height == 0 || dst_w == 0 || dst_h == 0 {
        return Vec::new();
    }
    let mut resizer = match Resizer::new(width, height, channels, dst_w, dst_h, filter) {
        Ok(r) => r,
        Err(e) => panic!("resize_u8: {e}"),
    };
    let mut out = vec![0u8; resizer.output_len()];
    if let Err(e) = resizer.resize(src, stride, &mut out) {
        panic!("resize_u8: {e}");
    }
    out
}

/// Per-channel lookup table of the normalised value of every `u8`: `(x/255 − mean)/std`, computed
/// in `f32` with the same operations, in the same order, as torchvision.
pub fn normalisation_table(mean: [f32; 3], std: [f32; 3]) -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, out) in table.iter_mut().enumerate() {
            *out = (v as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    lut
}

/// Tight RGB (`width * height * 3` bytes) → normalised planar `[3, height, width]` float32, like
/// torchvision `ToTensor()` then `Normalize(mean, std)` (bit-exact in `f32`).
///
/// # Panics
/// If `rgb` is shorter than `width * height * 3` or `out` shorter than `3 * width * height`.
pub fn to_chw_normalised(
    rgb: &[u8],
    width: usize,
    height: usize,
    mean: [f32; 3],
    std: [f32; 3],
    out: &mut [f32],
) {
    let lut = normalisation_table(mean, std);
    chw_with_table(rgb, width * height, &lut, out);
}

/// [`to_chw_normalised`] with a precomputed [`normalisation_table`].
pub fn chw_with_table(rgb: &[u8], pixels: usize, lut: &[[f32; 256]; 3], out: &mut [f32]) {
    let rgb = &rgb[..pixels * 3];
    let (r, rest) = out[..pixels * 3].split_at_mut(pixels);
    let (g, b) = rest.split_at_mut(pixels);
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        r[i] = lut[0][px[0] as usize];
        g[i] = lut[1][px[1] as usize];
        b[i] = lut[2][px[2] as usize];
    }
}

/// The frame path: RGB of any size and stride → Pillow bicubic to `size × size` → normalised CHW
/// in `out` (`3 * size * size` floats).
///
/// # Panics
/// On inconsistent buffers (see [`resize_u8`]) or an `out` shorter than `3 * size * size`.
#[allow(clippy::too_many_arguments)]
pub fn preprocess_rgb(
    src: &[u8],
    width: usize,
    height: usize,
    stride: usize,
    size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    out: &mut [f32],
) {
    let mut pre = match Preprocessor::new(width, height, size, mean, std) {
        Ok(p) => p,
        Err(e) => panic!("preprocess_rgb: {e}"),
    };
    if let Err(e) = pre.run(src, stride, out) {
        panic!("preprocess_rgb: {e}");
    }
}

/// Reusable frame preprocessor for one input geometry: no allocation per frame after the first.
#[derive(Clone, Debug)]
pub struct Preprocessor {
    resizer: Resizer,
    size: usize,
    lut: Box<[[f32; 256]; 3]>,
    resized: Vec<u8>,
}

impl Preprocessor {
    /// Plans `width × height` RGB frames → `[3, size, size]` model input.
    pub fn new(
        width: usize,
        height: usize,
        size: usize,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Result<Preprocessor, PreprocessError> {
        let resizer = Resizer::new(width, height, 3, size, size, Filter::Bicubic)?;
        Ok(Preprocessor {
            resizer,
            size,
            lut: Box::new(normalisation_table(mean, std)),
            resized: vec![0; size * size * 3],
        })
    }

    /// The resized RGB of the last frame (tight, `size * size * 3` bytes).
    pub fn resized(&self) -> &[u8] {
        &self.resized
    }

    /// Resizes and normalises one frame into `out` (`3 * size * size` floats).
    pub fn run(
        &mut self,
        src: &[u8],
        stride: usize,
        out: &mut [f32],
    ) -> Result<(), PreprocessError> {
        let n = self.size * self.size;
        if out.len() < 3 * n {
            return Err(PreprocessError::Buffer {
                got: out.len(),
                need: 3 * n,
            });
        }
        self.resizer.resize(src, stride, &mut self.resized)?;
        chw_with_table(&self.resized, n, &self.lut, out);
        Ok(())
    }
}

/// Pillow's resize of a 16-bit single-channel image (`I;16`): the same plan as [`Resizer`] but with
/// `f64` weights, each pass rounding half away from zero and clipping to `0..=65535`. Used for
/// 16-bit grayscale PNGs (`image_io`).
pub fn resize_u16(
    src: &[u16],
    width: usize,
    height: usize,
    dst_w: usize,
    dst_h: usize,
    filter: Filter,
) -> Result<Vec<u16>, PreprocessError> {
    // Validates sizes the same way as the 8-bit path.
    Resizer::new(width, height, 1, dst_w, dst_h, filter)?;
    if src.len() < width * height {
        return Err(PreprocessError::Buffer {
            got: src.len(),
            need: width * height,
        });
    }
    if width == dst_w && height == dst_h {
        return Ok(src[..width * height].to_vec());
    }
    if filter == Filter::Nearest {
        let xs = nearest_table(width, dst_w);
        let ys = nearest_table(height, dst_h);
        let mut out = vec![0u16; dst_w * dst_h];
        for (row, yi) in out.chunks_exact_mut(dst_w).zip(&ys) {
            if let Some(yi) = *yi {
                for (o, xi) in row.iter_mut().zip(&xs) {
                    *o = src[yi * width + xi.unwrap_or(0)];
                }
            }
        }
        return Ok(out);
    }
    let src = &src[..width * height];
    let vert = (height != dst_h).then(|| float_coeffs(height, dst_h, filter));
    if width == dst_w {
        return Ok(match vert {
            Some((ksize, bounds, k)) => vertical_u16(src, width, &bounds, ksize, &k),
            None => src.to_vec(),
        });
    }
    let (ksize, bounds, k) = float_coeffs(width, dst_w, filter);
    // Pillow's horizontal pass only covers the rows the vertical pass reads.
    let (first, last) = match &vert {
        Some((_, vb, _)) => (
            vb.first().map_or(0, |b| b.0),
            vb.last().map_or(0, |b| b.0 + b.1),
        ),
        None => (0, height),
    };
    let mut tmp = vec![0u16; dst_w * (last - first)];
    for (r, row) in tmp.chunks_exact_mut(dst_w).enumerate() {
        let line = &src[(first + r) * width..(first + r + 1) * width];
        for (o, (&(xmin, n), kk)) in row.iter_mut().zip(bounds.iter().zip(k.chunks_exact(ksize))) {
            let mut ss = 0.0f64;
            for (&p, &wt) in line[xmin..xmin + n].iter().zip(&kk[..n]) {
                ss += f64::from(p) * wt;
            }
            *o = round_u16(ss);
        }
    }
    Ok(match vert {
        Some((vk, vb, vw)) => {
            let shifted: Vec<(usize, usize)> = vb.iter().map(|&(m, n)| (m - first, n)).collect();
            vertical_u16(&tmp, dst_w, &shifted, vk, &vw)
        }
        None => tmp,
    })
}

/// Pillow's `CLIP16(ROUND_UP(ss))`.
fn round_u16(ss: f64) -> u16 {
    let v = if ss >= 0.0 {
        (ss + 0.5) as i64
    } else {
        (ss - 0.5) as i64
    };
    v.clamp(0, 65535) as u16
}

fn vertical_u16(
    src: &[u16],
    w: usize,
    bounds: &[(usize, usize)],
    ksize: usize,
    k: &[f64],
) -> Vec<u16> {
    let mut out = vec![0u16; w * bounds.len()];
    for (yy, row) in out.chunks_exact_mut(w).enumerate() {
        let (ymin, n) = bounds[yy];
        let kk = &k[yy * ksize..yy * ksize + n];
        for (xx, o) in row.iter_mut().enumerate() {
            let mut ss = 0.0f64;
            for (t, &wt) in kk.iter().enumerate() {
                ss += f64::from(src[(ymin + t) * w + xx]) * wt;
            }
            *o = round_u16(ss);
        }
    }
    out
}
