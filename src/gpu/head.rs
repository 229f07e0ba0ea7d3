//! [`GpuHead`]: the anomaly head on one CUDA device and stream. Buffers are allocated once in
//! [`GpuHead::new`] (the token staging buffer of [`GpuHead::run_host`] grows if more layers come);
//! a frame is a fixed sequence of launches ending in one small synchronising copy. It implements
//! [`AnomalyHead`] (host features, or the engine's outputs in device memory as a [`DeviceImage`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaModule, CudaSlice, CudaStream, CudaView};

use super::sys::{self, Kernels, MAX_LAYERS, MAX_SHARED_BYTES};
use super::{GpuError, Target, compile_kernels};
use crate::engine::DeviceFeatures;
use crate::head::{
    AnomalyHead, GAUSSIAN_TRUNCATE, HeadConfig, HeadError, HeadFrame, HeadInput, MapStats,
    NonFinite, check_finite, find_non_finite, gaussian_kernel, text_direction,
};

/// Pixel threshold used until [`GpuHead::set_threshold`] is called.
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// Scalar results of one frame (the maps stay on the device; see [`GpuHead::download_map`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuHeadOutput {
    /// Image anomaly score `sigmoid(⟨ĝ, w⟩)` in [0, 1].
    pub score: f32,
    /// Maximum of the frame-size map (`-inf` if every value is NaN).
    pub map_max: f32,
    /// Pixels of the frame-size map at or above the threshold (`value >= threshold`).
    pub above: usize,
    /// `above / (out_h · out_w)`.
    pub area: f32,
    /// NaN or infinite values in the frame-size map.
    pub non_finite: usize,
}

/// One image of a batch of encoder outputs that the engine left in CUDA device memory (ONNX
/// Runtime's IoBinding outputs, [`DeviceFeatures`]), for [`HeadInput::Device`].
///
/// Only this crate builds one, inside the callback of
/// [`crate::engine::Engine::infer_on_device`], where the engine guarantees that the buffers are
/// complete, on the device's primary context, and alive; the GPU head reads them there without a
/// host copy.
#[derive(Clone, Copy, Debug)]
pub struct DeviceImage<'a> {
    features: &'a DeviceFeatures,
    image: usize,
}

/// `(device pointer, number of f32)` of one image's global feature and of each layer's local
/// features.
type ImagePointers = ((u64, usize), Vec<(u64, usize)>);

impl<'a> DeviceImage<'a> {
    /// Image `image` of the batch `features`, as handed to the `infer_on_device` callback.
    pub(crate) fn new(features: &'a DeviceFeatures, image: usize) -> Self {
        DeviceImage { features, image }
    }

    /// The image's sub-ranges of the batch buffers, checked to lie inside them.
    fn pointers(&self) -> Result<ImagePointers, GpuError> {
        let DeviceFeatures {
            batch, dim, tokens, ..
        } = *self.features;
        let bad = |m: String| GpuError::Input(format!("device features: {m}"));
        if self.image >= batch {
            return Err(bad(format!("image {} of a batch of {batch}", self.image)));
        }
        let f32s = std::mem::size_of::<f32>();
        let range = |(ptr, len): (u64, usize), per: usize, what: &str| {
            let need = per.checked_mul(batch);
            if need != Some(len) {
                return Err(bad(format!(
                    "{what} holds {len} floats, expected {batch} x {per}"
                )));
            }
            let offset = (self.image * per)
                .checked_mul(f32s)
                .and_then(|b| u64::try_from(b).ok())
                .and_then(|b| ptr.checked_add(b))
                .ok_or_else(|| bad(format!("{what}: address overflow")))?;
            Ok((offset, per))
        };
        let per_local = tokens
            .checked_mul(dim)
            .ok_or_else(|| bad(format!("{tokens} x {dim} overflows")))?;
        let global = range(self.features.global, dim, "global feature")?;
        let locals = self
            .features
            .locals
            .iter()
            .enumerate()
            .map(|(l, &buf)| range(buf, per_local, &format!("local features of layer {l}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((global, locals))
    }
}

/// Intermediate results kept on the device after a frame, for [`GpuHead::download_stage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Patch probabilities summed over layers, grid × grid (kernel `head_tokens`).
    Patch,
    /// Upsampled map, size × size, before the Gaussian (`bilinear_resize`).
    MapRaw,
    /// Smoothed map, size × size (`gauss_cols` + `gauss_rows`), = the CPU head's `map`.
    MapSmoothed,
    /// Final map at frame size out_h × out_w (= `MapSmoothed` when the sizes agree).
    Map,
}

/// The anomaly head on a GPU. Built once per device, model and frame size; `run_*` per frame,
/// one frame at a time (`&mut self`). `Send`: build it once and move it to the thread or task
/// that runs the frames. Device buffers are freed when it drops.
#[derive(Debug)]
pub struct GpuHead {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    kernels: Kernels,
    cfg: HeadConfig,
    out_h: usize,
    out_w: usize,
    threshold: f32,
    radius: usize,
    target: Target,
    device_name: String,
    compute_capability: (i32, i32),
    w: CudaSlice<f32>,
    taps: CudaSlice<f32>,
    inputs: Inputs,
    work: Work,
}

/// Staging buffers for host input.
#[derive(Debug)]
struct Inputs {
    global: CudaSlice<f32>,
    /// `layers` × grid² × dim.
    tokens: CudaSlice<f32>,
    layers: usize,
}

/// Per-frame intermediate and output buffers.
#[derive(Debug)]
struct Work {
    patch: CudaSlice<f32>,
    map_raw: CudaSlice<f32>,
    tmp: CudaSlice<f32>,
    map: CudaSlice<f32>,
    /// Frame-size map, when out_h × out_w differs from size × size.
    out: Option<CudaSlice<f32>>,
    q: CudaSlice<u8>,
    mask: CudaSlice<u8>,
    /// [score bits, max key, count at or above the threshold, non-finite count].
    scalars: CudaSlice<u32>,
}

impl Work {
    fn final_map(&self) -> &CudaSlice<f32> {
        self.out.as_ref().unwrap_or(&self.map)
    }
}

fn validate(
    text: &[f32],
    cfg: &HeadConfig,
    out_h: usize,
    out_w: usize,
) -> Result<Vec<f32>, GpuError> {
    let HeadConfig {
        size,
        grid,
        dim,
        tau,
        sigma,
    } = *cfg;
    let bad = |m: String| Err(GpuError::Config(m));
    if size == 0 || grid == 0 || dim == 0 || out_h == 0 || out_w == 0 {
        return bad(format!(
            "size ({size}), grid ({grid}), dim ({dim}) and the frame size ({out_h}x{out_w}) must be positive"
        ));
    }
    if !(tau > 0.0 && tau.is_finite()) {
        return bad(format!("tau must be positive and finite, got {tau}"));
    }
    if !(sigma >= 0.0 && sigma.is_finite()) {
        return bad(format!(
            "sigma must be zero or positive and finite, got {sigma}"
        ));
    }
    if text.len() != 2 * dim {
        return bad(format!(
            "text constant holds {} floats, expected 2 x {dim}",
            text.len()
        ));
    }
    let limit = i32::MAX as usize;
    if size * size > limit || out_h * out_w > limit || grid * grid * dim * MAX_LAYERS > limit {
        return bad("sizes too large for 32-bit kernel indices".into());
    }
    let taps = if sigma > 0.0 {
        gaussian_kernel(sigma, GAUSSIAN_TRUNCATE)
    } else {
        vec![1.0]
    };
    let (cols, rows) = sys::gauss_shared_bytes(taps.len() / 2);
    if cols.max(rows) > MAX_SHARED_BYTES {
        return bad(format!(
            "sigma {sigma} needs a {}-pixel Gaussian radius, more than the gpu head's shared-memory tiles hold (sigma must be below 38.8)",
            taps.len() / 2
        ));
    }
    Ok(taps)
}

/// [`compile_kernels`], once per process for each (architecture, target): several heads (cameras,
/// tests) share one NVRTC compilation (~0.3 s).
fn compile_cached(arch: (i32, i32), target: Target) -> Result<sys::Image, GpuError> {
    type Cache = Mutex<HashMap<((i32, i32), Target), sys::Image>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let hit = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(arch, target))
        .cloned();
    if let Some(image) = hit {
        return Ok(image);
    }
    let image = compile_kernels(arch, target)?;
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert((arch, target), image.clone());
    Ok(image)
}

/// Compiles and loads the kernels for `cc`: a CUBIN for `sm_XY` first (no JIT; loads on drivers
/// older than NVRTC within the same major version), then PTX for `compute_XY`, then PTX for
/// `compute_80` (for a GPU newer than this NVRTC knows; the driver JIT-compiles it).
fn load_module(
    ctx: &Arc<CudaContext>,
    cc: (i32, i32),
) -> Result<(Arc<CudaModule>, Target), GpuError> {
    let mut attempts = vec![(cc, Target::Cubin), (cc, Target::Ptx)];
    if cc > (8, 0) {
        attempts.push(((8, 0), Target::Ptx));
    }
    let mut failures = Vec::new();
    for (arch, target) in attempts {
        let what = format!("{target:?} for {}.{}", arch.0, arch.1);
        match compile_cached(arch, target) {
            Ok(image) => match ctx.load_module(image.into_ptx()) {
                Ok(m) => {
                    if !failures.is_empty() {
                        tracing::warn!(failed = %failures.join("; "), loaded = %what, "gpu head kernels: fell back");
                    }
                    return Ok((m, target));
                }
                Err(e) => failures.push(format!("{what}: load: {e}")),
            },
            Err(e) => failures.push(format!("{what}: {e}")),
        }
    }
    Err(GpuError::Load(failures.join("; ")))
}

impl GpuHead {
    /// Builds the head on device `ordinal` with a new stream: checks the configuration, finds the
    /// driver and NVRTC, compiles the kernels for the device's architecture, uploads
    /// `w = (t_a − t_n)/τ` (from `text` = `[t_n; t_a]`, 2 × dim) and the Gaussian taps, and
    /// allocates every buffer. `out_h × out_w` is the frame size the map is resized to
    /// (use `cfg.size` twice to keep the model's size).
    pub fn new(
        ordinal: usize,
        text: &[f32],
        cfg: &HeadConfig,
        out_h: usize,
        out_w: usize,
    ) -> Result<Self, GpuError> {
        validate(text, cfg, out_h, out_w)?;
        if !sys::driver_library_present() {
            return Err(GpuError::DriverMissing);
        }
        sys::nvrtc_library()?;
        let count = sys::device_count()?;
        if ordinal >= count {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        Self::new_on_stream(stream, text, cfg, out_h, out_w)
    }

    /// As [`GpuHead::new`], on an existing stream (e.g. the one ONNX Runtime computes on), so
    /// that its outputs and the head are ordered without extra synchronisation.
    pub fn new_on_stream(
        stream: Arc<CudaStream>,
        text: &[f32],
        cfg: &HeadConfig,
        out_h: usize,
        out_w: usize,
    ) -> Result<Self, GpuError> {
        let taps_host = validate(text, cfg, out_h, out_w)?;
        sys::nvrtc_library()?;
        let ctx = stream.context().clone();
        let compute_capability = ctx.compute_capability()?;
        let device_name = ctx.name()?;
        let (module, target) = load_module(&ctx, compute_capability)?;
        let kernels = Kernels::load(&module)?;
        let w_host = text_direction(text, cfg.dim, cfg.tau);
        let (size2, n, out_n) = (cfg.size * cfg.size, cfg.grid * cfg.grid, out_h * out_w);
        let resize = (out_h, out_w) != (cfg.size, cfg.size);

        let alloc = || -> Result<_, GpuError> {
            let w = stream.clone_htod(&w_host)?;
            let taps = stream.clone_htod(&taps_host)?;
            let inputs = Inputs {
                global: stream.alloc_zeros(cfg.dim)?,
                tokens: stream.alloc_zeros(n * cfg.dim)?,
                layers: 1,
            };
            let work = Work {
                patch: stream.alloc_zeros(n)?,
                map_raw: stream.alloc_zeros(size2)?,
                tmp: stream.alloc_zeros(size2)?,
                map: stream.alloc_zeros(size2)?,
                out: if resize {
                    Some(stream.alloc_zeros(out_n)?)
                } else {
                    None
                },
                q: stream.alloc_zeros(out_n)?,
                mask: stream.alloc_zeros(out_n)?,
                scalars: stream.alloc_zeros(4)?,
            };
            Ok((w, taps, inputs, work))
        };
        let (w, taps, inputs, work) = sys::without_event_tracking(&ctx, alloc)?;
        stream.synchronize()?;
        tracing::info!(
            device = %device_name,
            sm = format!("{}.{}", compute_capability.0, compute_capability.1),
            kernels = ?target,
            size = cfg.size,
            grid = cfg.grid,
            dim = cfg.dim,
            out = format!("{out_h}x{out_w}"),
            "gpu head ready"
        );
        Ok(Self {
            ctx,
            stream,
            _module: module,
            kernels,
            cfg: *cfg,
            out_h,
            out_w,
            threshold: DEFAULT_THRESHOLD,
            radius: taps_host.len() / 2,
            target,
            device_name,
            compute_capability,
            w,
            taps,
            inputs,
            work,
        })
    }

    /// Sets the pixel threshold for `above`/`area` and the mask (a pixel counts when
    /// `value >= threshold`). [`AnomalyHead::run_frame`] sets it to the caller's threshold.
    pub fn set_threshold(&mut self, threshold: f32) {
        self.threshold = threshold;
    }

    /// The pixel threshold in use.
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// The head configuration.
    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }

    /// Frame size (out_h, out_w) of the final map.
    pub fn out_size(&self) -> (usize, usize) {
        (self.out_h, self.out_w)
    }

    /// The stream every launch of this head goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context (device) of this head.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Device name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// Compute capability of the device.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Whether the loaded kernels came from a CUBIN or from PTX (JIT-compiled by the driver).
    pub fn target(&self) -> Target {
        self.target
    }

    fn check_inputs(
        &self,
        global: usize,
        locals: impl ExactSizeIterator<Item = usize>,
    ) -> Result<(), GpuError> {
        let (dim, n) = (self.cfg.dim, self.cfg.grid * self.cfg.grid);
        if global != dim {
            return Err(GpuError::Input(format!(
                "global feature holds {global} floats, expected {dim}"
            )));
        }
        let layers = locals.len();
        if layers == 0 || layers > MAX_LAYERS {
            return Err(GpuError::Input(format!(
                "{layers} local feature layers given, 1..={MAX_LAYERS} supported"
            )));
        }
        for (l, len) in locals.enumerate() {
            if len != n * dim {
                return Err(GpuError::Input(format!(
                    "local features of layer {l} hold {len} floats, expected {n} x {dim}"
                )));
            }
        }
        Ok(())
    }

    /// Runs the head on features in host memory: `global` is `[dim]`, each entry of `locals` one
    /// layer's `[grid², dim]` local features (1..=[`MAX_LAYERS`]). Copies them to the device, runs
    /// the frame, waits for it. The maps stay on the device.
    pub fn run_host(
        &mut self,
        global: &[f32],
        locals: &[&[f32]],
    ) -> Result<GpuHeadOutput, GpuError> {
        self.check_inputs(global.len(), locals.iter().map(|l| l.len()))?;
        let per = self.cfg.grid * self.cfg.grid * self.cfg.dim;
        if locals.len() > self.inputs.layers {
            let stream = self.stream.clone();
            self.inputs.tokens = sys::without_event_tracking(&self.ctx, || {
                stream.alloc_zeros::<f32>(locals.len() * per)
            })?;
            self.inputs.layers = locals.len();
        }
        self.stream.memcpy_htod(global, &mut self.inputs.global)?;
        for (l, x) in locals.iter().enumerate() {
            let mut dst = self.inputs.tokens.slice_mut(l * per..(l + 1) * per);
            self.stream.memcpy_htod(*x, &mut dst)?;
        }
        let g = self.inputs.global.as_view();
        let views: Vec<CudaView<'_, f32>> = (0..locals.len())
            .map(|l| self.inputs.tokens.slice(l * per..(l + 1) * per))
            .collect();
        frame(
            &Frame {
                kernels: &self.kernels,
                stream: &self.stream,
                cfg: &self.cfg,
                out_h: self.out_h,
                out_w: self.out_w,
                threshold: self.threshold,
                radius: self.radius,
                w: &self.w,
                taps: &self.taps,
            },
            &mut self.work,
            &g,
            &views,
        )?;
        self.finish()
    }

    /// Runs the head on features already on this head's device (e.g. ONNX Runtime outputs bound to
    /// device memory): same shapes as [`GpuHead::run_host`], no host copy of the features. The
    /// producer must have finished writing them or run on [`GpuHead::stream`] (module docs).
    pub fn run_device(
        &mut self,
        global: &CudaView<'_, f32>,
        locals: &[CudaView<'_, f32>],
    ) -> Result<GpuHeadOutput, GpuError> {
        self.check_inputs(global.len(), locals.iter().map(|l| l.len()))?;
        frame(
            &Frame {
                kernels: &self.kernels,
                stream: &self.stream,
                cfg: &self.cfg,
                out_h: self.out_h,
                out_w: self.out_w,
                threshold: self.threshold,
                radius: self.radius,
                w: &self.w,
                taps: &self.taps,
            },
            &mut self.work,
            global,
            locals,
        )?;
        self.finish()
    }

    /// The engine's device buffers of one image, borrowed (never freed by the head).
    fn borrow_image(
        &self,
        image: &DeviceImage<'_>,
    ) -> Result<(sys::Borrowed, Vec<sys::Borrowed>), GpuError> {
        let (global, locals) = image.pointers()?;
        // SAFETY: a `DeviceImage` is only built inside the callback of
        // `Engine::infer_on_device` (the scorer builds it there and drops it before returning),
        // whose contract is that the engine hands over complete `[B, D]` and `[B, N, D]` f32
        // buffers (ONNX Runtime synchronises its stream before the callback) on its device's
        // primary context, unchanged and alive until the callback returns, which is after these
        // borrows end. The head runs on that device's primary context: `Scorer::open` builds it
        // on `EngineOptions::device_id`. `pointers` checked that each range lies inside its
        // buffer.
        let borrowed = unsafe {
            (
                sys::Borrowed::new(&self.stream, global.0, global.1),
                locals
                    .iter()
                    .map(|&(p, n)| sys::Borrowed::new(&self.stream, p, n))
                    .collect(),
            )
        };
        Ok(borrowed)
    }

    /// [`GpuHead::run_device`] on the engine's outputs for one image, without a host copy.
    fn run_device_image(&mut self, image: &DeviceImage<'_>) -> Result<GpuHeadOutput, GpuError> {
        let (global, locals) = self.borrow_image(image)?;
        let views: Vec<CudaView<'_, f32>> = locals.iter().map(sys::Borrowed::view).collect();
        self.run_device(&global.view(), &views)
    }

    /// The first non-finite feature of one image in device memory (copied to the host; only
    /// called for a frame whose score or map is not finite).
    fn find_non_finite_on_device(
        &self,
        image: &DeviceImage<'_>,
    ) -> Result<Option<NonFinite>, GpuError> {
        let (global, locals) = self.borrow_image(image)?;
        let global = self.stream.clone_dtoh(&global.view())?;
        let locals = locals
            .iter()
            .map(|l| self.stream.clone_dtoh(&l.view()))
            .collect::<Result<Vec<Vec<f32>>, _>>()?;
        let refs: Vec<&[f32]> = locals.iter().map(Vec::as_slice).collect();
        Ok(find_non_finite(&global, &refs))
    }

    /// Copies the scalars back (this synchronises the stream) and decodes them.
    fn finish(&mut self) -> Result<GpuHeadOutput, GpuError> {
        let mut s = [0u32; 4];
        self.stream.memcpy_dtoh(&self.work.scalars, &mut s)?;
        self.ctx.check_err()?;
        let above = s[2] as usize;
        Ok(GpuHeadOutput {
            score: f32::from_bits(s[0]),
            map_max: key_to_f32(s[1]),
            above,
            area: crate::head::area(above, self.out_h * self.out_w),
            non_finite: s[3] as usize,
        })
    }

    /// Copies a stage of the last frame to the host (synchronises the stream).
    pub fn download_stage(&self, stage: Stage) -> Result<Vec<f32>, GpuError> {
        let buf = match stage {
            Stage::Patch => &self.work.patch,
            Stage::MapRaw => &self.work.map_raw,
            Stage::MapSmoothed => &self.work.map,
            Stage::Map => self.work.final_map(),
        };
        Ok(self.stream.clone_dtoh(buf)?)
    }

    /// The last frame's map at frame size (out_h × out_w, row-major) on the host.
    pub fn download_map(&self) -> Result<Vec<f32>, GpuError> {
        self.download_stage(Stage::Map)
    }

    /// Quantises the last frame's map on the device: `round(clamp(v,0,1)·255)` and the mask
    /// (`v >= threshold ? 255 : 0`). [`GpuHead::download_u8`]/[`GpuHead::download_mask`] call it.
    pub fn quantize(&mut self) -> Result<(), GpuError> {
        let n = self.out_h * self.out_w;
        let map = self.work.out.as_ref().unwrap_or(&self.work.map);
        self.kernels.quantize_mask(
            &self.stream,
            map,
            n,
            self.threshold,
            &mut self.work.q,
            &mut self.work.mask,
        )
    }

    /// The last frame's map as u8 (frame size), quantised on the device.
    pub fn download_u8(&mut self) -> Result<Vec<u8>, GpuError> {
        self.quantize()?;
        Ok(self.stream.clone_dtoh(&self.work.q)?)
    }

    /// The last frame's binary mask (255 at or above the threshold, else 0; frame size).
    pub fn download_mask(&mut self) -> Result<Vec<u8>, GpuError> {
        self.quantize()?;
        Ok(self.stream.clone_dtoh(&self.work.mask)?)
    }
}

impl AnomalyHead for GpuHead {
    fn device(&self) -> &'static str {
        "gpu"
    }

    fn reads_device_memory(&self) -> bool {
        true
    }

    /// Map maximum and `area` come from the `map_stats` kernel of the frame (not recomputed on
    /// the host); the map is then downloaded at frame size.
    fn run_frame(
        &mut self,
        input: HeadInput<'_>,
        pixel_threshold: f32,
    ) -> Result<HeadFrame, HeadError> {
        self.threshold = pixel_threshold;
        let out = match input {
            HeadInput::Host { global, locals } => self.run_host(global, locals)?,
            HeadInput::Device(image) => self.run_device_image(&image)?,
        };
        check_finite(out.score, out.non_finite, || match input {
            HeadInput::Host { global, locals } => Ok(find_non_finite(global, locals)),
            HeadInput::Device(image) => Ok(self.find_non_finite_on_device(&image)?),
        })?;
        Ok(HeadFrame {
            score: out.score,
            map: self.download_map()?,
            height: self.out_h,
            width: self.out_w,
            stats: MapStats {
                max: out.map_max,
                above: out.above,
                area: out.area,
                non_finite: out.non_finite,
            },
        })
    }
}

/// Everything a frame reads besides its input and work buffers.
struct Frame<'a> {
    kernels: &'a Kernels,
    stream: &'a Arc<CudaStream>,
    cfg: &'a HeadConfig,
    out_h: usize,
    out_w: usize,
    threshold: f32,
    radius: usize,
    w: &'a CudaSlice<f32>,
    taps: &'a CudaSlice<f32>,
}

/// Enqueues one frame: zero the scalars, tokens → patch → map_raw → (Gaussian) map → (resize)
/// out → stats. Nothing here waits.
fn frame(
    f: &Frame<'_>,
    work: &mut Work,
    global: &CudaView<'_, f32>,
    locals: &[CudaView<'_, f32>],
) -> Result<(), GpuError> {
    let (size, grid) = (f.cfg.size, f.cfg.grid);
    f.stream.memset_zeros(&mut work.scalars)?;
    f.kernels.head_tokens(
        f.stream,
        global,
        locals,
        f.cfg.dim,
        f.w,
        &mut work.scalars,
        &mut work.patch,
    )?;
    f.kernels.bilinear_resize(
        f.stream,
        &work.patch,
        grid,
        grid,
        &mut work.map_raw,
        size,
        size,
    )?;
    f.kernels.gaussian(
        f.stream,
        &work.map_raw,
        &mut work.tmp,
        &mut work.map,
        size,
        size,
        f.taps,
        f.radius,
    )?;
    if let Some(out) = work.out.as_mut() {
        f.kernels
            .bilinear_resize(f.stream, &work.map, size, size, out, f.out_h, f.out_w)?;
    }
    let n = f.out_h * f.out_w;
    let final_map = work.out.as_ref().unwrap_or(&work.map);
    f.kernels
        .map_stats(f.stream, final_map, n, f.threshold, &mut work.scalars)?;
    Ok(())
}

/// Inverse of the kernel's order-preserving float key; key 0 (nothing seen) is `-inf`.
fn key_to_f32(key: u32) -> f32 {
    if key == 0 {
        f32::NEG_INFINITY
    } else if key & 0x8000_0000 != 0 {
        f32::from_bits(key & 0x7fff_ffff)
    } else {
        f32::from_bits(!key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(f: f32) -> u32 {
        let b = f.to_bits();
        if b & 0x8000_0000 != 0 {
            !b
        } else {
            b | 0x8000_0000
        }
    }

    #[test]
    fn gpu_head_can_move_to_a_worker_thread() {
        fn send<T: Send>() {}
        send::<GpuHead>();
    }

    #[test]
    fn float_key_round_trips_and_orders() {
        let vals = [
            -3.5f32,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            0.25,
            1.0,
            7.0,
            f32::INFINITY,
        ];
        for w in vals.windows(2) {
            assert!(key(w[0]) <= key(w[1]), "{} vs {}", w[0], w[1]);
        }
        for v in vals {
            assert_eq!(key_to_f32(key(v)).to_bits(), v.to_bits());
        }
        assert_eq!(key_to_f32(0), f32::NEG_INFINITY);
    }

    #[test]
    fn validation_rejects_bad_configs_without_a_gpu() {
        let cfg = HeadConfig {
            size: 112,
            grid: 8,
            dim: 4,
            tau: 0.07,
            sigma: 4.0,
        };
        let text = vec![0.0; 8];
        assert!(validate(&text, &cfg, 112, 112).is_ok());
        assert_eq!(validate(&text, &cfg, 112, 112).unwrap().len(), 33);
        assert!(validate(&text[..7], &cfg, 112, 112).is_err());
        assert!(validate(&text, &cfg, 0, 112).is_err());
        let big_sigma = HeadConfig { sigma: 60.0, ..cfg };
        assert!(validate(&text, &big_sigma, 112, 112).is_err());
        let no_blur = HeadConfig { sigma: 0.0, ..cfg };
        assert_eq!(validate(&text, &no_blur, 112, 112).unwrap(), vec![1.0]);
    }
}
