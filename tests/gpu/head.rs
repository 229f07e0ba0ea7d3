//! GPU head vs the CPU head (the reference) on random inputs of several shapes, on every CUDA
//! device present. Without a GPU the tests show as ignored (`build.rs`); forced with
//! `--include-ignored` on a machine without one, they fail.
//!
//! Each kernel is checked in isolation (the CPU function gets the GPU's own previous stage as
//! input, so errors do not accumulate) and end to end. Lines `PARITY kernel=… case=… max_abs=…`
//! feed the table of `scripts/gpu-check run`.
//!
//! Tolerances: |Δ| ≤ 1e-5 on maps, probabilities, score and max. The map kernels do the CPU head's
//! operations in the CPU head's order without FMA contraction, so in isolation they agree almost to
//! the bit; the token kernel sums its dot products in another order (warp tree vs 8 lanes) and uses
//! CUDA's `expf`, ~1e-7. Counts: in isolation (same map on both sides) `above` is exact. End to end
//! a pixel within 1e-5 of the threshold may fall on either side, so the GPU count must lie between
//! the CPU counts at thr + 1e-5 and thr − 1e-5; the thresholds are picked at the map's median, the
//! worst case for such flips.
//!
//! The head interface ([`AnomalyHead`]) on the GPU: `run_frame` gives `run_host`'s numbers (map
//! maximum and `area` from the `map_stats` kernel), a pixel equal to the threshold counts
//! (`value >= threshold`, as on the CPU), NaN/inf features fail the frame naming the feature, and
//! the mask the daemon renders on the CPU equals the GPU head's quantisation at the mask size.

use anomalyclip_edge::gpu::{self, GpuDevice, GpuError, GpuHead, Stage};
use anomalyclip_edge::head::render_mask;
use anomalyclip_edge::head::{
    AnomalyHead, CpuHead, FrameValue, GAUSSIAN_TRUNCATE, HeadConfig, HeadError, HeadInput,
    HeadOutput, binary_mask, gaussian_blur, gaussian_kernel, map_stats, quantize_u8, resize_map,
    upsample_bilinear,
};
use anomalyclip_edge::payload::MaskKind;

const TOL: f32 = 1e-5;

/// The devices to run on. The tests are marked ignored when the build machine has no GPU
/// (`build.rs`); run with `--include-ignored` on a GPU machine, where a missing GPU fails.
fn devices_or_skip(test: &str) -> Option<Vec<GpuDevice>> {
    let p = gpu::probe();
    assert!(p.is_usable(), "{test}: no usable GPU: {}", p.reason());
    Some(p.devices)
}

/// Runs a test body once per available CUDA device (candle's `test_device!`, with the CPU head as
/// the fixed reference instead of a device variant).
macro_rules! gpu_test {
    ($name:ident, $body:ident) => {
        #[cfg_attr(
            not(have_gpu),
            ignore = "needs a CUDA GPU: on a GPU machine run scripts/gpu-check (--include-ignored)"
        )]
        #[test]
        fn $name() {
            let Some(devices) = devices_or_skip(stringify!($name)) else {
                return;
            };
            for d in devices {
                eprintln!("{}: gpu {} ({})", stringify!($name), d.ordinal, d.name);
                $body(d.ordinal);
            }
        }
    };
}

/// splitmix64: deterministic test data without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
}

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// One shape to test.
#[derive(Clone, Copy, Debug)]
struct Case {
    grid: usize,
    size: usize,
    dim: usize,
    layers: usize,
    out_h: usize,
    out_w: usize,
    sigma: f32,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "g{}-s{}-d{}-L{}-o{}x{}-sig{}",
            self.grid, self.size, self.dim, self.layers, self.out_h, self.out_w, self.sigma
        )
    }
    fn cfg(&self) -> HeadConfig {
        HeadConfig {
            size: self.size,
            grid: self.grid,
            dim: self.dim,
            tau: 0.07,
            sigma: self.sigma,
        }
    }
}

/// Random text constant and features for a case.
struct Inputs {
    text: Vec<f32>,
    global: Vec<f32>,
    locals: Vec<Vec<f32>>,
}

fn inputs(case: &Case, seed: u64) -> Inputs {
    let mut rng = Rng(seed);
    let d = case.dim;
    let tn = normalised(rng.vec(d));
    let ta = normalised(rng.vec(d));
    let text = [tn, ta].concat();
    let global = rng.vec(d);
    let locals = (0..case.layers)
        .map(|_| rng.vec(case.grid * case.grid * d))
        .collect();
    Inputs {
        text,
        global,
        locals,
    }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn report(kernel: &str, case: &Case, delta: f32, tol: f32) {
    println!(
        "PARITY kernel={kernel} case={} max_abs={delta:.3e}",
        case.name()
    );
    assert!(
        delta <= tol,
        "{kernel} on {}: max |Δ| {delta:e} > {tol:e}",
        case.name()
    );
}

fn median(v: &[f32]) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(f32::total_cmp);
    s[s.len() / 2]
}

/// Every kernel in isolation and the whole head end to end, for one case on one device.
fn check_case(ordinal: usize, case: Case, seed: u64) {
    let cfg = case.cfg();
    let inp = inputs(&case, seed);
    let locals: Vec<&[f32]> = inp.locals.iter().map(|v| v.as_slice()).collect();

    // CPU reference, end to end.
    let mut cpu = CpuHead::new(cfg, &inp.text).expect("cpu head");
    let mut cpu_out = HeadOutput::new(&cfg);
    cpu.run(&inp.global, &locals, &mut cpu_out)
        .expect("cpu run");
    let cpu_final = if (case.out_h, case.out_w) == (case.size, case.size) {
        cpu_out.map.clone()
    } else {
        resize_map(&cpu_out.map, case.size, case.size, case.out_h, case.out_w)
    };
    let thr = median(&cpu_final);

    let mut head =
        GpuHead::new(ordinal, &inp.text, &cfg, case.out_h, case.out_w).expect("gpu head");
    head.set_threshold(thr);
    let out = head.run_host(&inp.global, &locals).expect("gpu run");

    // (a) head_tokens: score and summed patch probabilities against the CPU head.
    report("score", &case, (out.score - cpu_out.score).abs(), TOL);
    let patch = head.download_stage(Stage::Patch).unwrap();
    report("head_tokens", &case, max_abs(&patch, &cpu_out.patch), TOL);

    // (b) bilinear upsample, fed the GPU's own patch map.
    let raw = head.download_stage(Stage::MapRaw).unwrap();
    let mut raw_ref = vec![0.0; case.size * case.size];
    upsample_bilinear(
        &patch,
        case.grid,
        case.grid,
        &mut raw_ref,
        case.size,
        case.size,
    );
    report("bilinear_upsample", &case, max_abs(&raw, &raw_ref), TOL);

    // (c) Gaussian (gauss_cols + gauss_rows), fed the GPU's own raw map.
    let smooth = head.download_stage(Stage::MapSmoothed).unwrap();
    let mut smooth_ref = raw.clone();
    if case.sigma > 0.0 {
        let k = gaussian_kernel(case.sigma, GAUSSIAN_TRUNCATE);
        gaussian_blur(&mut smooth_ref, case.size, case.size, &k, &mut Vec::new());
    }
    report("gaussian", &case, max_abs(&smooth, &smooth_ref), TOL);

    // (d) bilinear resize to the frame, fed the GPU's own smoothed map.
    let map = head.download_map().unwrap();
    let map_ref = resize_map(&smooth, case.size, case.size, case.out_h, case.out_w);
    report("bilinear_resize", &case, max_abs(&map, &map_ref), TOL);

    // (e) map_stats on the GPU's own final map: exact.
    let st = map_stats(&map, thr);
    report("map_stats_max", &case, (out.map_max - st.max).abs(), 0.0);
    assert_eq!(out.above, st.above, "map_stats count on identical input");
    assert_eq!(out.area, st.area, "map_stats area on identical input");

    // (f) quantisation and mask of the GPU's own final map: exact.
    let q = head.download_u8().unwrap();
    let mut q_ref = vec![0u8; map.len()];
    quantize_u8(&map, &mut q_ref);
    let q_diff = q.iter().zip(&q_ref).filter(|(a, b)| a != b).count();
    report("quantize_u8", &case, q_diff as f32, 0.0);
    let mask = head.download_mask().unwrap();
    let mut mask_ref = vec![0u8; map.len()];
    binary_mask(&map, thr, &mut mask_ref);
    let m_diff = mask.iter().zip(&mask_ref).filter(|(a, b)| a != b).count();
    report("binary_mask", &case, m_diff as f32, 0.0);

    // End to end: GPU pipeline vs CPU pipeline.
    report("end_to_end_map", &case, max_abs(&map, &cpu_final), TOL);
    let cpu_st = map_stats(&cpu_final, thr);
    report(
        "end_to_end_max",
        &case,
        (out.map_max - cpu_st.max).abs(),
        TOL,
    );
    let lo = map_stats(&cpu_final, thr + TOL).above;
    let hi = map_stats(&cpu_final, thr - TOL).above;
    println!(
        "COUNT case={} gpu={} cpu={} band=[{lo}, {hi}]",
        case.name(),
        out.above,
        cpu_st.above
    );
    assert!(
        (lo..=hi).contains(&out.above),
        "above: gpu {} outside the CPU band [{lo}, {hi}] (cpu {})",
        out.above,
        cpu_st.above
    );
    let mut cpu_q = vec![0u8; map.len()];
    quantize_u8(&cpu_final, &mut cpu_q);
    let q_far = q
        .iter()
        .zip(&cpu_q)
        .filter(|(a, b)| a.abs_diff(**b) > 1)
        .count();
    assert_eq!(q_far, 0, "u8 maps differ by more than one step");

    // The device-input path gives bit-identical results to the host-input path.
    let stream = head.stream().clone();
    let g_dev = stream.clone_htod(&inp.global).unwrap();
    let l_dev: Vec<_> = inp
        .locals
        .iter()
        .map(|l| stream.clone_htod(l).unwrap())
        .collect();
    let views: Vec<_> = l_dev.iter().map(|s| s.as_view()).collect();
    let out_dev = head
        .run_device(&g_dev.as_view(), &views)
        .expect("run_device");
    assert_eq!(out_dev, out, "run_device vs run_host");
    assert_eq!(
        head.download_map().unwrap(),
        map,
        "run_device map vs run_host map"
    );
}

const SMALL: Case = Case {
    grid: 8,
    size: 112,
    dim: 64,
    layers: 1,
    out_h: 112,
    out_w: 112,
    sigma: 4.0,
};

const REAL: Case = Case {
    grid: 37,
    size: 518,
    dim: 768,
    layers: 1,
    out_h: 518,
    out_w: 518,
    sigma: 4.0,
};

fn small_model(ordinal: usize) {
    check_case(ordinal, SMALL, 1);
    check_case(
        ordinal,
        Case {
            layers: 2,
            out_h: 333,
            out_w: 517,
            ..SMALL
        },
        2,
    );
}

fn real_model_model_size(ordinal: usize) {
    check_case(ordinal, REAL, 3);
}

fn real_model_1080p(ordinal: usize) {
    check_case(
        ordinal,
        Case {
            out_h: 1080,
            out_w: 1920,
            ..REAL
        },
        4,
    );
}

fn real_model_four_layers_odd_frame(ordinal: usize) {
    check_case(
        ordinal,
        Case {
            layers: 4,
            out_h: 333,
            out_w: 517,
            ..REAL
        },
        5,
    );
}

fn odd_and_tiny_maps(ordinal: usize) {
    // Odd sizes, a dim that is not a multiple of 32, a downscale in one axis.
    check_case(
        ordinal,
        Case {
            grid: 5,
            size: 97,
            dim: 50,
            layers: 3,
            out_h: 61,
            out_w: 203,
            sigma: 4.0,
        },
        6,
    );
    // A map smaller than the Gaussian radius (16): scipy's repeated reflection.
    check_case(
        ordinal,
        Case {
            grid: 3,
            size: 12,
            dim: 33,
            layers: 1,
            out_h: 12,
            out_w: 12,
            sigma: 4.0,
        },
        7,
    );
    // No blur, another sigma.
    check_case(
        ordinal,
        Case {
            sigma: 0.0,
            ..SMALL
        },
        8,
    );
    check_case(
        ordinal,
        Case {
            sigma: 2.5,
            ..SMALL
        },
        9,
    );
}

fn rejects_bad_input(ordinal: usize) {
    let inp = inputs(&SMALL, 10);
    let mut head = GpuHead::new(ordinal, &inp.text, &SMALL.cfg(), 112, 112).unwrap();
    let l: &[f32] = &inp.locals[0];
    let err = head.run_host(&inp.global[..10], &[l]).unwrap_err();
    assert!(matches!(err, GpuError::Input(_)), "{err}");
    let err = head.run_host(&inp.global, &[&l[1..]]).unwrap_err();
    assert!(matches!(err, GpuError::Input(_)), "{err}");
    let err = head.run_host(&inp.global, &[l, l, l, l, l]).unwrap_err();
    assert!(matches!(err, GpuError::Input(_)), "{err}");
    let err = head.run_host(&inp.global, &[]).unwrap_err();
    assert!(matches!(err, GpuError::Input(_)), "{err}");
    // Still usable after rejected input.
    head.run_host(&inp.global, &[l]).unwrap();
    let err = GpuHead::new(usize::MAX, &inp.text, &SMALL.cfg(), 112, 112).unwrap_err();
    assert!(matches!(err, GpuError::NoDevice { .. }), "{err}");
}

/// `run_frame` (the scorer's call) against `run_host` and against the CPU head through the same
/// interface; a threshold equal to a map value counts that pixel.
fn run_frame_and_threshold(ordinal: usize) {
    let case = SMALL;
    let inp = inputs(&case, 12);
    let locals: Vec<&[f32]> = inp.locals.iter().map(|v| v.as_slice()).collect();
    let mut gpu_head = GpuHead::new(ordinal, &inp.text, &case.cfg(), 112, 112).unwrap();
    let mut cpu_head = CpuHead::new(case.cfg(), &inp.text).unwrap();
    assert_eq!(
        (gpu_head.device(), gpu_head.reads_device_memory()),
        ("gpu", true)
    );
    let host = HeadInput::Host {
        global: &inp.global,
        locals: &locals,
    };
    let first = gpu_head.run_frame(host, 0.0).expect("gpu run_frame");
    let thr = first.stats.max; // a value the GPU map holds exactly
    let frame = gpu_head.run_frame(host, thr).expect("gpu run_frame");
    gpu_head.set_threshold(thr);
    let out = gpu_head.run_host(&inp.global, &locals).unwrap();
    assert_eq!(frame.score, out.score);
    assert_eq!(
        (frame.stats.max, frame.stats.above, frame.stats.area),
        (out.map_max, out.above, out.area)
    );
    assert_eq!(frame.map, gpu_head.download_map().unwrap());
    assert_eq!(
        frame.stats,
        map_stats(&frame.map, thr),
        "kernel stats = host stats"
    );
    let at_max = frame.map.iter().filter(|&&v| v == thr).count();
    assert!(at_max >= 1);
    assert_eq!(
        frame.stats.above, at_max,
        "a pixel equal to the threshold counts"
    );
    let mask = gpu_head.download_mask().unwrap();
    assert_eq!(
        mask.iter().filter(|&&m| m == 255).count(),
        at_max,
        "the mask kernel sets pixels equal to the threshold"
    );
    let cpu = cpu_head.run_frame(host, thr).expect("cpu run_frame");
    report(
        "run_frame_score",
        &case,
        (frame.score - cpu.score).abs(),
        TOL,
    );
    report("run_frame_map", &case, max_abs(&frame.map, &cpu.map), TOL);
    report(
        "run_frame_max",
        &case,
        (frame.stats.max - cpu.stats.max).abs(),
        TOL,
    );
}

/// NaN or infinity in the features fails the frame with the feature named (host input; the
/// device-input path is checked through the scorer in `tests/gpu_engine.rs`).
fn non_finite_features(ordinal: usize) {
    let inp = inputs(&SMALL, 13);
    let mut head = GpuHead::new(ordinal, &inp.text, &SMALL.cfg(), 112, 112).unwrap();
    let good: Vec<&[f32]> = inp.locals.iter().map(|v| v.as_slice()).collect();
    let mut global = inp.global.clone();
    global[3] = f32::NAN;
    let mut local = inp.locals[0].clone();
    local[100] = f32::INFINITY;
    for (g, l, what) in [
        (&global[..], &good[0], FrameValue::GlobalFeature),
        (
            &inp.global[..],
            &&local[..],
            FrameValue::LocalFeatures { layer: 0 },
        ),
    ] {
        let locals = [*l];
        match head.run_frame(
            HeadInput::Host {
                global: g,
                locals: &locals,
            },
            0.5,
        ) {
            Err(HeadError::NonFinite(n)) => assert_eq!((n.what, n.count), (what, 1)),
            other => panic!("expected a non-finite error for {what}, got {other:?}"),
        }
    }
    // Still usable.
    let ok = head
        .run_frame(
            HeadInput::Host {
                global: &inp.global,
                locals: &good,
            },
            0.5,
        )
        .expect("finite frame");
    assert_eq!(ok.stats.non_finite, 0);
}

/// The mask the daemon renders on the CPU from the model-size map equals the GPU head's own
/// resize + quantisation at the mask size (`out_h = out_w = mask size`).
fn mask_equals_gpu_quantisation(ordinal: usize) {
    let case = SMALL;
    let inp = inputs(&case, 14);
    let locals: Vec<&[f32]> = inp.locals.iter().map(|v| v.as_slice()).collect();
    let mut model_size = GpuHead::new(ordinal, &inp.text, &case.cfg(), 112, 112).unwrap();
    model_size.run_host(&inp.global, &locals).unwrap();
    let map = model_size.download_map().unwrap();
    let thr = median(&map);
    for m in [32usize, 128] {
        let mut head = GpuHead::new(ordinal, &inp.text, &case.cfg(), m, m).unwrap();
        head.set_threshold(thr);
        head.run_host(&inp.global, &locals).unwrap();
        let gpu_map = head.download_map().unwrap();
        let gray = render_mask(&map, 112, 112, m as u32, MaskKind::GrayMap, thr);
        let q = head.download_u8().unwrap();
        let q_diff = gray.iter().zip(&q).filter(|(a, b)| a != b).count();
        let q_far = gray
            .iter()
            .zip(&q)
            .filter(|(a, b)| a.abs_diff(**b) > 1)
            .count();
        println!("MASK size={m} gray_differing={q_diff}");
        assert_eq!(
            q_far, 0,
            "gray mask {m}: levels differ by more than one step"
        );
        let binary = render_mask(&map, 112, 112, m as u32, MaskKind::Binary, thr);
        let mask = head.download_mask().unwrap();
        // A pixel within the resize's rounding (1e-5) of the threshold may fall either side.
        let bad = binary
            .iter()
            .zip(&mask)
            .zip(&gpu_map)
            .filter(|((a, b), v)| a != b && (**v - thr).abs() > TOL)
            .count();
        assert_eq!(bad, 0, "binary mask {m}");
    }
}

gpu_test!(parity_small_model, small_model);
gpu_test!(
    run_frame_matches_run_host_and_counts_the_threshold,
    run_frame_and_threshold
);
gpu_test!(non_finite_features_fail_the_frame, non_finite_features);
gpu_test!(
    rendered_mask_equals_the_gpu_heads_quantisation,
    mask_equals_gpu_quantisation
);
gpu_test!(parity_real_model_518, real_model_model_size);
gpu_test!(parity_real_model_1080p, real_model_1080p);
gpu_test!(
    parity_real_model_four_layers_333x517,
    real_model_four_layers_odd_frame
);
gpu_test!(parity_odd_and_tiny_maps, odd_and_tiny_maps);
gpu_test!(rejects_bad_input_with_errors, rejects_bad_input);

/// Runs everywhere: without a GPU, building a head is an error value, never a panic; with one, it
/// must succeed.
#[test]
fn no_gpu_is_an_error_not_a_panic() {
    let inp = inputs(&SMALL, 11);
    let usable = gpu::probe().is_usable();
    match GpuHead::new(0, &inp.text, &SMALL.cfg(), 112, 112) {
        Ok(head) => println!("gpu present: {}", head.device_name()),
        Err(e) if usable => panic!("the probe found a usable GPU but the head failed: {e}"),
        Err(e) => {
            println!("no gpu head here: {e}");
            assert!(
                matches!(
                    e,
                    GpuError::DriverMissing
                        | GpuError::NvrtcMissing { .. }
                        | GpuError::NoDevice { .. }
                ),
                "unexpected error without a GPU: {e}"
            );
        }
    }
}
