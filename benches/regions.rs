//! Regions cost: scoring 4 regions of one 1080p frame (crop of the full-resolution frame,
//! resize, one batch through the engine, head, ignore mask) against 4 × the engine time of one
//! region, measured alternately in one run (medians).
//!
//! Run: `cargo bench --bench regions` (needs ONNX Runtime: `source scripts/env.sh`). Uses the
//! committed tiny random-weight package unless `ACE_BENCH_MODEL=DIR` names another (e.g. a
//! full-size export). Prints one table; the target is `4 regions ≤ 4 × one region's engine
//! time + 10 %`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anomalyclip_edge::engine::EngineOptions;
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::region::{RegionShape, Units};
use anomalyclip_edge::scorer::Scorer;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let model = std::env::var_os("ACE_BENCH_MODEL").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny"),
        PathBuf::from,
    );
    let threads: usize = std::env::var("ACE_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let opts = EngineOptions {
        threads,
        ..EngineOptions::default()
    };
    let mut scorer = match Scorer::open(&model, HashCheck::UpTo(64 << 20), &opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("regions bench: cannot open {}: {e}", model.display());
            std::process::exit(2);
        }
    };
    let (w, h) = (1920u32, 1080u32);
    let stride = w as usize * 3;
    let frame: Vec<u8> = (0..stride * h as usize)
        .map(|i| ((i * 2_654_435_761usize) >> 13) as u8)
        .collect();
    let quarter = |x: f64, y: f64| RegionShape {
        units: Units::Fraction,
        rect: [x, y, 0.5, 0.5],
        ignore: vec![vec![
            [x + 0.1, y + 0.1],
            [x + 0.2, y + 0.1],
            [x + 0.2, y + 0.2],
        ]],
    };
    let regions = [
        quarter(0.0, 0.0),
        quarter(0.5, 0.0),
        quarter(0.0, 0.5),
        quarter(0.5, 0.5),
    ];
    let s = scorer.size();
    let plane = 3 * s * s;
    let mut one_input = vec![0.0f32; plane];
    let r0 = regions[0].pixel_rect(w, h).expect("rect");
    scorer
        .prepare_frame(
            &frame[r0.y as usize * stride + r0.x as usize * 3..],
            r0.w as usize,
            r0.h as usize,
            stride,
            &mut one_input,
        )
        .expect("prepare");
    let mut four_input = vec![0.0f32; 4 * plane];
    let four = |scorer: &mut Scorer, input: &mut [f32]| {
        for (k, shape) in regions.iter().enumerate() {
            let r = shape.pixel_rect(w, h).expect("rect");
            scorer
                .prepare_frame(
                    &frame[r.y as usize * stride + r.x as usize * 3..],
                    r.w as usize,
                    r.h as usize,
                    stride,
                    &mut input[k * plane..(k + 1) * plane],
                )
                .expect("prepare");
        }
        let scored = scorer.score_frames(input, &[0.5; 4]).expect("score");
        for (shape, r) in regions.iter().zip(scored) {
            let mut r = r.expect("scored");
            let pr = shape.pixel_rect(w, h).expect("rect");
            let ignore =
                anomalyclip_edge::region::ignore_mask(shape, pr, w, h, r.size).expect("mask");
            std::hint::black_box(anomalyclip_edge::region::mask_map(&mut r.map, &ignore, 0.5));
        }
    };
    // Warm-up (`ACE_BENCH_WARMUP`, default 3; 1 is enough for a full-size model).
    let warmup: usize = std::env::var("ACE_BENCH_WARMUP")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(3);
    for _ in 0..warmup {
        scorer.score_frames(&one_input, &[0.5]).expect("score");
        four(&mut scorer, &mut four_input);
    }
    let iterations: usize = std::env::var("ACE_BENCH_ITERATIONS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(30);
    let (mut one, mut all, mut prep) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..iterations {
        let t = Instant::now();
        for (k, shape) in regions.iter().enumerate() {
            let r = shape.pixel_rect(w, h).expect("rect");
            scorer
                .prepare_frame(
                    &frame[r.y as usize * stride + r.x as usize * 3..],
                    r.w as usize,
                    r.h as usize,
                    stride,
                    &mut four_input[k * plane..(k + 1) * plane],
                )
                .expect("prepare");
        }
        prep.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(scorer.score_frames(&one_input, &[0.5]).expect("score"));
        one.push(t.elapsed());
        let t = Instant::now();
        four(&mut scorer, &mut four_input);
        all.push(t.elapsed());
    }
    let (one, all, prep) = (median(one), median(all), median(prep));
    let budget = one.mul_f64(4.0 * 1.1);
    println!(
        "model: {} (input {s}), {threads} engine thread(s), {iterations} alternating runs, medians",
        model.display()
    );
    println!("| measurement | time |");
    println!("|---|---|");
    println!(
        "| one region: engine + head (prepared input) | {:.2} ms |",
        one.as_secs_f64() * 1e3
    );
    println!(
        "| 4 regions of a 1920x1080 frame: crop + resize + one batch of 4 + head + ignore masks | {:.2} ms |",
        all.as_secs_f64() * 1e3
    );
    println!(
        "| of which crop + resize of the 4 crops (960x540 each) | {:.2} ms |",
        prep.as_secs_f64() * 1e3
    );
    println!(
        "| ratio 4 regions / one region's engine time | {:.2} (target <= 4.40) |",
        all.as_secs_f64() / one.as_secs_f64()
    );
    println!("| within target | {} |", all <= budget);
}
