//! The inference core as one object: model package + encoder backend + anomaly head.
//!
//! Input: preprocessed images (`[B, 3, S, S]`), or image files (decoded and resized exactly as
//! the reference's Pillow path does), and per image a pixel threshold. Output: per image a
//! [`Scored`] result: the image score, the `S × S` anomaly map in the resized frame, its maximum
//! and `area` (share of pixels with `value >= pixel_threshold`). `score`, `eval` and the daemon
//! all go through this type, so every entry point computes the same numbers.
//! The head is one [`AnomalyHead`]: the CPU head ([`crate::head::CpuHead`], the reference) or the
//! CUDA head ([`crate::gpu::GpuHead`]) when asked for and a GPU is usable ([`HeadChoice`]); a GPU
//! that is absent falls back to the CPU head with one log line. A head that reads device memory
//! gets the engine's outputs there (IoBinding) when the engine runs on a GPU.
//! [`Scorer::score_files`] batches many files into one engine call (decoding and preprocessing
//! them in parallel).
//! Failure modes: those of the package, the engine and image decoding, as [`ScoreError`]. An
//! image whose features or head outputs hold NaN or infinity fails on its own
//! ([`ScoreError::NonFinite`]); the other images of the batch are still scored.

use std::path::Path;

use rayon::prelude::*;

use crate::engine::{self, DeviceFeatures, Engine, EngineError, EngineOptions};
use crate::gpu::DeviceImage;
use crate::head::{AnomalyHead, CpuHead, HeadConfig, HeadError, HeadFrame, HeadInput, NonFinite};
use crate::image_io::{self, DecodedImage};
use crate::package::{HashCheck, ModelPackage, PackageError};
use crate::preprocess::{PreprocessError, Preprocessor};
use crate::region::{self, RegionShape};

/// Frame geometries whose preprocessor is kept (regions of several sizes, cameras of several
/// resolutions).
const FRAME_PREPROCESSORS: usize = 32;
use crate::reference::{Bank, FewShot, Fingerprint, Reference, ReferenceError};

/// Errors of the inference core.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Image(#[from] image_io::ImageError),
    #[error("frame: {0}")]
    Frame(#[from] PreprocessError),
    #[error("anomaly head: {0}")]
    Head(HeadError),
    /// NaN or infinity in the engine's features or the head's outputs: this image has no result.
    #[error(transparent)]
    NonFinite(#[from] NonFinite),
    #[error("GPU anomaly head: {0}")]
    Gpu(String),
    /// An image that can not be formed (e.g. a region crop that does not fit its frame).
    #[error("input: {0}")]
    Input(String),
    /// The few-shot reference bank could not be applied to this image.
    #[error("reference: {0}")]
    Reference(#[from] crate::reference::ReferenceError),
}

impl From<HeadError> for ScoreError {
    /// A non-finite frame is lifted to [`ScoreError::NonFinite`]; other head errors stay
    /// [`ScoreError::Head`].
    fn from(e: HeadError) -> Self {
        match e {
            HeadError::NonFinite(n) => ScoreError::NonFinite(n),
            other => ScoreError::Head(other),
        }
    }
}

/// One scored image.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Image score in [0, 1] (`sigmoid(⟨ĝ, w⟩)`).
    pub score: f32,
    /// Final anomaly map, `size × size`, row-major, in the resized frame.
    pub map: Vec<f32>,
    /// Edge of `map`.
    pub size: usize,
    /// Largest value of `map`.
    pub map_max: f32,
    /// Share of `map` pixels with `value >= pixel_threshold` (the threshold the image was scored
    /// with), in [0, 1].
    pub area: f32,
    /// Set when a reference bank was applied: `score`, `map`, `map_max` and `area` are then the
    /// combined (zero-shot + few-shot) values, and this holds the zero-shot score.
    pub few_shot: Option<FewShot>,
}

impl Scored {
    fn from_frame(f: HeadFrame) -> Scored {
        Scored {
            score: f.score,
            size: f.width,
            map_max: f.stats.max,
            area: f.stats.area,
            map: f.map,
            few_shot: None,
        }
    }

    /// Adds the few-shot map of `reference` for the frame with local features `locals`
    /// ([`Reference::apply`]) and recomputes `map_max` and `area` at `pixel_threshold`.
    pub fn apply_reference(
        &mut self,
        reference: &mut Reference,
        locals: &[&[f32]],
        pixel_threshold: f32,
    ) -> Result<(), ScoreError> {
        let fs = reference.apply(locals, &mut self.map, &mut self.score)?;
        let stats = crate::head::map_stats(&self.map, pixel_threshold);
        self.map_max = stats.max;
        self.area = stats.area;
        self.few_shot = Some(fs);
        Ok(())
    }
}

/// Pixel threshold of [`Scorer::score_batch`], [`Scorer::score_file`] and
/// [`Scorer::score_files`] until [`Scorer::with_pixel_threshold`] sets another
/// (= `[camera] pixel_threshold`'s and `--pixel-threshold`'s default).
pub const DEFAULT_PIXEL_THRESHOLD: f32 = 0.5;

/// Where the anomaly head runs (defined with the engine's config).
pub use crate::engine::HeadChoice;

/// The head's shape and constants for a package (σ = 4, the reference's Gaussian).
fn head_config(pkg: &ModelPackage) -> HeadConfig {
    let m = &pkg.manifest.model;
    HeadConfig {
        size: pkg.input_size(),
        grid: m.grid,
        dim: m.embed_dim,
        tau: m.tau,
        sigma: 4.0,
    }
}

/// The entries of `all` at `idx`, in that order.
fn pick<'a>(all: &[&'a [f32]], idx: &[usize]) -> Vec<&'a [f32]> {
    idx.iter().filter_map(|&i| all.get(i).copied()).collect()
}

/// Package + engine + head.
pub struct Scorer {
    pkg: ModelPackage,
    engine: Box<dyn Engine>,
    head: Box<dyn AnomalyHead>,
    /// Pixel threshold of the calls that take none.
    pixel_threshold: f32,
    /// CUDA device of the engine (`EngineOptions::device_id`), where a GPU head must run to read
    /// the engine's outputs in place.
    gpu_ordinal: usize,
    input: Vec<f32>,
    /// Frame preprocessors by `(width, height)`, most recently used first.
    frame_pre: Vec<((usize, usize), Preprocessor)>,
    /// Few-shot reference bank applied to every image (host features; see
    /// [`Scorer::set_reference`]).
    reference: Option<Reference>,
}

impl Scorer {
    /// Loads the package in `dir` and builds the engine.
    pub fn open(dir: &Path, hashes: HashCheck, opts: &EngineOptions) -> Result<Self, ScoreError> {
        let pkg = ModelPackage::load(dir, hashes)?;
        let engine = engine::create(&pkg, opts)?;
        let mut scorer = Self::new(pkg, engine)?;
        scorer.gpu_ordinal = usize::try_from(opts.device_id).unwrap_or(0);
        Ok(scorer)
    }

    /// Sets the pixel threshold of [`Scorer::score_batch`], [`Scorer::score_file`] and
    /// [`Scorer::score_files`] (default [`DEFAULT_PIXEL_THRESHOLD`]): a pixel counts toward
    /// [`Scored::area`] when `value >= pixel_threshold`.
    pub fn with_pixel_threshold(mut self, pixel_threshold: f32) -> Self {
        self.pixel_threshold = pixel_threshold;
        self
    }

    /// Moves the head to the GPU as `choice` says. `Auto` without a usable GPU keeps the CPU
    /// head and logs why; `Gpu` without one is an error.
    pub fn with_head(mut self, choice: HeadChoice) -> Result<Self, ScoreError> {
        if choice == HeadChoice::Cpu {
            return Ok(self);
        }
        let probe = crate::gpu::probe();
        if !probe.is_usable() {
            if choice == HeadChoice::Gpu {
                return Err(ScoreError::Gpu(format!(
                    "no usable GPU: {}",
                    probe.reason()
                )));
            }
            tracing::info!(reason = %probe.reason(), "anomaly head on the CPU (no usable GPU)");
            return Ok(self);
        }
        let size = self.size();
        let cfg = head_config(&self.pkg);
        match crate::gpu::GpuHead::new(self.gpu_ordinal, &self.pkg.text, &cfg, size, size) {
            Ok(h) => {
                tracing::info!(gpu = %h.device_name(), "anomaly head on the GPU");
                self.head = Box::new(h);
                Ok(self)
            }
            Err(e) if choice == HeadChoice::Auto => {
                tracing::warn!(error = %e, "GPU head unavailable; anomaly head on the CPU");
                Ok(self)
            }
            Err(e) => Err(ScoreError::Gpu(e.to_string())),
        }
    }

    /// Where the head runs: `cpu` or `gpu`.
    pub fn head_device(&self) -> &'static str {
        self.head.device()
    }

    /// Wraps an already built engine.
    pub fn new(pkg: ModelPackage, engine: Box<dyn Engine>) -> Result<Self, ScoreError> {
        let cfg = head_config(&pkg);
        let head: Box<dyn AnomalyHead> = Box::new(CpuHead::new(cfg, &pkg.text)?);
        Ok(Self {
            pkg,
            engine,
            head,
            pixel_threshold: DEFAULT_PIXEL_THRESHOLD,
            gpu_ordinal: 0,
            input: Vec::new(),
            frame_pre: Vec::new(),
            reference: None,
        })
    }

    /// Applies `reference` to every image scored from now on (`None`: zero-shot only). The
    /// caller checks the bank against the package first ([`crate::reference::Bank::check`]).
    /// With a bank the features are read on the host, also when the head runs on the GPU.
    pub fn set_reference(&mut self, reference: Option<Reference>) {
        self.reference = reference;
    }

    /// Removes the few-shot reference and returns it (frames are zero-shot again).
    pub fn take_reference(&mut self) -> Option<Reference> {
        self.reference.take()
    }

    /// Runs the encoder only: the features of `batch` prepared images (reference banks).
    pub fn encode(&mut self, input: &[f32], batch: usize) -> Result<engine::Features, ScoreError> {
        let feats = self.engine.infer(input, batch)?;
        if feats.batch != batch || feats.locals.len() != self.pkg.output_layers().len() {
            return Err(ScoreError::Engine(EngineError::Run(format!(
                "engine returned {} results and {} layers for a batch of {batch}",
                feats.batch,
                feats.locals.len()
            ))));
        }
        Ok(feats)
    }

    /// Builds a reference bank from `k` prepared images (`input` holds them back to back, as
    /// for [`Scorer::score_batch`]: files through [`Scorer::prepare_image`], live frames of a
    /// region through [`Scorer::prepare_frame`]) for the region keyed `region`
    /// ([`crate::reference::WHOLE_FRAME`] for the whole frame). The encoder runs in batches
    /// of at most 8.
    pub fn build_bank(
        &mut self,
        input: &[f32],
        k: usize,
        region: &str,
        max_bank_mb: u64,
    ) -> Result<Bank, ScoreError> {
        let n = 3 * self.size() * self.size();
        if k == 0 || input.len() != k * n {
            return Err(ReferenceError::Input(format!(
                "{} input floats for {k} reference images of 3x{s}x{s}",
                input.len(),
                s = self.size()
            ))
            .into());
        }
        let mut feats = Vec::with_capacity(k);
        for chunk in input.chunks(8 * n) {
            feats.push(self.encode(chunk, chunk.len() / n)?);
        }
        let idx = self.pkg.bank_output_indices();
        let images: Vec<Vec<&[f32]>> = feats
            .iter()
            .flat_map(|f| (0..f.batch).map(|i| pick(&f.locals(i), &idx)))
            .collect();
        let fp = Fingerprint::for_package(&self.pkg, region, k);
        Ok(Bank::build(
            fp,
            &images,
            max_bank_mb.saturating_mul(1 << 20),
        )?)
    }

    /// The package in use.
    pub fn package(&self) -> &ModelPackage {
        &self.pkg
    }

    /// The engine in use.
    pub fn engine(&self) -> &dyn Engine {
        self.engine.as_ref()
    }

    /// The engine in use, to run it alone (`bench` times the encoder without the head).
    pub fn engine_mut(&mut self) -> &mut dyn Engine {
        self.engine.as_mut()
    }

    /// Square input edge.
    pub fn size(&self) -> usize {
        self.pkg.input_size()
    }

    /// Converts a decoded file into the model input exactly as the reference does.
    pub fn prepare_image(&self, img: &DecodedImage, out: &mut [f32]) -> Result<(), ScoreError> {
        let i = &self.pkg.manifest.input;
        img.to_model_input(i.size, i.mean, i.std, out)?;
        Ok(())
    }

    /// Converts an RGB frame (rows possibly padded) into the model input.
    pub fn prepare_frame(
        &mut self,
        rgb: &[u8],
        width: usize,
        height: usize,
        stride: usize,
        out: &mut [f32],
    ) -> Result<(), ScoreError> {
        let geometry = (width, height);
        // One preprocessor per geometry (a camera with regions has one per region size),
        // the most recently used first; at most FRAME_PREPROCESSORS are kept.
        let pos = self.frame_pre.iter().position(|(g, _)| *g == geometry);
        let entry = match pos {
            Some(i) => self.frame_pre.remove(i),
            None => {
                let i = &self.pkg.manifest.input;
                (
                    geometry,
                    Preprocessor::new(width, height, i.size, i.mean, i.std)?,
                )
            }
        };
        self.frame_pre.insert(0, entry);
        self.frame_pre.truncate(FRAME_PREPROCESSORS);
        self.frame_pre[0].1.run(rgb, stride, out)?;
        Ok(())
    }

    /// Runs the encoder on `batch` prepared images and the head on each, at the scorer's pixel
    /// threshold. All or nothing: the first image that fails (e.g. [`ScoreError::NonFinite`])
    /// fails the call; [`Scorer::score_frames`] keeps the others.
    pub fn score_batch(&mut self, input: &[f32], batch: usize) -> Result<Vec<Scored>, ScoreError> {
        let thresholds = vec![self.pixel_threshold; batch];
        self.score_frames(input, &thresholds)?.into_iter().collect()
    }

    /// Runs the encoder on `pixel_thresholds.len()` prepared images (`input` holds them back to
    /// back) and the head on each, image `i` summarised at `pixel_thresholds[i]`.
    ///
    /// Returns one inner result per image, in order: an image whose features or head outputs
    /// hold NaN or infinity gets [`ScoreError::NonFinite`] and the others are still scored. The
    /// outer error is an engine failure, which concerns the whole batch.
    pub fn score_frames(
        &mut self,
        input: &[f32],
        pixel_thresholds: &[f32],
    ) -> Result<Vec<Result<Scored, ScoreError>>, ScoreError> {
        self.score_frames_inner(input, pixel_thresholds, None)
    }

    /// [`Scorer::score_frames`] with a reference bank per image: `references[i]` is applied
    /// to image `i` (`None`: zero-shot), instead of the scorer's own ([`Scorer::set_reference`]).
    /// For regions of one frame scored in one batch, each with its bank. `references` must hold
    /// one entry per image.
    pub fn score_frames_with_references(
        &mut self,
        input: &[f32],
        pixel_thresholds: &[f32],
        references: &mut [Option<&mut Reference>],
    ) -> Result<Vec<Result<Scored, ScoreError>>, ScoreError> {
        if references.len() != pixel_thresholds.len() {
            return Err(ReferenceError::Input(format!(
                "{} reference entries for a batch of {}",
                references.len(),
                pixel_thresholds.len()
            ))
            .into());
        }
        self.score_frames_inner(input, pixel_thresholds, Some(references))
    }

    fn score_frames_inner(
        &mut self,
        input: &[f32],
        pixel_thresholds: &[f32],
        mut references: Option<&mut [Option<&mut Reference>]>,
    ) -> Result<Vec<Result<Scored, ScoreError>>, ScoreError> {
        let batch = pixel_thresholds.len();
        let mut results = Vec::with_capacity(batch);
        let head_layers = self.pkg.manifest.model.feature_layers.len();
        let bank_idx = self.pkg.bank_output_indices();
        let any_bank = match &references {
            Some(r) => r.iter().any(Option::is_some),
            None => self.reference.is_some(),
        };
        if self.head.reads_device_memory() && !any_bank {
            // GPU encoder + GPU head: features stay in device memory (IoBinding).
            let head = &mut self.head;
            let mut consume = |d: &DeviceFeatures| -> Result<(), String> {
                if d.batch != batch {
                    return Err(format!(
                        "engine returned {} results for a batch of {batch}",
                        d.batch
                    ));
                }
                // The head reads its own layers only (extra few-shot outputs come after them).
                let mut d = d.clone();
                d.locals.truncate(head_layers);
                let d = &d;
                for (i, &thr) in pixel_thresholds.iter().enumerate() {
                    let frame = head.run_frame(HeadInput::Device(DeviceImage::new(d, i)), thr);
                    results.push(frame.map(Scored::from_frame).map_err(ScoreError::from));
                }
                Ok(())
            };
            if let Some(res) = self.engine.infer_on_device(input, batch, &mut consume) {
                res?;
                return Ok(results);
            }
        }
        let feats = self.engine.infer(input, batch)?;
        if feats.batch != batch {
            return Err(ScoreError::Engine(EngineError::Run(format!(
                "engine returned {} results for a batch of {batch}",
                feats.batch
            ))));
        }
        for (i, &thr) in pixel_thresholds.iter().enumerate() {
            let all = feats.locals(i);
            let locals = &all[..head_layers.min(all.len())];
            let input = HeadInput::Host {
                global: feats.global(i),
                locals,
            };
            let frame = self.head.run_frame(input, thr);
            let mut scored = frame.map(Scored::from_frame).map_err(ScoreError::from);
            let reference = match references.as_deref_mut() {
                Some(refs) => refs.get_mut(i).and_then(|r| r.as_deref_mut()),
                None => self.reference.as_mut(),
            };
            if let (Ok(s), Some(r)) = (&mut scored, reference)
                && let Err(e) = s.apply_reference(r, &pick(&all, &bank_idx), thr)
            {
                scored = Err(e);
            }
            results.push(scored);
        }
        Ok(results)
    }

    /// Crops region `shape` from an RGB image (rows of `stride` bytes) and resizes it into the
    /// model input `out` (`3 × size × size`), as the daemon does; returns the crop's rectangle.
    /// Used for region banks (`reference --config`) and by [`Scorer::score_region`].
    pub fn prepare_region(
        &mut self,
        rgb: &[u8],
        width: u32,
        height: u32,
        stride: usize,
        shape: &RegionShape,
        out: &mut [f32],
    ) -> Result<region::PixelRect, ScoreError> {
        let r = shape
            .pixel_rect(width, height)
            .map_err(|e| ScoreError::Input(e.to_string()))?;
        let offset = r.y as usize * stride + r.x as usize * 3;
        let data = rgb.get(offset..).ok_or_else(|| {
            ScoreError::Input(format!(
                "region {r:?} starts outside the {width}x{height} image"
            ))
        })?;
        self.prepare_frame(data, r.w as usize, r.h as usize, stride, out)?;
        Ok(r)
    }

    /// Scores one region of an RGB image (rows of `stride` bytes) as the daemon does: crops
    /// the region's rectangle from the full-resolution image, resizes it to the model input,
    /// scores it at `pixel_threshold`, then leaves the ignore polygons out of the map (set to
    /// 0), `map_max` and `area`. Returns the scored crop (map, `map_max` and `area` already
    /// masked). Used by `calibrate` and `reference`; the daemon batches the same steps.
    pub fn score_region(
        &mut self,
        rgb: &[u8],
        width: u32,
        height: u32,
        stride: usize,
        shape: &RegionShape,
        pixel_threshold: f32,
    ) -> Result<Scored, ScoreError> {
        let s = self.size();
        let mut input = vec![0.0; 3 * s * s];
        let r = self.prepare_region(rgb, width, height, stride, shape, &mut input)?;
        let mut scored = self
            .score_frames(&input, &[pixel_threshold])?
            .pop()
            .ok_or_else(|| ScoreError::Input("the engine returned no result".into()))??;
        if let Some(ignore) = region::ignore_mask(shape, r, width, height, scored.size) {
            let (max, area) = region::mask_map(&mut scored.map, &ignore, pixel_threshold);
            scored.map_max = max;
            scored.area = area;
        }
        Ok(scored)
    }

    /// Decodes and prepares `paths` in parallel, then scores every readable one with a single
    /// engine call (the head runs per image, so results do not depend on the grouping).
    ///
    /// Returns one inner result per path, in order: a file that cannot be read or decoded, or
    /// whose features or head outputs hold NaN or infinity, gets its own error and the others are
    /// still scored. The outer error is an engine failure, which concerns the whole call.
    pub fn score_files(
        &mut self,
        paths: &[&Path],
    ) -> Result<Vec<Result<Scored, ScoreError>>, ScoreError> {
        let i = &self.pkg.manifest.input;
        let (size, mean, std) = (i.size, i.mean, i.std);
        let n = 3 * size * size;
        let mut input = std::mem::take(&mut self.input);
        input.clear();
        input.resize(paths.len() * n, 0.0);
        let prepared: Vec<Result<(), ScoreError>> = input
            .par_chunks_mut(n.max(1))
            .zip(paths.par_iter())
            .map(|(out, path)| {
                let img = image_io::load_image(path)?;
                img.to_model_input(size, mean, std, out)?;
                Ok(())
            })
            .collect();
        // Close the gaps left by unreadable files: the readable ones go back to back.
        let mut ok = 0;
        for (k, r) in prepared.iter().enumerate() {
            if r.is_ok() {
                if k != ok {
                    input.copy_within(k * n..(k + 1) * n, ok * n);
                }
                ok += 1;
            }
        }
        let scored = if ok == 0 {
            Ok(Vec::new())
        } else {
            let thresholds = vec![self.pixel_threshold; ok];
            self.score_frames(&input[..ok * n], &thresholds)
        };
        self.input = input;
        let mut scored = scored?.into_iter();
        let mut out = Vec::with_capacity(paths.len());
        for r in prepared {
            out.push(match r {
                Ok(()) => scored.next().unwrap_or_else(|| {
                    Err(ScoreError::Engine(EngineError::Run(
                        "engine returned too few results".into(),
                    )))
                }),
                Err(e) => Err(e),
            });
        }
        Ok(out)
    }

    /// Decodes, prepares and scores one image file.
    pub fn score_file(&mut self, path: &Path) -> Result<(DecodedImage, Scored), ScoreError> {
        let img = image_io::load_image(path)?;
        let s = self.size();
        let mut input = std::mem::take(&mut self.input);
        input.resize(3 * s * s, 0.0);
        let res = self
            .prepare_image(&img, &mut input)
            .and_then(|()| self.score_batch(&input, 1));
        self.input = input;
        let mut scored = res?;
        let one = scored.pop().ok_or_else(|| {
            ScoreError::Engine(EngineError::Run("engine returned no result".into()))
        })?;
        Ok((img, one))
    }
}
