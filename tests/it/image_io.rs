//! Image decoding and the file path to model input, against Pillow 13 (`tests/fixtures/images`,
//! `tests/fixtures/resize`). PNG and BMP must match Pillow bit for bit (mode, pixels, RGB, resizes);
//! JPEG agreement is measured and bounded (see `jpeg_agreement_with_pillow`).

use crate::common;

use std::path::Path;

use anomalyclip_edge::image_io::{
    DecodedImage, ImageError, JpegDecoder, MAX_PIXELS, Mode, decode_image, jpeg_decoder, load_image,
};
use anomalyclip_edge::preprocess::{CLIP_MEAN, CLIP_STD, Filter, to_chw_normalised};
use common::{Blob, fixtures, usize_of};
use serde_json::Value;

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

fn mode_of(name: &str) -> Mode {
    match name {
        "1" => Mode::Bilevel,
        "L" => Mode::L,
        "LA" => Mode::LA,
        "RGB" => Mode::Rgb,
        "RGBA" => Mode::Rgba,
        "P" => Mode::P,
        "I;16" => Mode::I16,
        "CMYK" => Mode::Cmyk,
        other => panic!("unknown mode {other}"),
    }
}

fn palette(bytes: &[u8]) -> Vec<[u8; 3]> {
    bytes.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect()
}

fn diff_stats(a: &[u8], b: &[u8]) -> (u8, usize) {
    assert_eq!(a.len(), b.len());
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0);
    let count = a.iter().zip(b).filter(|(x, y)| x != y).count();
    (max, count)
}

#[test]
fn png_and_bmp_decode_like_pillow() {
    let blob = Blob::open("images");
    let mut checked = 0;
    for entry in blob.index["images"].as_array().unwrap() {
        let file = entry["file"].as_str().unwrap();
        if file.ends_with(".jpg") {
            continue;
        }
        let img = load_image(fixtures("images").join(file)).unwrap_or_else(|e| panic!("{e}"));
        let pillow_mode = entry["mode"].as_str().unwrap();
        // Pillow opens 16-bit LA PNGs as RGBA (gray replicated); we keep LA, which resizes and
        // converts to the same RGB.
        let expected_mode = if file.ends_with("la16.png") {
            Mode::LA
        } else {
            mode_of(pillow_mode)
        };
        assert_eq!(img.mode(), expected_mode, "{file}: mode");
        assert_eq!(
            (img.width(), img.height()),
            (usize_of(entry, "width"), usize_of(entry, "height")),
            "{file}"
        );
        if !file.ends_with("la16.png") {
            assert_eq!(img.data(), blob.u8(&entry["pixels"]), "{file}: pixels");
        }
        if let Some(p) = entry.get("palette") {
            assert_eq!(
                img.palette().unwrap(),
                &palette(blob.u8(p))[..],
                "{file}: palette"
            );
        }
        assert_eq!(img.to_rgb(), blob.u8(&entry["rgb"]), "{file}: to_rgb");
        for r in entry["resized"].as_array().unwrap() {
            let (w, h) = (usize_of(r, "w"), usize_of(r, "h"));
            let ours = img.resize_to_rgb(w, h, filter(&r["filter"])).unwrap();
            let reference = blob.u8(&r["rgb"]);
            assert_eq!(
                ours,
                reference,
                "{file}: resize {w}x{h} {}: {:?}",
                r["filter"],
                diff_stats(&ours, reference)
            );
        }
        checked += 1;
    }
    assert!(checked >= 26, "only {checked} PNG/BMP files checked");
}

/// JPEG through `load_image`: with libjpeg-turbo (`libturbojpeg.so.0`) the pixels, the RGB and
/// every resize must equal Pillow's. Without it the `image` crate is used and only the drift
/// bound of `image_crate_jpeg_drift` holds; set `ANOMALYCLIP_REQUIRE_TURBOJPEG=1` (CI) to fail
/// instead.
#[cfg_attr(
    not(have_turbojpeg),
    ignore = "needs libturbojpeg.so.0 (Debian package libturbojpeg0)"
)]
#[test]
fn jpeg_decodes_like_pillow_with_libjpeg_turbo() {
    if jpeg_decoder() != JpegDecoder::LibjpegTurbo {
        panic!("libturbojpeg.so.0 not found (Debian package libturbojpeg0)");
    }
    let blob = Blob::open("images");
    let mut n = 0;
    for entry in blob.index["images"].as_array().unwrap() {
        let file = entry["file"].as_str().unwrap();
        if !file.ends_with(".jpg") {
            continue;
        }
        let img = load_image(fixtures("images").join(file)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            img.mode(),
            mode_of(entry["mode"].as_str().unwrap()),
            "{file}: mode"
        );
        assert_eq!(
            img.data(),
            blob.u8(&entry["pixels"]),
            "{file}: pixels {:?}",
            diff_stats(img.data(), blob.u8(&entry["pixels"]))
        );
        assert_eq!(img.to_rgb(), blob.u8(&entry["rgb"]), "{file}: to_rgb");
        for r in entry["resized"].as_array().unwrap() {
            let (w, h) = (usize_of(r, "w"), usize_of(r, "h"));
            let ours = img.resize_to_rgb(w, h, filter(&r["filter"])).unwrap();
            assert_eq!(ours, blob.u8(&r["rgb"]), "{file}: resize {w}x{h}");
        }
        n += 1;
    }
    assert!(n >= 8, "only {n} JPEG files");
}

/// The `image` crate's decoder (zune-jpeg, the fallback) against Pillow: measured and bounded.
#[test]
fn image_crate_jpeg_drift() {
    use image::ImageDecoder;
    let blob = Blob::open("images");
    let mut report = Vec::new();
    for entry in blob.index["images"].as_array().unwrap() {
        let file = entry["file"].as_str().unwrap();
        if !file.ends_with(".jpg") || entry["mode"] == "CMYK" {
            continue;
        }
        let bytes = std::fs::read(fixtures("images").join(file)).unwrap();
        let dec = image::codecs::jpeg::JpegDecoder::new(std::io::Cursor::new(&bytes)).unwrap();
        let (w, h) = dec.dimensions();
        let mode = if dec.color_type() == image::ColorType::L8 {
            Mode::L
        } else {
            Mode::Rgb
        };
        let mut data = vec![0u8; dec.total_bytes() as usize];
        dec.read_image(&mut data).unwrap();
        let (max, count) = diff_stats(&data, blob.u8(&entry["pixels"]));
        let img = DecodedImage::from_raw(w as usize, h as usize, mode, data, None).unwrap();
        let r = &entry["resized"][0];
        let size = usize_of(r, "w");
        let ours = img.resize_to_rgb(size, size, Filter::Bicubic).unwrap();
        let mut a = vec![0.0; 3 * size * size];
        let mut b = vec![0.0; 3 * size * size];
        to_chw_normalised(&ours, size, size, MEAN, STD, &mut a);
        to_chw_normalised(blob.u8(&r["rgb"]), size, size, MEAN, STD, &mut b);
        let (tensor_d, _) = common::max_abs_diff(&a, &b);
        report.push(format!(
            "{file}: max pixel diff {max}, {count}/{} samples differ, model input |Δ| {tensor_d:.4}",
            img.data().len()
        ));
        assert!(max <= 8, "{file}: max pixel diff {max}");
    }
    eprintln!(
        "image crate (zune-jpeg) vs Pillow (libjpeg-turbo):\n  {}",
        report.join("\n  ")
    );
    assert!(report.len() >= 6);
}

#[test]
fn mode_resizes_are_bit_exact_with_pillow() {
    let blob = Blob::open("resize");
    let mut n = 0;
    for case in blob.index["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "mode")
    {
        let name = case["name"].as_str().unwrap();
        let mode = mode_of(case["mode"].as_str().unwrap());
        let (sw, sh) = (usize_of(case, "src_w"), usize_of(case, "src_h"));
        let (dw, dh) = (usize_of(case, "dst_w"), usize_of(case, "dst_h"));
        let pal = case.get("palette").map(|p| palette(blob.u8(p)));
        let img =
            DecodedImage::from_raw(sw, sh, mode, blob.u8(&case["src"]).to_vec(), pal).unwrap();
        let ours = img.resize_to_rgb(dw, dh, filter(&case["filter"])).unwrap();
        let reference = blob.u8(&case["ref"]);
        assert_eq!(
            ours,
            reference,
            "{name}: {:?}",
            diff_stats(&ours, reference)
        );
        n += 1;
    }
    assert!(n >= 80, "only {n} mode cases");
}

#[test]
fn model_input_is_resize_then_normalise() {
    let img = load_image(fixtures("images/files/rgba.png")).unwrap();
    let mut out = vec![0.0; 3 * 24 * 24];
    img.to_model_input(24, MEAN, STD, &mut out).unwrap();
    let rgb = img.resize_to_rgb(24, 24, Filter::Bicubic).unwrap();
    let mut expected = vec![0.0; 3 * 24 * 24];
    to_chw_normalised(&rgb, 24, 24, MEAN, STD, &mut expected);
    assert_eq!(out, expected);
    assert!(matches!(
        img.to_model_input(24, MEAN, STD, &mut out[..10]),
        Err(ImageError::Convert(_))
    ));
    assert!(matches!(
        img.to_model_input(0, MEAN, STD, &mut out),
        Err(ImageError::Convert(_))
    ));
}

fn assert_one_line_naming(err: &ImageError, path: &Path) {
    let text = err.to_string();
    assert!(!text.contains('\n'), "multi-line error: {text}");
    assert!(
        text.contains(&path.display().to_string()),
        "error does not name the file: {text}"
    );
}

#[test]
fn bad_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let empty = write("empty.png", b"");
    let e = load_image(&empty).unwrap_err();
    assert!(matches!(e, ImageError::Empty { .. }), "{e}");
    assert_one_line_naming(&e, &empty);

    let text = write("notes.jpg", b"this is not an image\n");
    let e = load_image(&text).unwrap_err();
    assert!(matches!(e, ImageError::Unsupported { .. }), "{e}");
    assert_one_line_naming(&e, &text);

    let missing = dir.path().join("missing.png");
    let e = load_image(&missing).unwrap_err();
    assert!(matches!(e, ImageError::Io { .. }), "{e}");
    assert_one_line_naming(&e, &missing);

    let e = load_image(dir.path()).unwrap_err();
    assert!(matches!(e, ImageError::Io { .. }), "{e}");

    for (name, kind) in [
        ("gif.gif", "unsupported"),
        ("huge.png", "large"),
        ("huge.jpg", "large"),
        ("huge.bmp", "large"),
        ("corrupt.png", "decode"),
    ] {
        let path = fixtures("images/bad").join(name);
        let e = load_image(&path).unwrap_err();
        let ok = match kind {
            "unsupported" => matches!(e, ImageError::Unsupported { .. }),
            "large" => matches!(e, ImageError::TooLarge { .. }),
            _ => matches!(e, ImageError::Decode { .. }),
        };
        assert!(ok, "{name}: {e}");
        assert_one_line_naming(&e, &path);
    }
}

#[test]
fn truncated_files_are_errors() {
    for file in [
        "rgb.png",
        "palette.png",
        "gray16.png",
        "q90_420.jpg",
        "q85_420_progressive.jpg",
        "rgb.bmp",
        "palette.bmp",
    ] {
        let path = fixtures("images/files").join(file);
        let bytes = std::fs::read(&path).unwrap();
        for cut in [1, 8, 20, 40, bytes.len() / 2, bytes.len() - 20] {
            let res = decode_image(&bytes[..cut], &path);
            // A JPEG cut inside its entropy-coded data may still decode (decoders pad with zeros,
            // as libjpeg-turbo does with a warning); anything else must be an error.
            if !file.ends_with(".jpg") || cut < bytes.len() / 2 {
                let e = res.expect_err(&format!("{file} cut at {cut} decoded"));
                assert_one_line_naming(&e, &path);
            }
        }
    }
}

#[test]
fn mutated_files_never_panic() {
    // Deterministic byte flips over every fixture file: decoding returns Ok or Err, never panics.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let dir = fixtures("images/files");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let original = std::fs::read(&path).unwrap();
        for _ in 0..40 {
            let mut bytes = original.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() as usize) % bytes.len();
                bytes[i] = next() as u8;
            }
            if let Ok(img) = decode_image(&bytes, &path) {
                let _ = img.resize_to_rgb(7, 5, Filter::Bicubic);
            }
        }
    }
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG that only has a valid IHDR for `w × h` RGB and an empty IDAT.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (tag, data) in [
        (
            &b"IHDR"[..],
            [&w.to_be_bytes()[..], &h.to_be_bytes()[..], &[8, 2, 0, 0, 0]].concat(),
        ),
        (
            &b"IDAT"[..],
            vec![0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ),
        (&b"IEND"[..], vec![]),
    ] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let chunk = [tag, &data[..]].concat();
        out.extend_from_slice(&chunk);
        out.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    out
}

#[test]
fn pixel_limit_accepts_12000_square_and_rejects_larger() {
    assert_eq!(MAX_PIXELS, 178_956_970);
    let path = Path::new("header-only.png");
    // 12000 × 12000 = 144 MP passes the size check and then fails on the missing pixel data.
    let e = decode_image(&png_header_only(12_000, 12_000), path).unwrap_err();
    assert!(matches!(e, ImageError::Decode { .. }), "{e}");
    // 13400 × 13400 = 179.6 MP is over Pillow's DecompressionBombError threshold.
    let e = decode_image(&png_header_only(13_400, 13_400), path).unwrap_err();
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("179 megapixels"), "{e}");
    let e = decode_image(&png_header_only(1 << 30, 1 << 30), path).unwrap_err();
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
}

#[test]
fn from_raw_validates() {
    assert!(DecodedImage::from_raw(2, 2, Mode::Rgb, vec![0; 11], None).is_err());
    assert!(DecodedImage::from_raw(2, 2, Mode::P, vec![0; 4], None).is_err());
    assert!(DecodedImage::from_raw(2, 2, Mode::P, vec![0; 4], Some(vec![[1, 2, 3]; 257])).is_err());
    let img = DecodedImage::from_raw(2, 1, Mode::P, vec![0, 9], Some(vec![[1, 2, 3]])).unwrap();
    // Indices past the palette are black, as in Pillow.
    assert_eq!(img.to_rgb(), vec![1, 2, 3, 0, 0, 0]);
}
