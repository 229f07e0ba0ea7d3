//! The anomaly head on an NVIDIA GPU: the same maths as the CPU reference in [`crate::head`]
//! (docs/anomalyclip-inference.md §5), as CUDA kernels compiled by NVRTC at start-up and driven
//! through `cudarc` 0.19 (dynamic loading: no CUDA toolkit at build time).
//!
//! Input: the global token (dim floats) and 1..=[`MAX_LAYERS`] layers of grid² local tokens
//! (dim floats each), either in host memory ([`GpuHead::run_host`]) or already on the device, e.g.
//! ONNX Runtime outputs bound to device memory ([`GpuHead::run_device`], or a [`DeviceImage`]
//! through [`crate::head::AnomalyHead`], the interface the scorer uses).
//! Output: [`GpuHeadOutput`] (image score, map maximum, pixels at or above the threshold and
//! their share, NaN/inf count) and, on demand, the anomaly map at frame size, its u8
//! quantisation and the binary mask (`value >= threshold`).
//! Failure modes: no driver library, no NVRTC, no device, a kernel that NVRTC rejects, a failing
//! driver call, wrongly sized input — each a [`GpuError`], never a panic. Use [`probe`] to ask
//! whether a GPU head can run here before building one.
//!
//! # Layout
//! - `kernels.cu` — the kernels ([`KERNEL_NAMES`]), one source file, `extern "C"`, no includes.
//! - [`sys`] — every `unsafe` but one: library discovery (how NVRTC is found is documented
//!   there), NVRTC compilation, kernel launches with their size checks, borrowing the engine's
//!   device memory. The one other (`head`: `GpuHead::borrow_image`) vouches for the engine's
//!   device pointers.
//! - `head` — [`GpuHead`]: buffers allocated once, the per-frame launch sequence, downloads.
//! - `probe` — [`probe`]: driver, NVRTC and devices, for logs, tests and `check-config`.
//!
//! # Synchronisation
//! A [`GpuHead`] owns one CUDA stream (or uses the one given to [`GpuHead::new_on_stream`]). Every
//! copy and kernel of a frame is enqueued on it in order, so stream order is the only barrier
//! between kernels. `run_host`/`run_device` end with a 16-byte device-to-host copy of the scalar
//! results, which synchronises the stream: when they return, all work of the frame is done and the
//! device buffers hold that frame's maps. `run_device` reads its input on the head's stream: the
//! producer must have finished writing it, either by running on the same stream
//! (ORT's `user_compute_stream` = [`GpuHead::stream`]) or by being synchronised before the call.

mod head;
mod probe;
pub mod sys;

pub use head::{DeviceImage, GpuHead, GpuHeadOutput, Stage};
pub use probe::{GpuDevice, GpuProbe, NvrtcInfo, probe};
pub use sys::{
    Image, MAX_LAYERS, NVRTC_ENV, NvrtcLocation, driver_version, nvrtc_library, nvrtc_version,
};

/// The CUDA source of every kernel of the head.
pub const KERNEL_SOURCE: &str = include_str!("kernels.cu");

/// Entry points in [`KERNEL_SOURCE`], in the order a frame runs them (`bilinear_resize` serves both
/// the grid → size upsample and the optional size → frame resize).
pub const KERNEL_NAMES: [&str; 6] = [
    "head_tokens",
    "bilinear_resize",
    "gauss_cols",
    "gauss_rows",
    "map_stats",
    "quantize_mask",
];

/// What NVRTC should produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// PTX for the virtual architecture `compute_XY`; the driver JIT-compiles it at load.
    /// Needs a driver at least as new as NVRTC.
    Ptx,
    /// SASS for the real architecture `sm_XY`; no JIT, and loads on older drivers of the same
    /// CUDA major version. Preferred at start-up.
    Cubin,
}

/// Compiles [`KERNEL_SOURCE`] for compute capability `cc` (e.g. `(9, 0)` for H100).
/// Works without a GPU: only NVRTC is needed. Multiply-adds are not contracted into FMAs
/// (`--fmad=false`), so each operation rounds like the CPU head's; the kernels are memory-bound,
/// so this costs no measurable time.
pub fn compile_kernels(cc: (i32, i32), target: Target) -> Result<Image, GpuError> {
    let arch = match target {
        Target::Ptx => format!("compute_{}{}", cc.0, cc.1),
        Target::Cubin => format!("sm_{}{}", cc.0, cc.1),
    };
    let options = vec![
        format!("--gpu-architecture={arch}"),
        "--fmad=false".to_string(),
    ];
    sys::compile(
        KERNEL_SOURCE,
        "anomalyclip_head.cu",
        &options,
        target == Target::Cubin,
    )
}

/// Errors of the GPU head. Absence of a GPU is an error value, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The NVIDIA driver library is not installed (normal on CPU-only machines).
    #[error(
        "no CUDA driver library (libcuda.so.1) could be loaded: this machine has no NVIDIA driver; use the cpu head"
    )]
    DriverMissing,
    /// NVRTC could not be found.
    #[error(
        "NVRTC library not found (searched: {searched}); install the CUDA toolkit's NVRTC, run scripts/fetch-nvrtc, or set ANOMALYCLIP_NVRTC to a libnvrtc.so.12"
    )]
    NvrtcMissing {
        /// Where the search looked.
        searched: String,
    },
    /// The requested device ordinal does not exist.
    #[error("no CUDA device {ordinal}: the driver reports {count} device(s)")]
    NoDevice {
        /// Ordinal asked for.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// A CUDA driver call failed.
    #[error("cuda driver call failed: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// An NVRTC call failed.
    #[error("nvrtc call failed: {0}")]
    Nvrtc(#[from] cudarc::nvrtc::result::NvrtcError),
    /// NVRTC rejected the kernel source.
    #[error("nvrtc could not compile the head kernels ({options}): {log}")]
    Compile {
        /// NVRTC options used.
        options: String,
        /// NVRTC's program log.
        log: String,
        /// NVRTC's status.
        source: cudarc::nvrtc::result::NvrtcError,
    },
    /// Neither the CUBIN nor the PTX could be compiled and loaded.
    #[error("could not load the head kernels on the device: {0}")]
    Load(String),
    /// The head configuration cannot run on the GPU head.
    #[error("invalid gpu head configuration: {0}")]
    Config(String),
    /// Input of the wrong size, or too large for the kernels.
    #[error("invalid gpu head input: {0}")]
    Input(String),
}
