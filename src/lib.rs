//! anomalyclip-edge
//!
//! # Layout
//! - [`head`]: the CPU anomaly head (score, patch probabilities, upsampling, Gaussian smoothing).
//! - [`gpu`]: the same head as CUDA kernels (NVRTC at start-up, cudarc), checked against [`head`].

pub mod gpu;
pub mod head;
