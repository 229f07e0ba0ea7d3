//! The product path on a GPU: [`Scorer`] with the CUDA head against the same scorer with the CPU
//! head (the reference), on every golden image, through the real ONNX Runtime encoder.
//! Without a usable GPU (or without the ONNX Runtime library) it prints why and passes; the
//! kernel-level parity is in `tests/gpu_head.rs`. Run on a GPU machine by `scripts/gpu-check`.
//!
//! [`Scorer`]: anomalyclip_edge::scorer::Scorer

use crate::support as gpu_common;

use anomalyclip_edge::engine::Backend;
use anomalyclip_edge::scorer::HeadChoice;
use gpu_common::{golden_images, gpu_and_runtime_ready, max_abs_diff, open_tiny};

#[cfg_attr(
    not(have_gpu),
    ignore = "needs a CUDA GPU: on a GPU machine run scripts/gpu-check (--include-ignored)"
)]
#[test]
fn gpu_head_matches_the_cpu_head_through_the_scorer() {
    if !gpu_and_runtime_ready() {
        return;
    }
    let mut cpu = open_tiny(Backend::Cpu).expect("cpu scorer");
    let mut gpu = open_tiny(Backend::Cpu)
        .and_then(|s| s.with_head(HeadChoice::Gpu))
        .expect("gpu scorer");
    assert_eq!(cpu.head_device(), "cpu");
    assert_eq!(gpu.head_device(), "gpu");

    let (mut worst_score, mut worst_map) = (0f32, 0f32);
    for p in &golden_images() {
        let (_, a) = cpu.score_file(p).expect("cpu score");
        let (_, b) = gpu.score_file(p).expect("gpu score");
        let ds = (a.score - b.score).abs();
        let dm = max_abs_diff(&a.map, &b.map);
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
