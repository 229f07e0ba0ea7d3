//! [`GpuHead`]: the anomaly head on one CUDA device and stream. Buffers are allocated once in
//! [`GpuHead::new`] (the token staging buffer of [`GpuHead::run_host`] grows if more layers come);
//! a frame is a fixed sequence of launches ending in one small synchronising copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaModule, CudaSlice, CudaStream, CudaView};

use super::sys::{self, Kernels, MAX_LAYERS, MAX_SHARED_BYTES};
use super::{GpuError, Target, compile_kernels};
use crate::head::{GAUSSIAN_TRUNCATE, HeadConfig, gaussian_kernel, text_direction};

/// Pixel threshold used until [`GpuHead::set_threshold`] is called.
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// Scalar results of one frame (the maps stay on the device; see [`GpuHead::download_map`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuHeadOutput {
    /// Image anomaly score `sigmoid(⟨ĝ, w⟩)` in [0, 1].
    pub score: f32,
    /// Maximum of the frame-size map (`-inf` if every value is NaN).
    pub map_max: f32,
    /// Pixels of the frame-size map strictly above the threshold.
    pub above: usize,
    /// `above / (out_h · out_w)`.
    pub area: f32,
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
    /// [score bits, max key, count, unused].
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

    /// Sets the pixel threshold for `above`/`area` and the mask (values strictly above count).
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

    /// [`GpuHead::run_device`] on features in device memory that someone else owns (ONNX
    /// Runtime's IoBinding outputs): `(device pointer, number of f32)` for the global feature and
    /// each layer's local features of one image. Nothing is copied to the host and the memory is
    /// not freed.
    ///
    /// # Safety
    /// Every pointer must address at least its length of `f32` in device memory of this head's
    /// CUDA context (the device's primary context, which ONNX Runtime's CUDA and TensorRT
    /// execution providers use), written completely before the call and not changed or freed
    /// until it returns.
    pub unsafe fn run_device_raw(
        &mut self,
        global: (u64, usize),
        locals: &[(u64, usize)],
    ) -> Result<GpuHeadOutput, GpuError> {
        let stream = self.stream.clone();
        // SAFETY: the caller guarantees each (pointer, length) is a live f32 allocation of this
        // context; the slices are leaked below so that dropping them never frees foreign memory.
        let g: CudaSlice<f32> = unsafe { stream.upgrade_device_ptr(global.0, global.1) };
        let ls: Vec<CudaSlice<f32>> = locals
            .iter()
            // SAFETY: as above.
            .map(|&(p, n)| unsafe { stream.upgrade_device_ptr(p, n) })
            .collect();
        let res = {
            let views: Vec<CudaView<'_, f32>> = ls.iter().map(|l| l.slice(..)).collect();
            self.run_device(&g.slice(..), &views)
        };
        g.leak();
        for l in ls {
            l.leak();
        }
        res
    }

    /// Copies the scalars back (this synchronises the stream) and decodes them.
    fn finish(&mut self) -> Result<GpuHeadOutput, GpuError> {
        let mut s = [0u32; 4];
        self.stream.memcpy_dtoh(&self.work.scalars, &mut s)?;
        self.ctx.check_err()?;
        let n = self.out_h * self.out_w;
        let above = s[2] as usize;
        Ok(GpuHeadOutput {
            score: f32::from_bits(s[0]),
            map_max: key_to_f32(s[1]),
            above,
            area: (above as f64 / n as f64) as f32,
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

    /// The last frame's map at frame size on the device, for consumers that stay on the GPU.
    pub fn map_view(&self) -> CudaView<'_, f32> {
        self.work.final_map().as_view()
    }

    /// Quantises the last frame's map on the device: `round(clamp(v,0,1)·255)` and the mask
    /// (`v > threshold ? 255 : 0`). [`GpuHead::download_u8`]/[`GpuHead::download_mask`] call it.
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

    /// The last frame's binary mask (255 above the threshold, else 0; frame size).
    pub fn download_mask(&mut self) -> Result<Vec<u8>, GpuError> {
        self.quantize()?;
        Ok(self.stream.clone_dtoh(&self.work.mask)?)
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
