//! Vision encoder backends: the [`Engine`] trait and its ONNX Runtime implementation.
//!
//! Input: a batch of preprocessed images `[B, 3, S, S]` (float32, CHW, normalised).
//! Output: [`Features`]: the global feature `[B, D]` and, per enabled layer, the patch features
//! `[B, N, D]`, exactly as the package's ONNX outputs them.
//! Backends are chosen at run time ([`Backend`]): TensorRT and CUDA through ONNX Runtime's
//! execution providers, CPU otherwise. `auto` tries TensorRT → CUDA → CPU and logs what it chose
//! and why. The ONNX Runtime shared library is loaded at run time (`ort` `load-dynamic`); a
//! missing or too-old library is an [`EngineError::Library`] naming every path tried.
//! Failure modes: library not found, model that ONNX Runtime rejects, an output missing or of the
//! wrong shape, a run-time error inside ONNX Runtime. None of them panics.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Deserialize;

use crate::package::ModelPackage;

/// Which inference backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// TensorRT, then CUDA, then CPU: the first that works.
    #[default]
    Auto,
    /// ONNX Runtime's TensorRT execution provider (FP16 by default).
    Tensorrt,
    /// ONNX Runtime's CUDA execution provider.
    Cuda,
    /// ONNX Runtime's CPU execution provider.
    Cpu,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Tensorrt => "tensorrt",
            Backend::Cuda => "cuda",
            Backend::Cpu => "cpu",
        })
    }
}

/// Options for building an engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub backend: Backend,
    /// Intra-op threads for the CPU backend; 0 = ONNX Runtime's default (all cores).
    pub threads: usize,
    /// Explicit path of `libonnxruntime.so`; otherwise `ORT_DYLIB_PATH`, then the defaults.
    pub ort_library: Option<PathBuf>,
    /// Where TensorRT engines and timing caches are kept (the state directory's `engines/`).
    pub cache_dir: Option<PathBuf>,
    /// TensorRT: build FP16 engines.
    pub fp16: bool,
    /// Largest batch the engine is built for (TensorRT profile).
    pub max_batch: usize,
    /// GPU ordinal.
    pub device_id: i32,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            backend: Backend::Cpu,
            threads: 0,
            ort_library: None,
            cache_dir: None,
            fp16: true,
            max_batch: 8,
            device_id: 0,
        }
    }
}

/// Errors of the inference backends.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "ONNX Runtime library not usable: {reason}; tried {tried}. Install it with scripts/setup (it unpacks libonnxruntime.so from the PyPI wheel onnxruntime==1.31.1 into .deps/onnxruntime/lib), or set ORT_DYLIB_PATH or engine.ort_library to its path"
    )]
    Library { reason: String, tried: String },
    #[error("backend {backend} unavailable: {reason}")]
    Unavailable { backend: Backend, reason: String },
    #[error("{path}: ONNX Runtime cannot load the model: {message}")]
    Model { path: PathBuf, message: String },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("model output {name}: expected {expected} values, got {got}")]
    Output {
        name: String,
        expected: usize,
        got: usize,
    },
    #[error("input has {got} values, expected {expected} for batch {batch} at {size}×{size}")]
    Input {
        got: usize,
        expected: usize,
        batch: usize,
        size: usize,
    },
}

/// What an engine is, for logs, stats and result payloads.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// The backend that actually runs (never `Auto`).
    pub backend: Backend,
    /// One line: why this backend was chosen, fallbacks included.
    pub detail: String,
    pub ort_version: String,
}

/// Encoder outputs for a batch.
#[derive(Debug, Clone, Default)]
pub struct Features {
    pub batch: usize,
    pub dim: usize,
    /// Patch tokens per image (grid²).
    pub tokens: usize,
    /// `[B, D]`.
    pub global: Vec<f32>,
    /// One `[B, N, D]` buffer per feature layer, in the package's `feature_layers` order.
    pub locals: Vec<Vec<f32>>,
}

impl Features {
    /// Global feature of image `i`.
    pub fn global(&self, i: usize) -> &[f32] {
        &self.global[i * self.dim..(i + 1) * self.dim]
    }

    /// Patch features of image `i` for every layer.
    pub fn locals(&self, i: usize) -> Vec<&[f32]> {
        let n = self.tokens * self.dim;
        self.locals.iter().map(|l| &l[i * n..(i + 1) * n]).collect()
    }
}

/// A vision encoder.
pub trait Engine: Send {
    /// What runs.
    fn info(&self) -> &EngineInfo;
    /// Runs a batch: `input` holds `batch` images `[3, S, S]` back to back.
    fn infer(&mut self, input: &[f32], batch: usize) -> Result<Features, EngineError>;
}

/// Default places to look for `libonnxruntime.so`, after the config and `ORT_DYLIB_PATH`.
pub fn default_library_paths() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from(
        "/usr/lib/anomalyclip-edge/onnxruntime/libonnxruntime.so",
    )];
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        v.push(dir.join("../lib/anomalyclip-edge/onnxruntime/libonnxruntime.so"));
    }
    v.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/onnxruntime/lib/libonnxruntime.so"));
    v
}

static ORT_INIT: OnceLock<Result<(String, ort::environment::Environment), (String, String)>> =
    OnceLock::new();

/// Loads the ONNX Runtime library once per process. Returns the library's path and the
/// process-wide environment.
pub fn init_runtime(
    explicit: Option<&Path>,
) -> Result<(String, ort::environment::Environment), EngineError> {
    let res = ORT_INIT.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = explicit {
            candidates.push(p.to_path_buf());
        } else if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
            candidates.push(PathBuf::from(p));
        } else {
            candidates.extend(default_library_paths());
        }
        let tried = candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let Some(found) = candidates.iter().find(|p| p.is_file()) else {
            return Err(("no such file".to_string(), tried));
        };
        if let Some(v) = version_from_path(found) {
            let _ = ORT_VERSION.set(v);
        }
        match ort::init_from(found) {
            Ok(builder) => match builder.with_name("anomalyclip-edge").build() {
                Ok(env) => {
                    tracing::info!(library = %found.display(), version = %ort_version(), "ONNX Runtime loaded");
                    Ok((found.display().to_string(), env))
                }
                Err(e) => Err((format!("environment: {e}"), tried)),
            },
            Err(e) => Err((e.to_string(), tried)),
        }
    });
    match res {
        Ok(v) => Ok(v.clone()),
        Err((reason, tried)) => Err(EngineError::Library {
            reason: reason.clone(),
            tried: tried.clone(),
        }),
    }
}

/// An ONNX Runtime session over a model package.
pub struct OrtEngine {
    session: ort::session::Session,
    info: EngineInfo,
    input_name: String,
    size: usize,
    dim: usize,
    tokens: usize,
    local_names: Vec<String>,
}

impl OrtEngine {
    /// Builds a session for `pkg` with the requested backend.
    pub fn new(pkg: &ModelPackage, opts: &EngineOptions) -> Result<Self, EngineError> {
        let (lib, env) = init_runtime(opts.ort_library.as_deref())?;
        let onnx = pkg.onnx_path();
        let order: &[Backend] = match opts.backend {
            Backend::Auto => &[Backend::Tensorrt, Backend::Cuda, Backend::Cpu],
            Backend::Tensorrt => &[Backend::Tensorrt],
            Backend::Cuda => &[Backend::Cuda],
            Backend::Cpu => &[Backend::Cpu],
        };
        let mut notes: Vec<String> = Vec::new();
        let mut last_err = None;
        for &backend in order {
            match build_session(&env, &onnx, backend, pkg, opts) {
                Ok(session) => {
                    let detail = if notes.is_empty() {
                        format!("{backend} (requested {})", opts.backend)
                    } else {
                        format!(
                            "{backend} (requested {}; {})",
                            opts.backend,
                            notes.join("; ")
                        )
                    };
                    tracing::info!(backend = %backend, %detail, library = %lib, "inference engine ready");
                    return Ok(Self {
                        session,
                        info: EngineInfo {
                            backend,
                            detail,
                            ort_version: ort_version(),
                        },
                        input_name: pkg.manifest.input.name.clone(),
                        size: pkg.input_size(),
                        dim: pkg.dim(),
                        tokens: pkg.grid() * pkg.grid(),
                        local_names: pkg.local_output_names(),
                    });
                }
                Err(e @ EngineError::Unavailable { .. }) => {
                    notes.push(format!("{e}"));
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(EngineError::Unavailable {
            backend: opts.backend,
            reason: "no backend could be built".into(),
        }))
    }
}

static ORT_VERSION: OnceLock<String> = OnceLock::new();

/// Version of the loaded ONNX Runtime library, from its file name (`libonnxruntime.so.1.31.1`,
/// symlinks resolved) or, failing that, its build string.
fn ort_version() -> String {
    ORT_VERSION.get().cloned().unwrap_or_else(|| {
        ort::info()
            .split(',')
            .find_map(|kv| kv.split("git-branch=").nth(1))
            .map(|b| b.trim_start_matches("rel-").to_string())
            .unwrap_or_else(|| "unknown".into())
    })
}

fn version_from_path(p: &Path) -> Option<String> {
    let real = std::fs::canonicalize(p).ok()?;
    let name = real.file_name()?.to_str()?;
    let v = name.split(".so.").nth(1)?;
    v.chars()
        .all(|c| c.is_ascii_digit() || c == '.')
        .then(|| v.to_string())
}

fn build_session(
    env: &ort::environment::Environment,
    onnx: &Path,
    backend: Backend,
    pkg: &ModelPackage,
    opts: &EngineOptions,
) -> Result<ort::session::Session, EngineError> {
    use ort::ep;
    let model_err = |e: ort::Error| EngineError::Model {
        path: onnx.to_path_buf(),
        message: e.to_string(),
    };
    let mut builder = ort::session::Session::builder(env).map_err(model_err)?;
    if opts.threads > 0 {
        builder = builder
            .with_intra_threads(opts.threads)
            .map_err(|e| model_err(e.into()))?;
    }
    let unavailable = |reason: String| EngineError::Unavailable { backend, reason };
    match backend {
        Backend::Cpu | Backend::Auto => {}
        Backend::Cuda => {
            let cuda = ep::CUDA::default().with_device_id(opts.device_id);
            if !matches!(
                <ep::CUDA as ep::ExecutionProvider>::is_available(),
                Ok(true)
            ) {
                return Err(unavailable(
                    "this ONNX Runtime library has no CUDA execution provider (CPU build; install the onnxruntime-gpu library)".into(),
                ));
            }
            builder = builder
                .with_execution_providers([cuda.build().error_on_failure()])
                .map_err(|e| unavailable(e.to_string()))?;
        }
        Backend::Tensorrt => {
            let mut trt = ep::TensorRT::default()
                .with_device_id(opts.device_id)
                .with_fp16(opts.fp16);
            if !matches!(
                <ep::TensorRT as ep::ExecutionProvider>::is_available(),
                Ok(true)
            ) {
                return Err(unavailable(
                    "this ONNX Runtime library has no TensorRT execution provider (CPU build; install the onnxruntime-gpu library and TensorRT 10)".into(),
                ));
            }
            if let Some(dir) = &opts.cache_dir {
                std::fs::create_dir_all(dir)
                    .map_err(|e| unavailable(format!("engine cache {}: {e}", dir.display())))?;
                let key = crate::engine::cache_prefix(pkg, opts);
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(dir.display().to_string())
                    .with_engine_cache_prefix(key)
                    .with_timing_cache(true)
                    .with_timing_cache_path(dir.display().to_string());
            }
            let s = pkg.input_size();
            let name = &pkg.manifest.input.name;
            trt = trt
                .with_profile_min_shapes(format!("{name}:1x3x{s}x{s}"))
                .with_profile_opt_shapes(format!("{name}:{}x3x{s}x{s}", opts.max_batch.max(1)))
                .with_profile_max_shapes(format!("{name}:{}x3x{s}x{s}", opts.max_batch.max(1)));
            builder = builder
                .with_execution_providers([trt.build().error_on_failure()])
                .map_err(|e| unavailable(e.to_string()))?;
        }
    }
    builder.commit_from_file(onnx).map_err(model_err)
}

/// Engine-cache prefix: a cached TensorRT engine is only reused for the same model file, ONNX
/// Runtime version, precision and batch profile (ONNX Runtime adds the GPU's compute capability
/// to its own file names).
pub fn cache_prefix(pkg: &ModelPackage, opts: &EngineOptions) -> String {
    let model = pkg.onnx_sha256().unwrap_or("nohash");
    format!(
        "ace_{}_ort{}_{}_b{}",
        &model[..model.len().min(16)],
        ort_version().replace('.', "_"),
        if opts.fp16 { "fp16" } else { "fp32" },
        opts.max_batch.max(1)
    )
}

impl Engine for OrtEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn infer(&mut self, input: &[f32], batch: usize) -> Result<Features, EngineError> {
        let s = self.size;
        let expected = batch * 3 * s * s;
        if input.len() != expected || batch == 0 {
            return Err(EngineError::Input {
                got: input.len(),
                expected,
                batch,
                size: s,
            });
        }
        let tensor = ort::value::TensorRef::from_array_view(([batch, 3, s, s], input))
            .map_err(|e| EngineError::Run(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => tensor])
            .map_err(|e| EngineError::Run(e.to_string()))?;
        let take = |name: &str, expected: usize| -> Result<Vec<f32>, EngineError> {
            let value = outputs.get(name).ok_or_else(|| EngineError::Output {
                name: name.to_string(),
                expected,
                got: 0,
            })?;
            let (_, data) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| EngineError::Run(format!("output {name}: {e}")))?;
            if data.len() != expected {
                return Err(EngineError::Output {
                    name: name.to_string(),
                    expected,
                    got: data.len(),
                });
            }
            Ok(data.to_vec())
        };
        let global = take("global", batch * self.dim)?;
        let mut locals = Vec::with_capacity(self.local_names.len());
        for name in &self.local_names {
            locals.push(take(name, batch * self.tokens * self.dim)?);
        }
        Ok(Features {
            batch,
            dim: self.dim,
            tokens: self.tokens,
            global,
            locals,
        })
    }
}

/// Builds the engine for a package.
pub fn create(pkg: &ModelPackage, opts: &EngineOptions) -> Result<Box<dyn Engine>, EngineError> {
    Ok(Box::new(OrtEngine::new(pkg, opts)?))
}
