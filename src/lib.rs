//! anomalyclip-edge: zero-shot visual anomaly detection (AnomalyCLIP) for factory lines.
//!
//! # Layout
//! The stages, in the order a frame travels through them:
//! - [`config`]: the TOML file, `check-config` validation, the resolved [`config::Config`].
//! - [`camera`]: GStreamer pipelines per camera into latest-frame slots; reconnect and status.
//! - [`image_io`]: image files → pixels in Pillow's mode → model input, like the reference.
//! - [`preprocess`]: Pillow-exact resampling of frames and the CLIP normalisation.
//! - [`package`]: the model package (ONNX encoder + text constant + manifest) and its checks.
//! - [`engine`]: the vision encoder backends (ONNX Runtime: TensorRT / CUDA / CPU).
//! - [`head`]: the CPU anomaly head (score, patch probabilities, upsampling, Gaussian smoothing).
//! - [`simd`]: run-time AVX2 dispatch of the numerical loops (bit-identical results).
//! - [`gpu`]: the same head as CUDA kernels (NVRTC at start-up, cudarc), checked against [`head`].
//! - [`scorer`]: package + engine + head as one object, used by `score`, `eval` and the daemon.
//! - [`alarm`]: per-camera alarm debouncer (N of the last M frames over threshold, K to clear).
//! - [`payload`]: the versioned MQTT payloads (result, alarm, status, mask PNG, stats).
//! - [`mqtt`]: the publisher task, its topic contract and the on-disk alarm queue.
//! - [`daemon`]: the `run` loop that ties the stages together, with systemd integration.
//! - [`statedir`]: the state directory, locked for one daemon; atomic, symlink-safe file writes.
//!
//! Off the frame path: [`eval`] (dataset evaluation with the paper's metrics).
//!
//! Shared: [`fsio`] (every file read from outside: regular files only, size-bounded before
//! reading).
pub mod alarm;
pub mod camera;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod eval;
pub mod fsio;
pub mod gpu;
pub mod head;
pub mod image_io;
pub mod mqtt;
pub mod package;
pub mod payload;
pub mod preprocess;
pub mod scorer;
pub mod simd;
pub mod statedir;
