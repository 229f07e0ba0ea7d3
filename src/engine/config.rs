//! The inference stage's configuration: `[engine]` as written and resolved, the [`Backend`],
//! [`Precision`] and [`HeadChoice`] choices (the one definition of each; the CLI's
//! `--backend`/`--precision`/`--head` use them too).
//!
//! Input: the raw `[engine]` table (keys optional, `deny_unknown_fields`). Output: an
//! [`EngineConfig`], or problems reported at each key's line (ranges, a missing ONNX Runtime
//! library file). A leaf: it imports only the config problem machinery, never the engine itself,
//! so the config layer does not depend on ONNX Runtime or the GPU code.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::problems::{Ctx, S, get, in_range};

/// Which inference backend to use (`[engine] backend`, `--backend`).
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

/// Which model file of the package runs (`[engine] precision`, `--precision`). The package's
/// manifest lists the precisions it has; asking for one it lacks is an error, never a fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// `model.onnx`: the reference, every backend.
    #[default]
    Fp32,
    /// `model.int8.onnx`: dynamically quantized MatMul/Gemm weights, for the CPU backend.
    Int8,
    /// `model.fp16.onnx` on CUDA; TensorRT builds an fp16 engine from `model.onnx`. GPU only.
    Fp16,
}

impl Precision {
    /// Every precision, in the order manifests list them.
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Fp16, Precision::Int8];

    /// The name used in configs, manifests and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
            Precision::Fp16 => "fp16",
        }
    }

    /// The precision called `name`, if any.
    pub fn parse(name: &str) -> Option<Precision> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// The package file holding this precision's model.
    pub fn model_file(self) -> &'static str {
        match self {
            Precision::Fp32 => "model.onnx",
            Precision::Int8 => "model.int8.onnx",
            Precision::Fp16 => "model.fp16.onnx",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the anomaly head runs (`[engine] head`, `--head`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HeadChoice {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU head (the reference).
    Cpu,
    /// The CUDA head; an error if no GPU is usable.
    Gpu,
}

/// `[engine]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub backend: Backend,
    /// CPU intra-op threads; 0 = ONNX Runtime's default (all cores).
    pub threads: u32,
    /// Largest batch formed across cameras.
    pub max_batch: u32,
    /// Longest a frame waits for a batch to fill.
    pub max_wait: Duration,
    /// ONNX Runtime shared library; `None` = `ORT_DYLIB_PATH`, then the default install path.
    pub ort_library: Option<PathBuf>,
    /// TensorRT: build FP16 engines (LayerNorm/softmax stay fp32). Ignored by the CPU backend.
    pub fp16: bool,
    /// Where the anomaly head runs (`auto`: the GPU when one is usable).
    pub head: HeadChoice,
    /// Which model file of the package runs.
    pub precision: Precision,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            backend: default_backend(),
            threads: default_threads(),
            max_batch: default_max_batch(),
            max_wait: Duration::from_millis(default_max_wait_ms()),
            ort_library: None,
            fp16: true,
            head: HeadChoice::Auto,
            precision: Precision::Fp32,
        }
    }
}

// Defaults, one function each (referenced from `config/example.toml`).

/// `[engine] backend` default.
pub const fn default_backend() -> Backend {
    Backend::Auto
}
/// `[engine] threads` default (0 = ONNX Runtime decides).
pub const fn default_threads() -> u32 {
    0
}
/// `[engine] max_batch` default.
pub const fn default_max_batch() -> u32 {
    4
}
/// `[engine] max_wait_ms` default.
pub const fn default_max_wait_ms() -> u64 {
    10
}

/// `[engine]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEngine {
    backend: Option<Backend>,
    threads: S<u32>,
    max_batch: S<u32>,
    max_wait_ms: S<u64>,
    ort_library: S<String>,
    fp16: Option<bool>,
    head: Option<HeadChoice>,
    precision: Option<Precision>,
}

/// Checks `[engine]` and resolves it; `None` (with problems reported) when a value is invalid.
pub(crate) fn resolve_engine(ctx: &mut Ctx<'_>, raw: Option<&RawEngine>) -> Option<EngineConfig> {
    let Some(e) = raw else {
        return Some(EngineConfig::default());
    };
    let mut ok = true;
    if let Some(v) = &e.threads
        && let Err(message) = check_threads(*v.get_ref() as usize)
    {
        ctx.at(v, "engine.threads", message);
        ok = false;
    }
    if let Some(v) = &e.max_batch {
        ok &= in_range(ctx, v, "engine.max_batch", 1, 64);
    }
    if let Some(v) = &e.max_wait_ms {
        ok &= in_range(ctx, v, "engine.max_wait_ms", 0, 10_000);
    }
    let ort_library = e.ort_library.as_ref().map(|v| {
        if ctx.fs() && !Path::new(v.get_ref()).is_file() {
            ctx.at(
                v,
                "engine.ort_library",
                format!("ONNX Runtime library {:?} not found", v.get_ref()),
            );
        }
        PathBuf::from(v.get_ref())
    });
    ok.then(|| EngineConfig {
        backend: e.backend.unwrap_or(default_backend()),
        threads: get(&e.threads, default_threads()),
        max_batch: get(&e.max_batch, default_max_batch()),
        max_wait: Duration::from_millis(get(&e.max_wait_ms, default_max_wait_ms())),
        ort_library,
        fp16: e.fp16.unwrap_or(true),
        head: e.head.unwrap_or_default(),
        precision: e.precision.unwrap_or_default(),
    })
}

/// Absolute upper bound of CPU inference threads (`[engine] threads`, `score --threads`,
/// `eval --threads`), whatever the machine: a single-socket server has at most 256 hardware
/// threads today, and ONNX Runtime's intra-op scaling for one image stops long before.
pub const MAX_THREADS: usize = 256;

/// Oversubscription allowed over the CPUs available to the process: 4× leaves room for cgroup
/// quotas that make `available_parallelism` under-report (a 1.5-CPU quota reads as 1), while
/// refusing the settings that only hurt (256 threads on 2 cores measured 54–95× slower).
pub const THREADS_PER_CPU: usize = 4;

/// The largest thread count accepted here: `min(MAX_THREADS, THREADS_PER_CPU × CPUs available)`
/// (the CPUs as `std::thread::available_parallelism` sees them: affinity and cgroup quota
/// included; 1 when unknown). Machine-dependent on purpose: `check-config` runs on the target
/// (`ExecStartPre=`), where the count matters.
pub fn max_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    MAX_THREADS.min(THREADS_PER_CPU.saturating_mul(cpus))
}

/// Checks a thread count (0 = ONNX Runtime's default, all cores) against [`max_threads`];
/// the error is the message to show after the option's name.
pub fn check_threads(threads: usize) -> Result<(), String> {
    let max = max_threads();
    if threads <= max {
        return Ok(());
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    Err(format!(
        "{threads} is out of range (expected 0 = all cores, or up to {max}: {THREADS_PER_CPU} × the {cpus} CPU(s) available, at most {MAX_THREADS})"
    ))
}
