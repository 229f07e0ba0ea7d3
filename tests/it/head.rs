//! The CPU head against the PyTorch/scipy references in `tests/fixtures/head`.
//!
//! Tolerances: upsampling, blur, kernel, patch probabilities and score |Δ| ≤ 1e-5 against float64
//! references (torch `F.interpolate`, `scipy.ndimage.gaussian_filter`, numpy); the whole head
//! |Δ| ≤ 1e-5 against the official float32 torch + scipy pipeline.

use crate::common;

use anomalyclip_edge::head::{
    CpuHead, HeadConfig, HeadError, HeadOutput, binary_mask, gaussian_blur, gaussian_kernel,
    image_score, map_stats, patch_probabilities, quantize_u8, resize_map, text_direction,
    upsample_bilinear,
};
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
    assert_eq!(s.above, 4); // strictly above
    assert!((s.area - 0.5).abs() < 1e-7);
    let mut mask = [0u8; 8];
    binary_mask(&map, 0.5, &mut mask);
    assert_eq!(mask, [0, 0, 0, 255, 255, 255, 0, 255]);
    let mut q = [0u8; 8];
    quantize_u8(&map, &mut q);
    assert_eq!(q, [0, 51, 128, 130, 255, 255, 0, 255]);
    let mut nan = [7u8; 1];
    quantize_u8(&[f32::NAN], &mut nan);
    assert_eq!(nan, [0]);
    let empty = map_stats(&[], 0.5);
    assert_eq!((empty.above, empty.area), (0, 0.0));
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
