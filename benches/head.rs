//! The CPU head at the real model's shapes: 37×37 grid of 768-d tokens, one layer, 518² map, and
//! the same mapped back to a 1920×1080 frame. `scripts/bench-head` compares with the PyTorch +
//! scipy reference (`engines/bench_reference.py`). `head/run_frame_518` is the scorer's call
//! through [`AnomalyHead`]: the head, the map's maximum and `area`, the finiteness check and the
//! copy of the map into the result.

use std::hint::black_box;

use anomalyclip_edge::head::{
    AnomalyHead, Bilinear, CpuHead, HeadConfig, HeadInput, HeadOutput, gaussian_blur,
    gaussian_kernel, patch_probabilities,
};
use criterion::Criterion;
use criterion::measurement::Measurement;

#[path = "clock.rs"]
mod clock;

/// Deterministic pseudo-random floats in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn bench_head<M: Measurement>(c: &mut Criterion<M>) {
    let config = HeadConfig {
        size: 518,
        grid: 37,
        dim: 768,
        tau: 0.07,
        sigma: 4.0,
    };
    let text = noise(2 * 768, 1);
    let global = noise(768, 2);
    let local = noise(37 * 37 * 768, 3);
    let mut head = CpuHead::new(config, &text).expect("head");
    let mut out = HeadOutput::new(&config);
    let mut group = c.benchmark_group("head");
    group.bench_function("full_518", |b| {
        b.iter(|| {
            head.run(black_box(&global), &[black_box(&local)], &mut out)
                .expect("run");
            black_box(&out.map);
        })
    });
    group.bench_function("run_frame_518", |b| {
        b.iter(|| {
            let locals = [black_box(local.as_slice())];
            let input = HeadInput::Host {
                global: black_box(&global),
                locals: &locals,
            };
            black_box(head.run_frame(input, 0.5).expect("run_frame"));
        })
    });
    let mut to_frame = Bilinear::new(518, 518, 1080, 1920);
    let mut frame_map = vec![0.0f32; 1080 * 1920];
    group.bench_function("full_1920x1080", |b| {
        b.iter(|| {
            head.run(black_box(&global), &[black_box(&local)], &mut out)
                .expect("run");
            to_frame.run(&out.map, &mut frame_map);
            black_box(&frame_map);
        })
    });
    let kernel = gaussian_kernel(4.0, 4.0);
    let mut scratch = Vec::new();
    let mut map = noise(518 * 518, 4);
    group.bench_function("blur_518", |b| {
        b.iter(|| gaussian_blur(black_box(&mut map), 518, 518, &kernel, &mut scratch))
    });
    let w = head.direction().to_vec();
    let mut probs = vec![0.0f32; 37 * 37];
    group.bench_function("patch_probs_1369x768", |b| {
        b.iter(|| patch_probabilities(black_box(&local), 768, &w, &mut probs))
    });
    let patch = noise(37 * 37, 5);
    let mut up = Bilinear::new(37, 37, 518, 518);
    let mut upmap = vec![0.0f32; 518 * 518];
    group.bench_function("upsample_37_518", |b| {
        b.iter(|| up.run(black_box(&patch), &mut upmap))
    });
    group.finish();
}

fn main() {
    if clock::cpu_clock() {
        let mut c = clock::cpu_criterion();
        bench_head(&mut c);
        c.final_summary();
    } else {
        let mut c = Criterion::default().configure_from_args();
        bench_head(&mut c);
        c.final_summary();
    }
}
