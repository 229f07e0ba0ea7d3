//! The inference core as one object: model package + encoder backend + CPU anomaly head.
//!
//! Input: preprocessed images (`[B, 3, S, S]`), or image files (decoded and resized exactly as
//! the reference's Pillow path does). Output: per image a [`Scored`] result: the image score and
//! the `S × S` anomaly map in the resized frame. `score`, `eval` and the daemon all go through
//! this type, so every entry point computes the same numbers.
//! The head runs on the CPU ([`crate::head::CpuHead`], the reference) or as CUDA kernels
//! ([`crate::gpu::GpuHead`]) when asked for and a GPU is usable ([`HeadChoice`]); a GPU that is
//! absent falls back to the CPU head with one log line.
//! [`Scorer::score_files`] batches many files into one engine call (decoding and preprocessing
//! them in parallel).
//! Failure modes: those of the package, the engine and image decoding, as [`ScoreError`].

use std::path::Path;

use rayon::prelude::*;

use crate::engine::{self, DeviceFeatures, Engine, EngineError, EngineOptions};
use crate::head::{CpuHead, HeadConfig, HeadError, HeadOutput};
use crate::image_io::{self, DecodedImage};
use crate::package::{HashCheck, ModelPackage, PackageError};
use crate::preprocess::{PreprocessError, Preprocessor};

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
    Head(#[from] HeadError),
    #[error("GPU anomaly head: {0}")]
    Gpu(String),
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
}

/// Where the anomaly head runs (defined with the engine's config).
pub use crate::engine::HeadChoice;

enum Head {
    Cpu(Box<CpuHead>),
    Gpu(Box<crate::gpu::GpuHead>),
}

/// Package + engine + head.
pub struct Scorer {
    pkg: ModelPackage,
    engine: Box<dyn Engine>,
    head: Head,
    out: HeadOutput,
    input: Vec<f32>,
    /// Frame preprocessor for the last frame geometry `(width, height)`.
    frame_pre: Option<((usize, usize), Preprocessor)>,
}

impl Scorer {
    /// Loads the package in `dir` and builds the engine.
    pub fn open(dir: &Path, hashes: HashCheck, opts: &EngineOptions) -> Result<Self, ScoreError> {
        let pkg = ModelPackage::load(dir, hashes)?;
        let engine = engine::create(&pkg, opts)?;
        Self::new(pkg, engine)
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
        let cfg = self.head_config();
        match crate::gpu::GpuHead::new(0, &self.pkg.text, &cfg, size, size) {
            Ok(h) => {
                tracing::info!(gpu = %h.device_name(), "anomaly head on the GPU");
                self.head = Head::Gpu(Box::new(h));
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
        match self.head {
            Head::Cpu(_) => "cpu",
            Head::Gpu(_) => "gpu",
        }
    }

    fn head_config(&self) -> HeadConfig {
        let m = &self.pkg.manifest.model;
        HeadConfig {
            size: self.pkg.input_size(),
            grid: m.grid,
            dim: m.embed_dim,
            tau: m.tau,
            sigma: 4.0,
        }
    }

    /// Wraps an already built engine.
    pub fn new(pkg: ModelPackage, engine: Box<dyn Engine>) -> Result<Self, ScoreError> {
        let m = &pkg.manifest.model;
        let cfg = HeadConfig {
            size: pkg.input_size(),
            grid: m.grid,
            dim: m.embed_dim,
            tau: m.tau,
            sigma: 4.0,
        };
        let head = Head::Cpu(Box::new(CpuHead::new(cfg, &pkg.text)?));
        Ok(Self {
            pkg,
            engine,
            head,
            out: HeadOutput::new(&cfg),
            input: Vec::new(),
            frame_pre: None,
        })
    }

    /// The package in use.
    pub fn package(&self) -> &ModelPackage {
        &self.pkg
    }

    /// The engine in use.
    pub fn engine(&self) -> &dyn Engine {
        self.engine.as_ref()
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
        let pre = match &mut self.frame_pre {
            Some((g, p)) if *g == geometry => p,
            slot => {
                let i = &self.pkg.manifest.input;
                let p = Preprocessor::new(width, height, i.size, i.mean, i.std)?;
                &mut slot.insert((geometry, p)).1
            }
        };
        pre.run(rgb, stride, out)?;
        Ok(())
    }

    /// Runs the encoder on `batch` prepared images and the head on each.
    pub fn score_batch(&mut self, input: &[f32], batch: usize) -> Result<Vec<Scored>, ScoreError> {
        if let Head::Gpu(h) = &mut self.head {
            // GPU encoder + GPU head: features stay in device memory (IoBinding).
            let size = self.pkg.input_size();
            let mut results = Vec::with_capacity(batch);
            let mut consume = |d: &DeviceFeatures| -> Result<(), String> {
                let f32s = std::mem::size_of::<f32>() as u64;
                let per_local = (d.tokens * d.dim) as u64;
                for i in 0..d.batch as u64 {
                    let global = (d.global.0 + i * d.dim as u64 * f32s, d.dim);
                    let locals: Vec<(u64, usize)> = d
                        .locals
                        .iter()
                        .map(|l| (l.0 + i * per_local * f32s, per_local as usize))
                        .collect();
                    // SAFETY: the engine hands over complete device buffers of `[B, D]` and
                    // `[B, N, D]` f32 on the primary context of its device, alive for this
                    // callback; the offsets stay inside them.
                    let out =
                        unsafe { h.run_device_raw(global, &locals) }.map_err(|e| e.to_string())?;
                    let map = h.download_map().map_err(|e| e.to_string())?;
                    results.push(Scored {
                        score: out.score,
                        map,
                        size,
                    });
                }
                Ok(())
            };
            if let Some(res) = self.engine.infer_on_device(input, batch, &mut consume) {
                res?;
                return Ok(results);
            }
        }
        let feats = self.engine.infer(input, batch)?;
        let size = self.size();
        let mut results = Vec::with_capacity(batch);
        for i in 0..batch {
            let locals = feats.locals(i);
            let scored = match &mut self.head {
                Head::Cpu(h) => {
                    h.run(feats.global(i), &locals, &mut self.out)?;
                    Scored {
                        score: self.out.score,
                        map: self.out.map.clone(),
                        size,
                    }
                }
                Head::Gpu(h) => {
                    let out = h
                        .run_host(feats.global(i), &locals)
                        .map_err(|e| ScoreError::Gpu(e.to_string()))?;
                    let map = h
                        .download_map()
                        .map_err(|e| ScoreError::Gpu(e.to_string()))?;
                    Scored {
                        score: out.score,
                        map,
                        size,
                    }
                }
            };
            results.push(scored);
        }
        Ok(results)
    }

    /// Decodes and prepares `paths` in parallel, then scores every readable one with a single
    /// engine call (the head runs per image, so results do not depend on the grouping).
    ///
    /// Returns one inner result per path, in order: a file that cannot be read or decoded gets
    /// its own error and the others are still scored. The outer error is an engine or head
    /// failure, which concerns the whole call.
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
            self.score_batch(&input[..ok * n], ok)
        };
        self.input = input;
        let mut scored = scored?.into_iter();
        let mut out = Vec::with_capacity(paths.len());
        for r in prepared {
            out.push(match r {
                Ok(()) => scored.next().ok_or_else(|| {
                    ScoreError::Engine(EngineError::Run("engine returned too few results".into()))
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
