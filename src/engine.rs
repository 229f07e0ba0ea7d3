//! Vision encoder backends: the [`Engine`] trait and its ONNX Runtime implementation.
//!
//! Input: a batch of preprocessed images `[B, 3, S, S]` (float32, CHW, normalised).
//! Output: [`Features`]: the global feature `[B, D]` and, per enabled layer, the patch features
//! `[B, N, D]`, exactly as the package's ONNX outputs them.
//! Backends are chosen at run time ([`Backend`]): TensorRT and CUDA through ONNX Runtime's
//! execution providers, CPU otherwise. `auto` tries TensorRT → CUDA → CPU and logs what it chose
//! and why. The ONNX Runtime shared library is loaded at run time (`ort` `load-dynamic`); a
//! missing or too-old library is an [`EngineError::Library`] naming every path tried.
//! [`Precision`] picks the package's model file per backend ([`model_for`]): fp32 everywhere,
//! int8 on the CPU only, fp16 on GPUs only (`model.fp16.onnx` on CUDA, an fp16 engine built from
//! `model.onnx` on TensorRT); a precision the package lacks is an [`EngineError::Package`], one the
//! backend cannot run an [`EngineError::Unavailable`] — never a silent change of precision.
//! Failure modes: library not found, model that ONNX Runtime rejects, an output missing or of the
//! wrong shape (checked against the manifest when the session is built), a run-time error inside
//! ONNX Runtime. None of them panics.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::package::ModelPackage;

pub mod config;

pub use config::{
    Backend, HeadChoice, MAX_THREADS, Precision, THREADS_PER_CPU, check_threads, max_threads,
};

/// Options for building an engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub backend: Backend,
    /// Intra-op threads for the CPU backend; 0 = ONNX Runtime's default (all cores). At most
    /// [`max_threads`] ([`check_threads`]; building the engine refuses more).
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
    /// Which model file of the package runs ([`model_for`]).
    pub precision: Precision,
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
            precision: Precision::Fp32,
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
    #[error("{path}: the model does not match manifest.toml: {message}")]
    Interface { path: PathBuf, message: String },
    #[error(transparent)]
    Package(#[from] crate::package::PackageError),
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
    /// The precision that runs (the one asked for: there is no fallback).
    pub precision: Precision,
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
    /// One `[B, N, D]` buffer per local output, in [`ModelPackage::output_layers`] order: the
    /// package's `feature_layers` (the head's), then any extra `few_shot_layers`.
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

/// Outputs of a batch left in CUDA device memory (owned by the engine; valid only during the
/// callback of [`Engine::infer_on_device`]): `(device pointer, number of f32)`.
#[derive(Debug, Clone)]
pub struct DeviceFeatures {
    pub batch: usize,
    pub dim: usize,
    pub tokens: usize,
    /// `[B, D]`.
    pub global: (u64, usize),
    /// One `[B, N, D]` buffer per feature layer.
    pub locals: Vec<(u64, usize)>,
}

/// A vision encoder.
pub trait Engine: Send {
    /// What runs.
    fn info(&self) -> &EngineInfo;
    /// Runs a batch: `input` holds `batch` images `[3, S, S]` back to back.
    fn infer(&mut self, input: &[f32], batch: usize) -> Result<Features, EngineError>;
    /// Runs a batch with the outputs bound to CUDA device memory and hands them to `consume`
    /// without a host round trip (the GPU head reads them there). `None` when this engine does
    /// not run on a GPU; the caller then uses [`Engine::infer`].
    fn infer_on_device(
        &mut self,
        _input: &[f32],
        _batch: usize,
        _consume: &mut dyn FnMut(&DeviceFeatures) -> Result<(), String>,
    ) -> Option<Result<(), EngineError>> {
        None
    }
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
            let reason = if candidates.iter().any(|p| p.exists()) {
                "not a regular file"
            } else {
                "no such file"
            };
            return Err((reason.to_string(), tried));
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

/// What a backend loads for a precision: the package's model file and, for TensorRT, whether
/// the engine is built in fp16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelChoice {
    /// The package file to load (its precision: [`Precision::model_file`]).
    pub file: Precision,
    /// TensorRT only: build an fp16 engine.
    pub trt_fp16: bool,
}

/// The model `backend` runs for `precision` (`trt_fp16`: `[engine] fp16`, TensorRT's own
/// switch, used for fp32), or why it cannot: int8 is a CPU model (ONNX Runtime's integer
/// kernels), fp16 a GPU one (a CPU has no fast fp16 matrix products). `Auto` is resolved by
/// the caller into concrete backends first.
pub fn model_for(
    precision: Precision,
    backend: Backend,
    trt_fp16: bool,
) -> Result<ModelChoice, String> {
    let choice = |file, trt_fp16| Ok(ModelChoice { file, trt_fp16 });
    match (precision, backend) {
        (Precision::Fp32, Backend::Tensorrt) => choice(Precision::Fp32, trt_fp16),
        (Precision::Fp32, _) => choice(Precision::Fp32, false),
        (Precision::Int8, Backend::Cpu) => choice(Precision::Int8, false),
        (Precision::Int8, b) => Err(format!(
            "precision int8 runs on the cpu backend only (model.int8.onnx uses ONNX Runtime's CPU integer kernels), not on {b}; use fp16 or fp32 on a GPU"
        )),
        (Precision::Fp16, Backend::Cuda) => choice(Precision::Fp16, false),
        // TensorRT builds its own fp16 engine from the fp32 graph (LayerNorm kept in fp32).
        (Precision::Fp16, Backend::Tensorrt) => choice(Precision::Fp32, true),
        (Precision::Fp16, b) => Err(format!(
            "precision fp16 needs a GPU backend (cuda or tensorrt), not {b}; use fp32 or int8 on the CPU"
        )),
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
    device_id: i32,
}

impl OrtEngine {
    /// Builds a session for `pkg` with the requested backend.
    pub fn new(pkg: &ModelPackage, opts: &EngineOptions) -> Result<Self, EngineError> {
        // The package must have the precision asked for, whatever the backend.
        pkg.model_path(opts.precision)?;
        let (lib, env) = init_runtime(opts.ort_library.as_deref())?;
        let order: &[Backend] = match opts.backend {
            Backend::Auto => &[Backend::Tensorrt, Backend::Cuda, Backend::Cpu],
            Backend::Tensorrt => &[Backend::Tensorrt],
            Backend::Cuda => &[Backend::Cuda],
            Backend::Cpu => &[Backend::Cpu],
        };
        let mut notes: Vec<String> = Vec::new();
        let mut last_err = None;
        for &backend in order {
            let choice = match model_for(opts.precision, backend, opts.fp16) {
                Ok(c) => c,
                Err(reason) => {
                    let e = EngineError::Unavailable { backend, reason };
                    notes.push(format!("{e}"));
                    last_err = Some(e);
                    continue;
                }
            };
            let onnx = pkg.model_path(choice.file)?;
            let mut opts = opts.clone();
            opts.fp16 = choice.trt_fp16;
            match build_session(&env, &onnx, backend, pkg, &opts) {
                Ok(session) => {
                    check_interface(&session, pkg, &onnx)?;
                    let detail = if notes.is_empty() {
                        format!("{backend} (requested {})", opts.backend)
                    } else {
                        format!(
                            "{backend} (requested {}; {})",
                            opts.backend,
                            notes.join("; ")
                        )
                    };
                    tracing::info!(backend = %backend, precision = %opts.precision, model = %onnx.display(), %detail, library = %lib, "inference engine ready");
                    return Ok(Self {
                        session,
                        info: EngineInfo {
                            backend,
                            detail,
                            precision: opts.precision,
                            ort_version: ort_version(),
                        },
                        input_name: pkg.manifest.input.name.clone(),
                        size: pkg.input_size(),
                        dim: pkg.dim(),
                        tokens: pkg.grid() * pkg.grid(),
                        local_names: pkg.local_output_names(),
                        device_id: opts.device_id,
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
    // Thousands of threads make ONNX Runtime crash (SIGSEGV) instead of failing.
    check_threads(opts.threads).map_err(|reason| EngineError::Unavailable {
        backend,
        reason: format!("threads {reason}"),
    })?;
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
            // TF32 off: fp32 results within the parity targets (TF32 matmuls drift by ~1e-3).
            let cuda = ep::CUDA::default()
                .with_device_id(opts.device_id)
                .with_tf32(false);
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
            if pkg.manifest.model.attention == crate::package::Attention::Fused {
                tracing::warn!(
                    model = %onnx.display(),
                    "this package was exported with --fused-attention: its MultiHeadAttention \
                     nodes run outside the TensorRT engine (on CUDA); export without \
                     --fused-attention for TensorRT"
                );
            }
            if !matches!(
                <ep::TensorRT as ep::ExecutionProvider>::is_available(),
                Ok(true)
            ) {
                return Err(unavailable(
                    "this ONNX Runtime library has no TensorRT execution provider (CPU build; install the onnxruntime-gpu library and TensorRT 10)".into(),
                ));
            }
            let Some(root) = &opts.cache_dir else {
                let trt = tensorrt_ep(pkg, opts, None);
                builder = builder
                    .with_execution_providers([trt.build().error_on_failure()])
                    .map_err(|e| unavailable(e.to_string()))?;
                return builder.commit_from_file(onnx).map_err(model_err);
            };
            return tensorrt_cached(env, onnx, pkg, opts, root);
        }
    }
    builder.commit_from_file(onnx).map_err(model_err)
}

/// Everything a built TensorRT engine depends on. Two runs share a cached engine only when all
/// of it is equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKeyParts {
    /// SHA-256 of model.onnx (from the manifest).
    pub model_sha256: String,
    pub ort_version: String,
    /// TensorRT library version (e.g. "10.9.0"), "unknown" when it cannot be read.
    pub trt_version: String,
    /// GPU name and compute capability.
    pub gpu: String,
    pub compute_capability: (i32, i32),
    pub fp16: bool,
    pub max_batch: usize,
    pub input_size: usize,
}

/// The engine cache folder name for `parts`: readable, file-system safe, and different whenever
/// any part differs.
pub fn cache_key(parts: &CacheKeyParts) -> String {
    let slug = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .trim_matches('-')
            .to_string()
    };

    format!(
        "{}-ort{}-trt{}-{}-sm{}{}-{}-b{}-s{}",
        &parts.model_sha256[..parts.model_sha256.len().min(16)],
        slug(&parts.ort_version),
        slug(&parts.trt_version),
        slug(&parts.gpu),
        parts.compute_capability.0,
        parts.compute_capability.1,
        if parts.fp16 { "fp16" } else { "fp32" },
        parts.max_batch,
        parts.input_size
    )
}

/// Checks the session's input and outputs against the manifest (names, float32, fixed dims; the
/// batch dimension may be dynamic), so that a model that does not belong to its manifest is
/// refused at load time with one message instead of failing on every frame.
fn check_interface(
    session: &ort::session::Session,
    pkg: &ModelPackage,
    onnx: &Path,
) -> Result<(), EngineError> {
    use ort::value::TensorElementType;
    let (s, d, n) = (pkg.input_size(), pkg.dim(), pkg.grid() * pkg.grid());
    let fail = |message: String| EngineError::Interface {
        path: onnx.to_path_buf(),
        message,
    };
    let fmt = |dims: &[i64]| {
        let v: Vec<String> = dims
            .iter()
            .map(|d| if *d < 0 { "?".into() } else { d.to_string() })
            .collect();
        format!("[{}]", v.join(", "))
    };
    let check = |kind: &str,
                 outlets: &[ort::value::Outlet],
                 name: &str,
                 want: &[usize]|
     -> Result<(), EngineError> {
        let names = || {
            outlets
                .iter()
                .map(|o| o.name().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let o = outlets.iter().find(|o| o.name() == name).ok_or_else(|| {
            fail(format!(
                "the model has no {kind} named {name:?} (its {kind}s: {})",
                names()
            ))
        })?;
        let want_str = format!(
            "float32 [batch, {}]",
            want.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let (Some(ty), Some(shape)) = (o.dtype().tensor_type(), o.dtype().tensor_shape()) else {
            return Err(fail(format!(
                "{kind} {name:?} is not a tensor, expected {want_str}"
            )));
        };
        let dims_ok = shape.len() == want.len() + 1
            && shape[1..]
                .iter()
                .zip(want)
                .all(|(&got, &w)| got < 0 || got as usize == w);
        if ty != TensorElementType::Float32 || !dims_ok {
            return Err(fail(format!(
                "{kind} {name:?} is {ty:?} {}, the manifest says {want_str}",
                fmt(shape)
            )));
        }
        Ok(())
    };
    check(
        "input",
        session.inputs(),
        &pkg.manifest.input.name,
        &[3, s, s],
    )?;
    check("output", session.outputs(), "global", &[d])?;
    for name in pkg.local_output_names() {
        check("output", session.outputs(), &name, &[n, d])?;
    }
    Ok(())
}

/// The cache key parts of this machine for `pkg` and `opts`.
pub fn cache_key_parts(pkg: &ModelPackage, opts: &EngineOptions) -> CacheKeyParts {
    let probe = crate::gpu::probe();
    let dev = probe
        .devices
        .iter()
        .find(|d| d.ordinal == opts.device_id.max(0) as usize);
    CacheKeyParts {
        model_sha256: pkg.onnx_sha256().unwrap_or("nohash").to_string(),
        ort_version: ort_version(),
        trt_version: tensorrt_version().unwrap_or_else(|| "unknown".into()),
        gpu: dev
            .map(|d| d.name.clone())
            .unwrap_or_else(|| "nogpu".into()),
        compute_capability: dev.map(|d| d.compute_capability).unwrap_or((0, 0)),
        // What TensorRT builds: precision fp16 forces an fp16 engine.
        fp16: model_for(opts.precision, Backend::Tensorrt, opts.fp16)
            .map_or(opts.fp16, |c| c.trt_fp16),
        max_batch: opts.max_batch.max(1),
        input_size: pkg.input_size(),
    }
}

/// Version of the TensorRT library the TensorRT execution provider will load, read with
/// `getInferLibVersion()` from `libnvinfer.so.10` (or `.so`).
pub fn tensorrt_version() -> Option<String> {
    for name in [c"libnvinfer.so.10", c"libnvinfer.so"] {
        // SAFETY: dlopen with a valid NUL-terminated name; the handle is closed below.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            continue;
        }
        // SAFETY: valid handle and NUL-terminated symbol name.
        let sym = unsafe { libc::dlsym(handle, c"getInferLibVersion".as_ptr()) };
        let v = if sym.is_null() {
            None
        } else {
            // SAFETY: TensorRT declares `int32_t getInferLibVersion() noexcept`.
            let f: extern "C" fn() -> i32 = unsafe { std::mem::transmute(sym) };
            let v = f();
            // TensorRT 10 encodes major*10000 + minor*100 + patch.
            Some(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
        };
        // SAFETY: the handle came from dlopen above and no symbol from it is used after this.
        unsafe { libc::dlclose(handle) };
        if v.is_some() {
            return v;
        }
    }
    None
}

fn tensorrt_ep(
    pkg: &ModelPackage,
    opts: &EngineOptions,
    cache: Option<&Path>,
) -> ort::ep::TensorRT {
    let mut trt = ort::ep::TensorRT::default()
        .with_device_id(opts.device_id)
        .with_fp16(opts.fp16)
        .with_layer_norm_fp32_fallback(true);
    if let Some(dir) = cache {
        let d = dir.display().to_string();
        trt = trt
            .with_engine_cache(true)
            .with_engine_cache_path(d.clone())
            .with_timing_cache(true)
            .with_timing_cache_path(d);
    }
    let s = pkg.input_size();
    let name = &pkg.manifest.input.name;
    let b = opts.max_batch.max(1);
    trt.with_profile_min_shapes(format!("{name}:1x3x{s}x{s}"))
        .with_profile_opt_shapes(format!("{name}:{b}x3x{s}x{s}"))
        .with_profile_max_shapes(format!("{name}:{b}x3x{s}x{s}"))
}

/// Where the engine for `pkg`/`opts` is cached: `<cache_dir>/<key>/`.
pub fn engine_cache_dir(pkg: &ModelPackage, opts: &EngineOptions) -> Option<(String, PathBuf)> {
    let root = opts.cache_dir.as_ref()?;
    let key = cache_key(&cache_key_parts(pkg, opts));
    let dir = root.join(&key);
    Some((key, dir))
}

/// TensorRT session with a keyed, atomically written engine cache: a cached engine is used if
/// its folder exists; one that fails to load is removed and rebuilt (not fatal); a new engine is
/// built into a temporary folder, warmed up once, then renamed into place, so a crash mid-build
/// never leaves a half-written cache entry behind.
fn tensorrt_cached(
    env: &ort::environment::Environment,
    onnx: &Path,
    pkg: &ModelPackage,
    opts: &EngineOptions,
    root: &Path,
) -> Result<ort::session::Session, EngineError> {
    let unavailable = |reason: String| EngineError::Unavailable {
        backend: Backend::Tensorrt,
        reason,
    };
    let key = cache_key(&cache_key_parts(pkg, opts));
    let final_dir = root.join(&key);
    let session_in = |dir: &Path| -> Result<ort::session::Session, EngineError> {
        let mut b = ort::session::Session::builder(env).map_err(|e| unavailable(e.to_string()))?;
        b = b
            .with_execution_providers([tensorrt_ep(pkg, opts, Some(dir))
                .build()
                .error_on_failure()])
            .map_err(|e| unavailable(e.to_string()))?;
        b.commit_from_file(onnx)
            .map_err(|e| unavailable(e.to_string()))
    };
    if final_dir.is_dir() {
        match session_in(&final_dir) {
            Ok(s) => {
                tracing::info!(cache = %final_dir.display(), "TensorRT engine loaded from cache");
                return Ok(s);
            }
            Err(e) => {
                tracing::warn!(cache = %final_dir.display(), error = %e, "cached TensorRT engine unusable; rebuilding");
                let _ = std::fs::remove_dir_all(&final_dir);
            }
        }
    }
    std::fs::create_dir_all(root)
        .map_err(|e| unavailable(format!("engine cache {}: {e}", root.display())))?;
    let tmp = root.join(format!(".build-{key}-{}", std::process::id()));
    // remove_dir_all unlinks a symlink planted at the name; create_dir then fails rather than
    // follow one planted since.
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp)
        .map_err(|e| unavailable(format!("engine cache {}: {e}", tmp.display())))?;
    tracing::info!(key = %key, "building the TensorRT engine (minutes the first time; cached afterwards)");
    let mut session = session_in(&tmp)?;
    // The first run builds the engine for the profile; only then is the cache complete.
    let s = pkg.input_size();
    let zeros = vec![0f32; 3 * s * s];
    let warm = ort::value::TensorRef::from_array_view(([1usize, 3, s, s], zeros.as_slice()))
        .map_err(|e| unavailable(e.to_string()))?;
    session
        .run(ort::inputs![pkg.manifest.input.name.as_str() => warm])
        .map_err(|e| unavailable(format!("TensorRT warm-up: {e}")))?;
    match std::fs::rename(&tmp, &final_dir) {
        Ok(()) => tracing::info!(cache = %final_dir.display(), "TensorRT engine cached"),
        Err(e) => {
            tracing::warn!(error = %e, "engine cache not stored (another process may have stored it)");
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    Ok(session)
}

impl Engine for OrtEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn infer_on_device(
        &mut self,
        input: &[f32],
        batch: usize,
        consume: &mut dyn FnMut(&DeviceFeatures) -> Result<(), String>,
    ) -> Option<Result<(), EngineError>> {
        if !matches!(self.info.backend, Backend::Cuda | Backend::Tensorrt) {
            return None;
        }
        Some(self.run_bound(input, batch, consume))
    }

    fn infer(&mut self, input: &[f32], batch: usize) -> Result<Features, EngineError> {
        let s = self.size;
        self.check_input(input, batch)?;
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

impl OrtEngine {
    /// The input must hold exactly `batch ≥ 1` images `[3, S, S]`.
    fn check_input(&self, input: &[f32], batch: usize) -> Result<(), EngineError> {
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
        Ok(())
    }

    /// IoBinding run: the input is copied from the host, every output is allocated by ONNX
    /// Runtime in CUDA memory of the engine's device. ONNX Runtime synchronises its stream at
    /// the end of the run, so the outputs are complete when `consume` sees them.
    fn run_bound(
        &mut self,
        input: &[f32],
        batch: usize,
        consume: &mut dyn FnMut(&DeviceFeatures) -> Result<(), String>,
    ) -> Result<(), EngineError> {
        use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
        let s = self.size;
        self.check_input(input, batch)?;
        let run = |e: ort::Error| EngineError::Run(e.to_string());
        let tensor =
            ort::value::TensorRef::from_array_view(([batch, 3, s, s], input)).map_err(run)?;
        let mut binding = self.session.create_binding().map_err(run)?;
        binding
            .bind_input(self.input_name.as_str(), &tensor)
            .map_err(run)?;
        let mem = MemoryInfo::new(
            AllocationDevice::CUDA,
            self.device_id,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(run)?;
        binding.bind_output_to_device("global", &mem).map_err(run)?;
        for name in &self.local_names {
            binding
                .bind_output_to_device(name.as_str(), &mem)
                .map_err(run)?;
        }
        let outputs = self.session.run_binding(&binding).map_err(run)?;
        let ptr = |name: &str, expected: usize| -> Result<(u64, usize), EngineError> {
            let value = outputs.get(name).ok_or_else(|| EngineError::Output {
                name: name.to_string(),
                expected,
                got: 0,
            })?;
            let t = value
                .view()
                .downcast::<ort::value::DynTensorValueType>()
                .map_err(|e| EngineError::Run(format!("output {name}: {e}")))?;
            let got: i64 = match t.dtype() {
                ort::value::ValueType::Tensor { shape, .. } => shape.iter().product(),
                other => {
                    return Err(EngineError::Run(format!(
                        "output {name}: expected a tensor, got {other:?}"
                    )));
                }
            };
            if got as usize != expected {
                return Err(EngineError::Output {
                    name: name.to_string(),
                    expected,
                    got: got.max(0) as usize,
                });
            }
            Ok((t.data_ptr() as u64, expected))
        };
        let global = ptr("global", batch * self.dim)?;
        let mut locals = Vec::with_capacity(self.local_names.len());
        for name in &self.local_names {
            locals.push(ptr(name, batch * self.tokens * self.dim)?);
        }
        consume(&DeviceFeatures {
            batch,
            dim: self.dim,
            tokens: self.tokens,
            global,
            locals,
        })
        .map_err(EngineError::Run)
    }
}

/// Builds the engine for a package.
pub fn create(pkg: &ModelPackage, opts: &EngineOptions) -> Result<Box<dyn Engine>, EngineError> {
    Ok(Box::new(OrtEngine::new(pkg, opts)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts() -> CacheKeyParts {
        CacheKeyParts {
            model_sha256: "0123456789abcdef0123".into(),
            ort_version: "1.31.1".into(),
            trt_version: "10.9.0".into(),
            gpu: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: (9, 0),
            fp16: true,
            max_batch: 8,
            input_size: 518,
        }
    }

    #[test]
    fn cache_key_changes_with_every_part() {
        let base = cache_key(&parts());
        assert_eq!(
            base,
            "0123456789abcdef-ort1.31.1-trt10.9.0-NVIDIA-H100-80GB-HBM3-sm90-fp16-b8-s518"
        );
        type Change = Box<dyn Fn(&mut CacheKeyParts)>;
        let variants: Vec<Change> = vec![
            Box::new(|p| p.model_sha256 = "ffff456789abcdef0123".into()),
            Box::new(|p| p.ort_version = "1.32.0".into()),
            Box::new(|p| p.trt_version = "10.10.0".into()),
            Box::new(|p| p.gpu = "NVIDIA L4".into()),
            Box::new(|p| p.compute_capability = (8, 9)),
            Box::new(|p| p.fp16 = false),
            Box::new(|p| p.max_batch = 4),
            Box::new(|p| p.input_size = 336),
        ];
        for change in variants {
            let mut p = parts();
            change(&mut p);
            assert_ne!(cache_key(&p), base, "{p:?}");
        }
    }

    #[test]
    fn cache_key_is_a_single_safe_path_component() {
        let mut p = parts();
        p.gpu = "../../etc/x y".into();
        let k = cache_key(&p);
        assert!(!k.contains('/') && !k.contains(' '), "{k}");
    }

    #[test]
    fn each_precision_loads_its_own_file_on_the_backends_that_run_it() {
        use Backend::{Cpu, Cuda, Tensorrt};
        let ok = |p, b, trt| model_for(p, b, trt).unwrap();
        let file = |file, trt_fp16| ModelChoice { file, trt_fp16 };
        assert_eq!(ok(Precision::Fp32, Cpu, true), file(Precision::Fp32, false));
        assert_eq!(
            ok(Precision::Fp32, Cuda, true),
            file(Precision::Fp32, false)
        );
        // fp32 on TensorRT keeps `[engine] fp16` (TensorRT's own switch), both ways.
        assert_eq!(
            ok(Precision::Fp32, Tensorrt, true),
            file(Precision::Fp32, true)
        );
        assert_eq!(
            ok(Precision::Fp32, Tensorrt, false),
            file(Precision::Fp32, false)
        );
        assert_eq!(
            ok(Precision::Int8, Cpu, false),
            file(Precision::Int8, false)
        );
        assert_eq!(
            ok(Precision::Fp16, Cuda, false),
            file(Precision::Fp16, false)
        );
        // TensorRT builds fp16 from the fp32 graph, even with `[engine] fp16 = false`.
        assert_eq!(
            ok(Precision::Fp16, Tensorrt, false),
            file(Precision::Fp32, true)
        );
    }

    #[test]
    fn a_precision_the_backend_cannot_run_is_refused_with_the_reason() {
        let e = model_for(Precision::Fp16, Backend::Cpu, true).unwrap_err();
        assert!(
            e.contains("fp16 needs a GPU backend") && e.contains("not cpu"),
            "{e}"
        );
        for b in [Backend::Cuda, Backend::Tensorrt] {
            let e = model_for(Precision::Int8, b, true).unwrap_err();
            assert!(e.contains("int8 runs on the cpu backend only"), "{e}");
            assert!(e.contains(&format!("not on {b}")), "{e}");
        }
    }
}
