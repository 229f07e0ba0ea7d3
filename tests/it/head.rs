//! The CPU head against the PyTorch/scipy references in `tests/fixtures/head`.
//!
//! Tolerances: upsampling, blur, kernel, patch probabilities and score |Δ| ≤ 1e-5 against float64
//! references (torch `F.interpolate`, `scipy.ndimage.gaussian_filter`, numpy); the whole head
//! |Δ| ≤ 1e-5 against the official float32 torch + scipy pipeline.
//!
//! Also the head interface ([`AnomalyHead`]) of the CPU head: the pixel threshold's one meaning
//! (`value >= pixel_threshold`), non-finite features and outputs, and the mask renderer using the
//! head's resize and quantisation.

use crate::common;

use anomalyclip_edge::head::render_mask;
use anomalyclip_edge::head::{
    AnomalyHead, CpuHead, FrameValue, HeadConfig, HeadError, HeadInput, HeadOutput, NonFinite,
    binary_mask, gaussian_blur, gaussian_kernel, image_score, map_stats, patch_probabilities,
    quantize_u8, resize_map, text_direction, upsample_bilinear,
};
use anomalyclip_edge::payload::MaskKind;
use common::{f32_file, index, max_abs_diff, subgrid, usize_of};

const SUB: &str = "head";
const TOL: f32 = 1e-5;

#[test]
fn gaussian_kernel_matches_scipy() {
    let idx = index(SUB);
    let k = &idx["kernel"];
    let reference = f32_file(SUB, &k["ref"]);
    let ours = gaussian_kernel(4.0, 4.0);
    assert_eq!(ours.len(), 33);
    assert_eq!(ours.len(), usize_of(k, "taps"));
    let (d, _) = max_abs_diff(&ours, &reference);
    assert!(d <= 1e-7, "kernel |Δ| = {d}");
    let sum: f32 = ours.iter().sum();
    assert!((sum - 1.0).abs() < 1e-6);
}

#[test]
fn upsample_matches_torch() {
    let idx = index(SUB);
    let cases = idx["upsample"].as_array().expect("upsample cases");
    assert!(cases.len() >= 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (sh, sw) = (usize_of(case, "src_h"), usize_of(case, "src_w"));
        let (dh, dw) = (usize_of(case, "dst_h"), usize_of(case, "dst_w"));
        let src = f32_file(SUB, &case["src"]);
        let reference = f32_file(SUB, &case["ref"]);
        let mut out = vec![f32::NAN; dh * dw];
        upsample_bilinear(&src, sh, sw, &mut out, dh, dw);
        let ours = if case.get("rows").is_some() {
            subgrid(&out, dw, &case["rows"], &case["cols"])
        } else {
            out.clone()
        };
        let (d, at) = max_abs_diff(&ours, &reference);
        eprintln!("upsample {name}: max |Δ| {d:.2e}");
        assert!(d <= TOL, "{name}: |Δ| = {d} at {at}");
        // resize_map is the same operation.
        assert_eq!(resize_map(&src, sh, sw, dh, dw), out, "{name}: resize_map");
    }
}

#[test]
fn blur_matches_scipy_reflect() {
    let idx = index(SUB);
    let cases = idx["blur"].as_array().expect("blur cases");
    let kernel = gaussian_kernel(4.0, 4.0);
    let mut scratch = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (h, w) = (usize_of(case, "h"), usize_of(case, "w"));
        let mut map = if let Some(q) = case.get("src_u8") {
            let raw = common::bytes(&common::fixtures(SUB).join(q.as_str().unwrap()));
            raw.iter().map(|&v| f32::from(v) / 255.0).collect()
        } else {
            f32_file(SUB, &case["src"])
        };
        assert_eq!(map.len(), h * w, "{name}");
        let reference = f32_file(SUB, &case["ref"]);
        gaussian_blur(&mut map, h, w, &kernel, &mut scratch);
        let ours = if case.get("rows").is_some() {
            subgrid(&map, w, &case["rows"], &case["cols"])
        } else {
            map
        };
        let (d, at) = max_abs_diff(&ours, &reference);
        eprintln!("blur {name}: max |Δ| {d:.2e}");
        assert!(d <= TOL, "{name}: |Δ| = {d} at {at}");
    }
}

#[test]
fn blur_of_constant_is_constant_at_every_size() {
    // Reflection keeps a constant map constant, however small the map is against the radius.
    let kernel = gaussian_kernel(4.0, 4.0);
    let mut scratch = Vec::new();
    for (h, w) in [(1, 1), (1, 2), (2, 1), (3, 7), (16, 16), (17, 40), (33, 34)] {
        let mut map = vec![0.75f32; h * w];
        gaussian_blur(&mut map, h, w, &kernel, &mut scratch);
        for v in map {
            assert!((v - 0.75).abs() < 1e-6, "{h}x{w}: {v}");
        }
    }
}

#[test]
fn patch_probabilities_and_score_match_numpy() {
    let idx = index(SUB);
    for case in idx["patch"].as_array().expect("patch cases") {
        let name = case["name"].as_str().unwrap();
        let (n, dim) = (usize_of(case, "n"), usize_of(case, "dim"));
        let tau = case["tau"].as_f64().unwrap() as f32;
        let text = f32_file(SUB, &case["text"]);
        let tokens = f32_file(SUB, &case["tokens"]);
        let global = f32_file(SUB, &case["global"]);
        let w = text_direction(&text, dim, tau);
        let (dw, _) = max_abs_diff(&w, &f32_file(SUB, &case["w"]));
        assert!(dw <= 1e-4, "{name}: w |Δ| = {dw}"); // |w| ~ 20: relative 5e-6
        let mut probs = vec![0.0; n];
        patch_probabilities(&tokens, dim, &w, &mut probs);
        let (d, at) = max_abs_diff(&probs, &f32_file(SUB, &case["probs"]));
        eprintln!(
            "patch {name}: probs max |Δ| {d:.2e}, score |Δ| {:.2e}",
            (image_score(&global, &w) - case["score"].as_f64().unwrap() as f32).abs()
        );
        assert!(d <= TOL, "{name}: probs |Δ| = {d} at {at}");
        let score = image_score(&global, &w);
        let reference = case["score"].as_f64().unwrap() as f32;
        assert!(
            (score - reference).abs() <= TOL,
            "{name}: score {score} vs {reference}"
        );
    }
}

#[test]
fn full_head_matches_official_pipeline() {
    let idx = index(SUB);
    for case in idx["full"].as_array().expect("full cases") {
        let name = case["name"].as_str().unwrap();
        let config = HeadConfig {
            size: usize_of(case, "size"),
            grid: usize_of(case, "grid"),
            dim: usize_of(case, "dim"),
            tau: case["tau"].as_f64().unwrap() as f32,
            sigma: case["sigma"].as_f64().unwrap() as f32,
        };
        let text = f32_file(SUB, &case["text"]);
        let global = f32_file(SUB, &case["global"]);
        let locals: Vec<Vec<f32>> = case["locals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f32_file(SUB, f))
            .collect();
        let refs: Vec<&[f32]> = locals.iter().map(Vec::as_slice).collect();
        let mut head = CpuHead::new(config, &text).expect("head builds");
        let mut out = HeadOutput::new(&config);
        head.run(&global, &refs, &mut out).expect("head runs");
        let score = case["score"].as_f64().unwrap() as f32;
        assert!(
            (out.score - score).abs() <= TOL,
            "{name}: score {} vs {score}",
            out.score
        );
        for (what, ours, file) in [
            ("patch", &out.patch, &case["patch"]),
            ("map_raw", &out.map_raw, &case["map_raw"]),
            ("map", &out.map, &case["map"]),
        ] {
            let (d, at) = max_abs_diff(ours, &f32_file(SUB, file));
            eprintln!("full {name} {what}: max |Δ| {d:.2e}");
            assert!(d <= TOL, "{name}: {what} |Δ| = {d} at {at}");
        }
        // Running again on the same buffers gives the same result (no state leaks between frames).
        let first = out.clone();
        head.run(&global, &refs, &mut out).expect("head runs");
        assert_eq!(first, out, "{name}: second run differs");
    }
}

#[test]
fn head_rejects_bad_shapes_without_panicking() {
    let config = HeadConfig {
        size: 16,
        grid: 2,
        dim: 4,
        tau: 0.07,
        sigma: 4.0,
    };
    let text = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
    assert!(matches!(
        CpuHead::new(config, &text[..7]),
        Err(HeadError::Text { got: 7, dim: 4 })
    ));
    for bad in [
        HeadConfig { size: 0, ..config },
        HeadConfig { grid: 0, ..config },
        HeadConfig { tau: 0.0, ..config },
        HeadConfig {
            tau: f32::NAN,
            ..config
        },
        HeadConfig {
            sigma: -1.0,
            ..config
        },
    ] {
        assert!(matches!(
            CpuHead::new(bad, &text),
            Err(HeadError::Config(_))
        ));
    }
    let mut head = CpuHead::new(config, &text).unwrap();
    let mut out = HeadOutput::default();
    let local = vec![0.5f32; 16];
    assert!(matches!(
        head.run(&[1.0; 3], &[&local], &mut out),
        Err(HeadError::Shape { .. })
    ));
    assert!(matches!(
        head.run(&[1.0; 4], &[&local[..15]], &mut out),
        Err(HeadError::Shape { .. })
    ));
    assert!(matches!(
        head.run(&[1.0; 4], &[], &mut out),
        Err(HeadError::NoLayers)
    ));
    // Buffers of the wrong size are resized, zero features give probability 0.5, sigma 0 = no blur.
    let mut head = CpuHead::new(
        HeadConfig {
            sigma: 0.0,
            ..config
        },
        &text,
    )
    .unwrap();
    head.run(&[0.0; 4], &[&[0.0; 16]], &mut out).unwrap();
    assert_eq!(out.score, 0.5);
    assert_eq!(out.map.len(), 256);
    assert!(out.map.iter().all(|&v| v == 0.5));
}

#[test]
fn map_stats_mask_and_quantize() {
    let map = [0.0, 0.2, 0.5, 0.51, 1.0, 1.5, -0.3, 0.999];
    let s = map_stats(&map, 0.5);
    assert_eq!(s.max, 1.5);
    assert_eq!(s.above, 5); // at or above: 0.5 counts
    assert!((s.area - 0.625).abs() < 1e-7);
    assert_eq!(s.non_finite, 0);
    let mut mask = [0u8; 8];
    binary_mask(&map, 0.5, &mut mask);
    assert_eq!(mask, [0, 0, 255, 255, 255, 255, 0, 255]);
    let mut q = [0u8; 8];
    quantize_u8(&map, &mut q);
    assert_eq!(q, [0, 51, 128, 130, 255, 255, 0, 255]);
    let mut nan = [7u8; 1];
    quantize_u8(&[f32::NAN], &mut nan);
    assert_eq!(nan, [0]);
    let empty = map_stats(&[], 0.5);
    assert_eq!((empty.above, empty.area), (0, 0.0));
    let odd = map_stats(&[f32::NAN, f32::INFINITY, 0.7, f32::NEG_INFINITY], 0.5);
    assert_eq!((odd.non_finite, odd.max), (3, f32::INFINITY));
}

/// A small head: 2×2 patches of dimension 4, 16×16 map, no blur (so a constant patch map gives
/// exactly that constant everywhere), text directions along the first two axes.
fn small_head(sigma: f32) -> CpuHead {
    let config = HeadConfig {
        size: 16,
        grid: 2,
        dim: 4,
        tau: 0.07,
        sigma,
    };
    CpuHead::new(config, &[1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]).unwrap()
}

fn run_frame(
    head: &mut dyn AnomalyHead,
    global: &[f32],
    locals: &[&[f32]],
    pixel_threshold: f32,
) -> Result<anomalyclip_edge::head::HeadFrame, HeadError> {
    head.run_frame(HeadInput::Host { global, locals }, pixel_threshold)
}

#[test]
fn a_map_value_equal_to_the_pixel_threshold_counts_toward_area_and_the_mask() {
    // The free functions.
    let map = [0.25f32, 0.5, 0.5, 0.75];
    assert_eq!(map_stats(&map, 0.5).above, 3);
    assert_eq!(map_stats(&map, 0.75).above, 1);
    let mut mask = [0u8; 4];
    binary_mask(&map, 0.75, &mut mask);
    assert_eq!(mask, [0, 0, 0, 255]);
    // The mask renderer: a constant map equal to the threshold is all set.
    assert_eq!(
        render_mask(&[0.5; 4], 2, 2, 8, MaskKind::Binary, 0.5),
        vec![255; 64]
    );
    // The head: zero features give probability 0.5 exactly on every pixel (no blur).
    let mut head = small_head(0.0);
    let f = run_frame(&mut head, &[0.0; 4], &[&[0.0; 16]], 0.5).unwrap();
    assert!(f.map.iter().all(|&v| v == 0.5));
    assert_eq!((f.stats.above, f.stats.area, f.stats.max), (256, 1.0, 0.5));
    // Any map: its own maximum as the threshold counts at least that pixel.
    let mut head = small_head(4.0);
    let local: Vec<f32> = (0..16).map(|i| (i as f32 * 0.7).sin()).collect();
    let f = run_frame(&mut head, &[0.3, -0.2, 0.5, 0.1], &[&local], 0.0).unwrap();
    let g = run_frame(&mut head, &[0.3, -0.2, 0.5, 0.1], &[&local], f.stats.max).unwrap();
    let at_max = f.map.iter().filter(|&&v| v == f.stats.max).count();
    assert!(at_max >= 1);
    assert_eq!(g.stats.above, at_max);
}

#[test]
fn run_frame_gives_the_heads_map_and_its_stats_at_the_callers_threshold() {
    let mut head = small_head(4.0);
    let global = [0.3, -0.2, 0.5, 0.1];
    let l0: Vec<f32> = (0..16).map(|i| (i as f32 * 0.7).sin()).collect();
    let l1: Vec<f32> = (0..16).map(|i| (i as f32 * 1.3).cos()).collect();
    let mut out = HeadOutput::default();
    head.run(&global, &[&l0, &l1], &mut out).unwrap();
    for thr in [0.0, 0.9, 1.0, 1.1, 2.0] {
        let f = run_frame(&mut head, &global, &[&l0, &l1], thr).unwrap();
        assert_eq!(f.score, out.score);
        assert_eq!(f.map, out.map);
        assert_eq!((f.height, f.width), (16, 16));
        assert_eq!(f.stats, map_stats(&out.map, thr));
    }
    assert_eq!(head.device(), "cpu");
    assert!(!head.reads_device_memory());
}

/// The failure of one frame, which must be [`HeadError::NonFinite`].
fn non_finite(r: Result<anomalyclip_edge::head::HeadFrame, HeadError>) -> NonFinite {
    match r {
        Err(HeadError::NonFinite(n)) => n,
        other => panic!("expected a non-finite error, got {other:?}"),
    }
}

#[test]
fn nan_or_infinite_features_fail_the_frame_naming_the_feature() {
    let mut head = small_head(4.0);
    let local = vec![0.5f32; 16];
    let mut bad_local = local.clone();
    bad_local[5] = f32::NAN;
    let mut inf_local = local.clone();
    inf_local[0] = f32::INFINITY;
    inf_local[9] = f32::NEG_INFINITY;

    let n = non_finite(run_frame(
        &mut head,
        &[f32::NAN, 0.0, 1.0, 0.0],
        &[&local],
        0.5,
    ));
    assert_eq!(n.what, FrameValue::GlobalFeature);
    assert_eq!(n.count, 1);
    // An infinite global feature used to give `"score": null`.
    let n = non_finite(run_frame(&mut head, &[f32::INFINITY; 4], &[&local], 0.5));
    assert_eq!((n.what, n.count), (FrameValue::GlobalFeature, 4));
    let n = non_finite(run_frame(&mut head, &[1.0; 4], &[&local, &bad_local], 0.5));
    assert_eq!(n.what, FrameValue::LocalFeatures { layer: 1 });
    let n = non_finite(run_frame(&mut head, &[1.0; 4], &[&inf_local], 0.5));
    assert_eq!(
        (n.what, n.count),
        (FrameValue::LocalFeatures { layer: 0 }, 2)
    );
    let msg = HeadError::from(n).to_string();
    assert!(
        msg.contains("non-finite") && msg.contains("local features of layer 0"),
        "{msg}"
    );
    // The head is still usable, and a finite frame scores normally.
    let f = run_frame(&mut head, &[1.0; 4], &[&local], 0.5).unwrap();
    assert!(f.score.is_finite() && f.map.iter().all(|v| v.is_finite()));
}

#[test]
fn a_finite_feature_that_overflows_the_head_names_the_heads_output() {
    let mut head = small_head(4.0);
    let local = vec![0.5f32; 16];
    // ⟨g, w⟩ and ‖g‖² both overflow to infinity: inf / inf.
    let n = non_finite(run_frame(&mut head, &[3e38, 0.0, 0.0, 0.0], &[&local], 0.5));
    assert_eq!((n.what, n.count), (FrameValue::Score, 1));
    let mut big = local.clone();
    big[0] = -3e38;
    let n = non_finite(run_frame(&mut head, &[1.0; 4], &[&big], 0.5));
    assert_eq!(n.what, FrameValue::Map);
    assert!(n.count >= 1);
}

/// Regression: a NaN feature was treated like a zero vector and gave probability 0.5 — at the
/// default threshold, an anomaly.
#[test]
fn a_nan_feature_is_not_scored_as_probability_one_half() {
    let w = [1.0, -1.0, 0.5, 2.0];
    assert!(image_score(&[f32::NAN, 1.0, 1.0, 1.0], &w).is_nan());
    let mut out = [0.0f32; 2];
    patch_probabilities(
        &[1.0, 1.0, 1.0, 1.0, 1.0, f32::NAN, 1.0, 1.0],
        4,
        &w,
        &mut out,
    );
    assert!(out[0].is_finite() && out[1].is_nan(), "{out:?}");
    // A zero vector still gives 0.5.
    assert_eq!(image_score(&[0.0; 4], &w), 0.5);
}

#[test]
fn render_mask_equals_the_heads_resize_and_quantisation_at_the_mask_size() {
    let mut head = small_head(4.0);
    let local: Vec<f32> = (0..16).map(|i| (i as f32 * 0.7).sin()).collect();
    let f = run_frame(&mut head, &[0.3, -0.2, 0.5, 0.1], &[&local], 0.5).unwrap();
    let thr = {
        let mut v = f.map.clone();
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    };
    for m in [8usize, 16, 37, 128] {
        let at_mask = resize_map(&f.map, 16, 16, m, m);
        let mut gray = vec![0u8; m * m];
        quantize_u8(&at_mask, &mut gray);
        let mut binary = vec![0u8; m * m];
        binary_mask(&at_mask, thr, &mut binary);
        let size = m as u32;
        assert_eq!(
            render_mask(&f.map, 16, 16, size, MaskKind::GrayMap, thr),
            gray,
            "gray {m}"
        );
        assert_eq!(
            render_mask(&f.map, 16, 16, size, MaskKind::Binary, thr),
            binary,
            "binary {m}"
        );
        // At the head's own size the mask is the head's map, quantised.
        if m == 16 {
            let mut q = vec![0u8; 256];
            quantize_u8(&f.map, &mut q);
            assert_eq!(gray, q);
        }
    }
}

#[test]
fn upsample_identity_and_single_pixel() {
    let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let mut out = vec![0.0; 12];
    upsample_bilinear(&src, 3, 4, &mut out, 3, 4);
    assert_eq!(out, src);
    let mut out = vec![0.0; 6];
    upsample_bilinear(&[0.25], 1, 1, &mut out, 2, 3);
    assert!(out.iter().all(|&v| v == 0.25));
}

#[test]
fn avx2_and_baseline_paths_are_bit_identical() {
    let idx = index(SUB);
    let case = &idx["full"][0];
    let config = HeadConfig {
        size: usize_of(case, "size"),
        grid: usize_of(case, "grid"),
        dim: usize_of(case, "dim"),
        tau: 0.07,
        sigma: 4.0,
    };
    let text = f32_file(SUB, &case["text"]);
    let global = f32_file(SUB, &case["global"]);
    let locals: Vec<Vec<f32>> = case["locals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f32_file(SUB, f))
        .collect();
    let refs: Vec<&[f32]> = locals.iter().map(Vec::as_slice).collect();
    let mut head = CpuHead::new(config, &text).unwrap();
    let mut outputs = Vec::new();
    for enabled in [true, false] {
        anomalyclip_edge::simd::set_avx2_enabled(enabled);
        let mut out = HeadOutput::new(&config);
        head.run(&global, &refs, &mut out).unwrap();
        let mut frame = vec![0.0; 45 * 80];
        upsample_bilinear(&out.map, config.size, config.size, &mut frame, 45, 80);
        outputs.push((out, frame));
    }
    anomalyclip_edge::simd::set_avx2_enabled(true);
    assert_eq!(outputs[0], outputs[1]);
}
