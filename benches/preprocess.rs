//! Frame preprocessing: a 1920×1080 RGB frame (GStreamer-padded rows) → Pillow bicubic 518², and
//! 518² RGB → normalised CHW. `scripts/bench-head` compares with Pillow + torch
//! (`engines/bench_reference.py`).

use std::hint::black_box;

use anomalyclip_edge::preprocess::{
    CLIP_MEAN, CLIP_STD, Filter, Preprocessor, Resizer, to_chw_normalised,
};
use criterion::{Criterion, criterion_group, criterion_main};

const MEAN: [f32; 3] = CLIP_MEAN;
const STD: [f32; 3] = CLIP_STD;

fn frame(w: usize, h: usize, stride: usize) -> Vec<u8> {
    let mut f = vec![0u8; stride * h];
    for y in 0..h {
        for x in 0..w * 3 {
            f[y * stride + x] = ((x * 7 + y * 13) ^ (x * y)) as u8;
        }
    }
    f
}

fn bench_preprocess(c: &mut Criterion) {
    let (w, h) = (1920, 1080);
    let stride = w * 3 + 8;
    let src = frame(w, h, stride);
    let mut group = c.benchmark_group("preprocess");
    let mut resizer = Resizer::new(w, h, 3, 518, 518, Filter::Bicubic).expect("plan");
    let mut resized = vec![0u8; 518 * 518 * 3];
    group.bench_function("resize_1920x1080_to_518", |b| {
        b.iter(|| {
            resizer
                .resize(black_box(&src), stride, &mut resized)
                .expect("resize")
        })
    });
    let mut chw = vec![0.0f32; 3 * 518 * 518];
    group.bench_function("chw_518", |b| {
        b.iter(|| to_chw_normalised(black_box(&resized), 518, 518, MEAN, STD, &mut chw))
    });
    let mut pre = Preprocessor::new(w, h, 518, MEAN, STD).expect("plan");
    group.bench_function("frame_1920x1080_to_input", |b| {
        b.iter(|| pre.run(black_box(&src), stride, &mut chw).expect("run"))
    });
    group.finish();
}

criterion_group!(benches, bench_preprocess);
criterion_main!(benches);
