//! anomalyclip-edge
//!
//! # Layout (numerical core)
//! - [`image_io`]: image files → pixels in Pillow's mode → model input, like the reference.
//! - [`preprocess`]: Pillow-exact resampling of camera frames and the CLIP normalisation.
//! - [`head`]: the CPU anomaly head (score, patch probabilities, upsampling, Gaussian smoothing).
//! - [`gpu`]: the same head as CUDA kernels (NVRTC at start-up, cudarc), checked against [`head`].

pub mod gpu;
pub mod head;
pub mod image_io;
pub mod preprocess;
