//! The GPU tests, as one test binary: the kernels compile with NVRTC (runs without a GPU), the
//! GPU head against the CPU head, ONNX Runtime's CUDA execution provider and the scorer with the
//! GPU head. Without a GPU the runtime tests show as ignored with the reason (see `build.rs`);
//! on a GPU machine run `cargo test --test gpu -- --include-ignored` (`scripts/gpu-check`).

mod support;

mod engine;
mod head;
mod kernels_compile;
mod scorer;
