//! The product path on a GPU: [`Scorer`] with the CUDA head against the same scorer with the CPU
//! head (the reference), on every golden image, through the real ONNX Runtime encoder.
//! Without a usable GPU (or without the ONNX Runtime library) it prints why and passes; the
//! kernel-level parity is in `tests/gpu_head.rs`. Run on a GPU machine by `scripts/gpu-check`.

use std::path::{Path, PathBuf};

use anomalyclip_edge::engine::{self, Backend, EngineOptions};
use anomalyclip_edge::gpu;
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::scorer::{HeadChoice, Scorer};

/// Fixture folders relative to the working directory first (the GPU machine runs the carried
/// binary from its copy of the repository), then to the source tree.
fn fixture(sub: &str) -> PathBuf {
    let rel = Path::new("tests/fixtures").join(sub);
    if rel.exists() {
        rel
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(sub)
    }
}

#[test]
fn gpu_head_matches_the_cpu_head_through_the_scorer() {
    let probe = gpu::probe();
    if !probe.is_usable() {
        println!("skipped: no usable GPU: {}", probe.reason());
        return;
    }
    if let Err(e) = engine::init_runtime(None) {
        println!("skipped: {e}");
        return;
    }
    let opts = EngineOptions {
        backend: Backend::Cpu,
        ..EngineOptions::default()
    };
    let tiny = fixture("tiny");
    let mut cpu = Scorer::open(&tiny, HashCheck::All, &opts).expect("cpu scorer");
    let mut gpu = Scorer::open(&tiny, HashCheck::All, &opts)
        .and_then(|s| s.with_head(HeadChoice::Gpu))
        .expect("gpu scorer");
    assert_eq!(cpu.head_device(), "cpu");
    assert_eq!(gpu.head_device(), "gpu");

    let mut images: Vec<PathBuf> = std::fs::read_dir(fixture("golden/images"))
        .expect("golden images")
        .map(|e| e.expect("dir entry").path())
        .collect();
    images.sort();
    assert!(images.len() >= 5, "golden images missing");
    let (mut worst_score, mut worst_map) = (0f32, 0f32);
    for p in &images {
        let (_, a) = cpu.score_file(p).expect("cpu score");
        let (_, b) = gpu.score_file(p).expect("gpu score");
        assert_eq!(a.map.len(), b.map.len());
        let ds = (a.score - b.score).abs();
        let dm = a
            .map
            .iter()
            .zip(&b.map)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        println!(
            "SCORER image={} cpu_score={:.6} gpu_score={:.6} d_score={ds:.3e} d_map={dm:.3e}",
            p.file_name().unwrap_or_default().to_string_lossy(),
            a.score,
            b.score
        );
        worst_score = worst_score.max(ds);
        worst_map = worst_map.max(dm);
    }
    println!("PARITY kernel=scorer_score case=golden max_abs={worst_score:e}");
    println!("PARITY kernel=scorer_map case=golden max_abs={worst_map:e}");
    // Same tolerance as the kernel tests: the GPU head reorders no sums the CPU head does not.
    assert!(worst_score <= 1e-5, "score |Δ| {worst_score}");
    assert!(worst_map <= 1e-5, "map |Δ| {worst_map}");
}
