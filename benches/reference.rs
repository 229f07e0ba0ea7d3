//! Few-shot bank matching (`src/reference.rs`) per frame: the GEMM against the bank, the running
//! maximum, the upsampling and the addition to the map (`Reference::apply`), at the tiny test
//! package's shapes and at full-size shapes (518 px input, 37 × 37 = 1369 tokens) with synthetic
//! banks; beside it the CPU head at 518 (`head/run_frame_518` in `benches/head.rs` measures the
//! same) and, when ONNX Runtime is found, the tiny package's whole frame without and with a K = 4
//! bank. Matching runs on rayon's pool, so a thread clock would miss it: each case reports the
//! wall time and the process CPU time (`getrusage`, all threads) per call, the median of
//! `BENCH_ROUNDS` rounds (default 5) after one warm-up. On a loaded machine read the CPU time:
//! it is the work done, whatever the wait for a core.
//! Run: `source scripts/env.sh; cargo bench --bench reference` (add `--profile dev` to reuse a
//! debug build: dependencies, matrixmultiply included, are built with opt-level 2 there).

use std::hint::black_box;

use anomalyclip_edge::engine::{Backend, EngineOptions};
use anomalyclip_edge::head::{AnomalyHead, CpuHead, HeadConfig, HeadInput};
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::reference::{Bank, DEFAULT_MAX_BANK_MB, Fingerprint, Reference, WHOLE_FRAME};
use anomalyclip_edge::scorer::Scorer;
use std::time::Instant;

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Times `f`: one warm-up call, then the median over rounds of `reps` calls; prints one line.
fn time(name: &str, reps: usize, mut f: impl FnMut()) {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    f();
    let mut wall = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..rounds.max(1) {
        let (w0, c0) = (Instant::now(), cpu_seconds());
        for _ in 0..reps {
            f();
        }
        wall.push(w0.elapsed().as_secs_f64() * 1e3 / reps as f64);
        cpu.push((cpu_seconds() - c0) * 1e3 / reps as f64);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{name:<44} wall {:>9.3} ms   cpu {:>9.3} ms   ({} rounds x {reps})",
        median(&mut wall),
        median(&mut cpu),
        rounds.max(1)
    );
}

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

fn fingerprint(grid: usize, dim: usize, layers: usize, size: usize) -> Fingerprint {
    Fingerprint {
        model_sha256: String::new(),
        text_sha256: String::new(),
        layers: (1..=layers).collect(),
        input_size: size,
        grid,
        dim,
        region: WHOLE_FRAME.into(),
        k: 0,
        precision: "f32".into(),
    }
}

/// `Reference::apply` with a synthetic bank of `k` images.
fn bench_apply(
    name: &str,
    reps: usize,
    (k, grid, dim, layers, size): (usize, usize, usize, usize, usize),
) {
    let n = grid * grid * dim;
    let imgs: Vec<Vec<Vec<f32>>> = (0..k)
        .map(|i| (0..layers).map(|l| noise(n, (i * 10 + l) as u64)).collect())
        .collect();
    let views: Vec<Vec<&[f32]>> = imgs
        .iter()
        .map(|i| i.iter().map(Vec::as_slice).collect())
        .collect();
    let bank = Bank::build(fingerprint(grid, dim, layers, size), &views, u64::MAX).expect("bank");
    println!("{name}: bank {} bytes", bank.feature_bytes());
    let mut r = Reference::new(bank);
    let frame: Vec<Vec<f32>> = (0..layers).map(|l| noise(n, 1000 + l as u64)).collect();
    let fv: Vec<&[f32]> = frame.iter().map(Vec::as_slice).collect();
    let mut map = vec![0.0f32; size * size];
    time(name, reps, || {
        let mut score = 0.5;
        r.apply(black_box(&fv), &mut map, &mut score)
            .expect("apply");
        black_box(score);
    });
}

fn main() {
    println!("rayon threads {}", rayon::current_num_threads());
    bench_apply(
        "reference/apply_k4_tiny_8x8x32_112",
        200,
        (4, 8, 32, 1, 112),
    );
    bench_apply("reference/apply_k4_1369x768_518", 2, (4, 37, 768, 1, 518));
    bench_apply("reference/apply_k8_1369x768_518", 1, (8, 37, 768, 1, 518));
    bench_apply("reference/apply_k4_1369x1024_518", 1, (4, 37, 1024, 1, 518));
    if std::env::var_os("BENCH_FOUR_LAYERS").is_some() {
        bench_apply(
            "reference/apply_k4_4layers_1369x768_518",
            1,
            (4, 37, 768, 4, 518),
        );
    }

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
    time("reference/head_run_frame_518", 5, || {
        let locals = [black_box(local.as_slice())];
        let input = HeadInput::Host {
            global: black_box(&global),
            locals: &locals,
        };
        black_box(head.run_frame(input, 0.5).expect("frame").stats.max);
    });

    // A package's whole frame (engine + head), without and with a K = 4 bank.
    let Some(lib) = std::env::var_os("ORT_DYLIB_PATH").map(std::path::PathBuf::from) else {
        eprintln!("ORT_DYLIB_PATH not set: source scripts/env.sh for the tiny-package frame");
        return;
    };
    let opts = EngineOptions {
        backend: Backend::Cpu,
        threads: 1,
        ort_library: Some(lib),
        ..EngineOptions::default()
    };
    // `ACE_BENCH_MODEL=DIR` times another package (e.g. a random full-size export) instead of
    // the tiny one; `BENCH_FRAME_REPS` frames per round (default 50; 1 for a full-size model).
    let dir = std::env::var_os("ACE_BENCH_MODEL").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny"),
        std::path::PathBuf::from,
    );
    let reps: usize = std::env::var("BENCH_FRAME_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
        .max(1);
    let mut scorer = Scorer::open(&dir, HashCheck::None, &opts).expect("scorer");
    let s = scorer.size();
    println!("package {} (input {s})", dir.display());
    let input = noise(3 * s * s, 7);
    let bank_input: Vec<f32> = (0..4).flat_map(|i| noise(3 * s * s, 20 + i)).collect();
    let bank = scorer
        .build_bank(&bank_input, 4, WHOLE_FRAME, DEFAULT_MAX_BANK_MB)
        .expect("bank");
    println!(
        "bank K = 4, {} feature layer(s): {} bytes",
        bank.fingerprint().layers.len(),
        bank.feature_bytes()
    );
    let reference = Reference::new(bank);
    // Zero-shot and few-shot frames alternate within each round, so that the encoder's own
    // drift over a long run (a full-size frame takes seconds) falls on both rows alike.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    black_box(scorer.score_batch(&input, 1).expect("warm-up"));
    let mut rows: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    let mut reference = Some(reference);
    for _ in 0..rounds {
        for (i, row) in rows.iter_mut().enumerate() {
            if i == 1 {
                scorer.set_reference(reference.take());
            }
            let (w0, c0) = (Instant::now(), cpu_seconds());
            for _ in 0..reps {
                black_box(scorer.score_batch(black_box(&input), 1).expect("score"));
            }
            row.0.push(w0.elapsed().as_secs_f64() * 1e3 / reps as f64);
            row.1.push((cpu_seconds() - c0) * 1e3 / reps as f64);
            if i == 1 {
                reference = scorer.take_reference();
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut medians = Vec::new();
    for (name, (wall, cpu)) in ["reference/frame_zero_shot", "reference/frame_few_shot_k4"]
        .iter()
        .zip(rows.iter_mut())
    {
        let (w, c) = (median(wall), median(cpu));
        medians.push(c);
        println!(
            "{name:<44} wall {w:>9.3} ms   cpu {c:>9.3} ms   ({rounds} rounds x {reps}, alternating)"
        );
    }
    println!(
        "few-shot K = 4 adds {:+.1} % CPU per frame (same run)",
        (medians[1] / medians[0] - 1.0) * 100.0
    );
}
