//! The resampler and the normalisation against Pillow 13 / torch (`tests/fixtures/resize`):
//! every resize is required to be bit-exact, and so is the normalised tensor.

use crate::common;

use anomalyclip_edge::preprocess::{
    CLIP_MEAN, CLIP_STD, Filter, PreprocessError, Preprocessor, Resizer, preprocess_rgb, resize_u8,
    to_chw_normalised,
};
use common::{Blob, usize_of};
use serde_json::Value;
use sha2::{Digest, Sha256};

const MEAN: [f32; 3] = CLIP_MEAN;
const STD: [f32; 3] = CLIP_STD;

fn filter(v: &Value) -> Filter {
    match v.as_str().unwrap() {
        "bicubic" => Filter::Bicubic,
        "bilinear" => Filter::Bilinear,
        "nearest" => Filter::Nearest,
        other => panic!("unknown filter {other}"),
    }
}

/// The generated frame of `make_head_fixtures.py::pattern`, rebuilt bit for bit.
fn pattern(width: usize, height: usize, channels: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(width * height * channels);
    for y in 0..height as u64 {
        for x in 0..width as u64 {
            for c in 0..channels as u64 {
                let h = ((x.wrapping_mul(73856093))
                    ^ (y.wrapping_mul(19349663))
                    ^ (c.wrapping_mul(83492791)))
                    & 0xFFFF_FFFF;
                let noise = (h.wrapping_mul(2654435761) & 0xFFFF_FFFF) >> 24;
                let gx = x * 255 / (width as u64 - 1).max(1);
                let gy = y * 255 / (height as u64 - 1).max(1);
                let grad = (gx + gy * (c + 1)) & 255;
                out.push(((noise + grad) / 2) as u8);
            }
        }
    }
    out
}

fn hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn raw_channel_resizes_are_bit_exact_with_pillow() {
    let blob = Blob::open("resize");
    let cases: Vec<&Value> = blob.index["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "raw")
        .collect();
    assert!(cases.len() >= 100, "only {} raw cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let ch = usize_of(case, "channels");
        let (sw, sh) = (usize_of(case, "src_w"), usize_of(case, "src_h"));
        let (dw, dh) = (usize_of(case, "dst_w"), usize_of(case, "dst_h"));
        let src = blob.u8(&case["src"]);
        let reference = blob.u8(&case["ref"]);
        let ours = resize_u8(src, sw, sh, sw * ch, ch, dw, dh, filter(&case["filter"]));
        if ours != reference {
            let diff = ours
                .iter()
                .zip(reference)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(255);
            failures.push(format!("{} (max diff {diff})", case["name"]));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} differ: {failures:?}",
        failures.len(),
        cases.len()
    );
}

#[test]
fn large_generated_frames_are_bit_exact_with_pillow() {
    let blob = Blob::open("resize");
    for case in blob.index["hashed"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let ch = usize_of(case, "channels");
        let (sw, sh) = (usize_of(case, "src_w"), usize_of(case, "src_h"));
        let (dw, dh) = (usize_of(case, "dst_w"), usize_of(case, "dst_h"));
        let src = pattern(sw, sh, ch);
        assert_eq!(
            hex(&src),
            case["src_sha256"].as_str().unwrap(),
            "{name}: generator port"
        );
        let ours = resize_u8(&src, sw, sh, sw * ch, ch, dw, dh, filter(&case["filter"]));
        let row0: Vec<u8> = case["ref_row0"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(&ours[..row0.len()], &row0[..], "{name}: first row");
        assert_eq!(
            hex(&ours),
            case["ref_sha256"].as_str().unwrap(),
            "{name}: output hash"
        );
    }
}

#[test]
fn stride_padded_frame_equals_tight_frame() {
    let (w, h) = (97, 61);
    let tight = pattern(w, h, 3);
    for pad in [1, 2, 5, 64] {
        let stride = w * 3 + pad;
        let mut padded = vec![0xAB; stride * h];
        for y in 0..h {
            padded[y * stride..y * stride + w * 3]
                .copy_from_slice(&tight[y * w * 3..(y + 1) * w * 3]);
        }
        // The last row need not carry its padding.
        padded.truncate(stride * (h - 1) + w * 3);
        for (dw, dh, f) in [
            (37, 37, Filter::Bicubic),
            (200, 90, Filter::Bilinear),
            (50, 61, Filter::Bicubic),
            (97, 20, Filter::Bicubic),
            (33, 44, Filter::Nearest),
            (97, 61, Filter::Bicubic),
        ] {
            assert_eq!(
                resize_u8(&padded, w, h, stride, 3, dw, dh, f),
                resize_u8(&tight, w, h, w * 3, 3, dw, dh, f),
                "pad {pad}, {dw}x{dh} {f:?}"
            );
        }
        let mut a = vec![0.0; 3 * 24 * 24];
        let mut b = vec![0.0; 3 * 24 * 24];
        preprocess_rgb(&padded, w, h, stride, 24, MEAN, STD, &mut a);
        preprocess_rgb(&tight, w, h, w * 3, 24, MEAN, STD, &mut b);
        assert_eq!(a, b, "pad {pad}: preprocess_rgb");
    }
}

#[test]
fn normalised_tensor_is_bit_exact_with_torch() {
    let blob = Blob::open("resize");
    let t = &blob.index["tensor"];
    let (sw, sh, size) = (
        usize_of(t, "src_w"),
        usize_of(t, "src_h"),
        usize_of(t, "size"),
    );
    let src = blob.u8(&t["src"]);
    let reference = blob.f32(&t["ref"]);
    let resized = resize_u8(src, sw, sh, sw * 3, 3, size, size, Filter::Bicubic);
    let mut out = vec![0.0; 3 * size * size];
    to_chw_normalised(&resized, size, size, MEAN, STD, &mut out);
    assert_eq!(out, reference, "to_chw_normalised");
    let mut out2 = vec![0.0; 3 * size * size];
    preprocess_rgb(src, sw, sh, sw * 3, size, MEAN, STD, &mut out2);
    assert_eq!(out2, reference, "preprocess_rgb");
    // The reusable preprocessor gives the same, frame after frame.
    let mut pre = Preprocessor::new(sw, sh, size, MEAN, STD).unwrap();
    for _ in 0..2 {
        let mut out3 = vec![0.0; 3 * size * size];
        pre.run(src, sw * 3, &mut out3).unwrap();
        assert_eq!(out3, reference, "Preprocessor");
    }
    assert_eq!(pre.resized(), &resized[..]);
}

#[test]
fn one_pixel_images() {
    for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
        // 1×1 up: every output pixel is the input.
        let out = resize_u8(&[10, 200, 33], 1, 1, 3, 3, 5, 4, f);
        assert_eq!(out.len(), 60);
        assert!(out.chunks_exact(3).all(|p| p == [10, 200, 33]), "{f:?}");
        // To 1×1 and back.
        let src = pattern(9, 7, 1);
        assert_eq!(resize_u8(&src, 9, 7, 9, 1, 1, 1, f).len(), 1);
        assert_eq!(resize_u8(&[77], 1, 1, 1, 1, 1, 1, f), vec![77]);
    }
}

#[test]
fn resizer_reports_bad_geometry_instead_of_panicking() {
    assert!(matches!(
        Resizer::new(0, 10, 3, 5, 5, Filter::Bicubic),
        Err(PreprocessError::EmptySize { .. })
    ));
    assert!(matches!(
        Resizer::new(10, 10, 3, 5, 0, Filter::Bicubic),
        Err(PreprocessError::EmptySize { .. })
    ));
    assert!(matches!(
        Resizer::new(10, 10, 5, 5, 5, Filter::Bicubic),
        Err(PreprocessError::Channels(5))
    ));
    let mut r = Resizer::new(10, 10, 3, 5, 5, Filter::Bicubic).unwrap();
    let mut out = vec![0u8; r.output_len()];
    assert!(matches!(
        r.resize(&[0; 300], 29, &mut out),
        Err(PreprocessError::Stride {
            stride: 29,
            row: 30
        })
    ));
    assert!(matches!(
        r.resize(&[0; 299], 30, &mut out),
        Err(PreprocessError::Buffer {
            got: 299,
            need: 300
        })
    ));
    assert!(matches!(
        r.resize(&[0; 300], 30, &mut out[..10]),
        Err(PreprocessError::Buffer { .. })
    ));
    assert!(r.resize(&[0; 300], 30, &mut out).is_ok());
    assert!(resize_u8(&[], 0, 0, 0, 3, 10, 10, Filter::Bicubic).is_empty());
}

#[test]
fn avx2_and_baseline_paths_are_bit_identical() {
    let src = pattern(301, 177, 3);
    let mut outs = Vec::new();
    for enabled in [true, false] {
        anomalyclip_edge::simd::set_avx2_enabled(enabled);
        let mut v = Vec::new();
        for (w, h, f) in [
            (64, 64, Filter::Bicubic),
            (518, 400, Filter::Bilinear),
            (33, 177, Filter::Bicubic),
        ] {
            v.push(resize_u8(&src, 301, 177, 301 * 3, 3, w, h, f));
        }
        outs.push(v);
    }
    anomalyclip_edge::simd::set_avx2_enabled(true);
    assert_eq!(outs[0], outs[1]);
}
