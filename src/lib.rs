//! anomalyclip-edge
//!
//! # Layout (numerical core)
//! - [`image_io`]: image files → pixels in Pillow's mode → model input, like the reference.
//! - [`preprocess`]: Pillow-exact resampling of camera frames and the CLIP normalisation.
//! - [`head`]: the CPU anomaly head (score, patch probabilities, upsampling, Gaussian smoothing).
//! - [`simd`]: run-time AVX2 dispatch of the numerical loops (bit-identical results).

pub mod head;
pub mod image_io;
pub mod preprocess;
pub mod simd;
