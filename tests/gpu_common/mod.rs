//! Helpers of the GPU test binaries (`gpu_scorer`, `gpu_engine`), kept apart from
//! `tests/common` so that the binaries carried to a GPU machine stay small and need nothing but
//! the crate.

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

/// True when a GPU and the ONNX Runtime library are usable; otherwise prints why the test is
/// skipped.
pub fn gpu_and_runtime_ready() -> bool {
    let probe = anomalyclip_edge::gpu::probe();
    if !probe.is_usable() {
        println!("skipped: no usable GPU: {}", probe.reason());
        return false;
    }
    if let Err(e) = engine::init_runtime(None) {
        println!("skipped: {e}");
        return false;
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
