//! Helpers of the GPU test binary (`tests/gpu`), kept apart from `tests/it/common` so that the
//! binary carried to a GPU machine stays small and needs nothing but the crate.

#![allow(dead_code)] // Each test binary uses a different part of the helpers.

use std::path::{Path, PathBuf};

use anomalyclip_edge::engine::{self, Backend, EngineOptions};
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::scorer::{ScoreError, Scorer};

/// Fixture folders relative to the working directory first (the GPU machine runs the carried
/// binary from its copy of the repository), then to the source tree.
pub fn fixture(sub: &str) -> PathBuf {
    let rel = Path::new("tests/fixtures").join(sub);
    if rel.exists() {
        rel
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(sub)
    }
}

/// Asserts that a GPU and the ONNX Runtime library are usable.
pub fn gpu_and_runtime_ready() -> bool {
    let probe = anomalyclip_edge::gpu::probe();
    // The tests are marked ignored when the build machine has no GPU (`build.rs`); one that
    // runs anyway (`--include-ignored`) fails here rather than passing without checking.
    assert!(probe.is_usable(), "no usable GPU: {}", probe.reason());
    if let Err(e) = engine::init_runtime(None) {
        panic!("ONNX Runtime: {e}");
    }
    true
}

/// The tiny package with `backend` (CPU head).
pub fn open_tiny(backend: Backend) -> Result<Scorer, ScoreError> {
    Scorer::open(
        &fixture("tiny"),
        HashCheck::All,
        &EngineOptions {
            backend,
            ..EngineOptions::default()
        },
    )
}

/// The golden images, sorted.
pub fn golden_images() -> Vec<PathBuf> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(fixture("golden/images"))
        .expect("golden images")
        .map(|e| e.expect("dir entry").path())
        .collect();
    images.sort();
    assert!(images.len() >= 5, "golden images missing");
    images
}

/// Largest |a − b| over two maps of the same length.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}
