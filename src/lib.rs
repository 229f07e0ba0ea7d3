//! anomalyclip-edge: zero-shot visual anomaly detection (AnomalyCLIP) for factory lines.
//!
//! # Layout
//! The stages, in the order a frame travels through them:
//! - [`package`]: the model package (ONNX encoder + text constant + manifest) and its checks.
//! - [`engine`]: the vision encoder backends (ONNX Runtime: TensorRT / CUDA / CPU).
pub mod engine;
pub mod package;
