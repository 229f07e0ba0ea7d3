//! The `score` subcommand as a user runs it: the real binary, the committed tiny package, the
//! golden images, and every kind of bad input. Contract (`docs/score.md`):
//! - exit 0: every image scored; 1: the run went through but some image failed (its JSON line has
//!   `error`, the others are scored); 2: bad usage, package or ONNX Runtime library (nothing scored).
//! - every failure is ONE line on stderr, starting with `error: ` and naming the file (or the
//!   library paths tried); nothing panics.
//!
//! Runs with `--log off`, so stderr holds only those error lines. Needs the ONNX Runtime library
//! (ignored without it; CI runs it with `--include-ignored`).

use crate::common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use anomalyclip_edge::image_io::{JpegDecoder, jpeg_decoder};
use anomalyclip_edge::package::sha256_file;
use common::golden::{Golden, ort_or_skip, tiny_package};
use common::max_abs_diff;
use serde_json::Value;

/// Parity target of spec §7 (fp32): the CLI must print the reference's score within 1e-4.
const TOL: f32 = 1e-4;

const BIN: &str = env!("CARGO_BIN_EXE_anomalyclip-edge");

/// Runs `anomalyclip-edge --log off score --model <model> <args…>` with `ORT_DYLIB_PATH=lib`.
fn score(lib: &Path, model: &Path, args: &[&Path], extra: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env("ORT_DYLIB_PATH", lib)
        .args(["--log", "off", "score", "--model"])
        .arg(model)
        .args(extra)
        .args(args);
    cmd.output().expect("run anomalyclip-edge")
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("stdout line {l:?}: {e}")))
        .collect()
}

/// Exit code `code`, exactly one line on stderr, starting with `error: ` and holding every
/// string of `needles`; returns that line.
fn assert_one_error(case: &str, out: &Output, code: i32, needles: &[&str]) -> String {
    let lines = stderr_lines(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{case}: exit status; stderr: {lines:?}"
    );
    assert_eq!(
        lines.len(),
        1,
        "{case}: expected one stderr line, got {lines:?}"
    );
    let line = &lines[0];
    assert!(line.starts_with("error: "), "{case}: {line}");
    assert!(!line.contains("panicked"), "{case}: {line}");
    // A cause is printed once, not once per layer of the error chain.
    assert!(line.matches("(os error").count() <= 1, "{case}: {line}");
    for n in needles {
        assert!(line.contains(n), "{case}: {line:?} does not mention {n:?}");
    }
    line.clone()
}

/// Whether the CLI must reproduce the golden score of this image exactly (JPEG only with
/// libjpeg-turbo, see `tests/golden.rs`).
fn exact(path: &Path) -> bool {
    jpeg_decoder() == JpegDecoder::LibjpegTurbo || path.extension().is_none_or(|e| e != "jpg")
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn happy_path_golden_images_and_outputs() {
    let Some(lib) = ort_or_skip("happy_path_golden_images_and_outputs") else {
        return;
    };
    let golden = Golden::load();
    let tmp = tempfile::tempdir().unwrap();
    let (ov, mp, raw) = (
        tmp.path().join("overlay"),
        tmp.path().join("maps"),
        tmp.path().join("raw"),
    );
    let paths: Vec<&Path> = golden.images.iter().map(|i| i.path.as_path()).collect();
    let out = score(
        &lib,
        &tiny_package(),
        &paths,
        &[
            "--overlay",
            ov.to_str().unwrap(),
            "--map-png",
            mp.to_str().unwrap(),
            "--raw-map",
            raw.to_str().unwrap(),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {:?}",
        stderr_lines(&out)
    );
    assert!(stderr_lines(&out).is_empty(), "{:?}", stderr_lines(&out));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), golden.images.len());
    let s = golden.size;
    let mut worst = (0f32, 0f32);
    for (line, img) in lines.iter().zip(&golden.images) {
        let name = &img.name;
        assert_eq!(line["path"].as_str(), img.path.to_str(), "{name}: order");
        for key in [
            "score",
            "anomaly",
            "threshold",
            "map_max",
            "area",
            "width",
            "height",
            "ms",
        ] {
            assert!(!line[key].is_null(), "{name}: missing {key} in {line}");
        }
        assert!(line.get("error").is_none(), "{name}: {line}");
        let score = line["score"].as_f64().unwrap() as f32;
        let map_max = line["map_max"].as_f64().unwrap() as f32;
        assert_eq!(line["anomaly"].as_bool(), Some(score >= 0.5), "{name}");
        assert_eq!(line["threshold"].as_f64(), Some(0.5));
        assert_eq!(line["width"].as_u64(), Some(img.width as u64));
        assert_eq!(line["height"].as_u64(), Some(img.height as u64));
        let area = line["area"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&area), "{name}: area {area}");
        if exact(&img.path) {
            let (ds, dm) = ((score - img.score).abs(), (map_max - img.map_max).abs());
            assert!(ds <= TOL, "{name}: score {score} vs golden {}", img.score);
            assert!(dm <= TOL, "{name}: map_max {map_max} vs {}", img.map_max);
            worst = (worst.0.max(ds), worst.1.max(dm));
        }

        // Raw map: S×S little-endian float32, equal to the reference map.
        let bytes = std::fs::read(raw.join(format!("{name}.map.f32"))).expect("raw map");
        assert_eq!(bytes.len(), s * s * 4, "{name}: raw map size");
        let map = common::f32_le(&bytes);
        if exact(&img.path) {
            let (d, at) = max_abs_diff(&map, &golden.reference(name, "map"));
            assert!(d <= TOL, "{name}: raw map |Δ| {d} at {at}");
        }
        // PNGs: decodable, at the original resolution.
        let overlay = image::open(ov.join(format!("{name}.overlay.png"))).expect("overlay");
        assert_eq!(
            (overlay.width(), overlay.height()),
            (img.width as u32, img.height as u32)
        );
        assert_eq!(overlay.color(), image::ColorType::Rgb8);
        let gray = image::open(mp.join(format!("{name}.map.png"))).expect("map png");
        assert_eq!(
            (gray.width(), gray.height()),
            (img.width as u32, img.height as u32)
        );
        assert_eq!(gray.color(), image::ColorType::L8);
        // The grayscale map's brightest pixel is the map maximum (×255, ±1 for the bilinear
        // resize to the original size and the rounding).
        let top = gray.to_luma8().pixels().map(|p| p.0[0]).max().unwrap();
        assert!(
            (f32::from(top) - map_max * 255.0).abs() <= 2.0,
            "{name}: map png max {top} vs map_max {map_max}"
        );
    }
    eprintln!(
        "score CLI vs golden: max score |Δ| {:.2e}, max map_max |Δ| {:.2e}",
        worst.0, worst.1
    );
}

/// A copy of the tiny package that a test may break.
fn package_copy(dir: &Path) -> PathBuf {
    let dst = dir.join("pkg");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(tiny_package()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn edit_manifest(pkg: &Path, from: &str, to: &str) {
    let p = pkg.join("manifest.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains(from), "manifest has no {from:?}");
    std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
}

/// Replaces `file`'s content and records its new hash in the manifest, so only the content is
/// wrong, not the hash.
fn replace_with_hash(pkg: &Path, file: &str, content: &[u8]) {
    let old = sha256_file(&pkg.join(file)).unwrap();
    std::fs::write(pkg.join(file), content).unwrap();
    let new = sha256_file(&pkg.join(file)).unwrap();
    edit_manifest(pkg, &old, &new);
}

/// Every broken package or library: exit 2, one line naming the culprit, nothing on stdout.
#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn bad_package_or_library_exit_2_with_one_line() {
    let Some(lib) = ort_or_skip("bad_package_or_library_exit_2_with_one_line") else {
        return;
    };
    let golden = Golden::load();
    let image = golden.images[0].path.clone();
    let tmp = tempfile::tempdir().unwrap();
    type Setup = fn(&Path);
    let cases: Vec<(&str, Setup, &str, Vec<&str>)> = vec![
        (
            "missing model dir",
            |p| std::fs::remove_dir_all(p).unwrap(),
            "",
            vec!["no such directory", "engines/export.py"],
        ),
        (
            "missing manifest",
            |p| std::fs::remove_file(p.join("manifest.toml")).unwrap(),
            "manifest.toml",
            vec!["cannot read", "No such file"],
        ),
        (
            "manifest not TOML",
            |p| std::fs::write(p.join("manifest.toml"), "format_version = \n[[").unwrap(),
            "manifest.toml",
            vec!["invalid manifest"],
        ),
        (
            "wrong format_version",
            |p| edit_manifest(p, "format_version = 1", "format_version = 2"),
            "manifest.toml",
            vec!["format_version 2 is not supported", "reads 1"],
        ),
        (
            "wrong output shape",
            |p| edit_manifest(p, "[\"batch\", 64, 32]", "[\"batch\", 65, 32]"),
            "manifest.toml",
            vec![
                "outputs.local_4.shape",
                "expected [\"batch\", 64, 32]",
                "found [\"batch\", 65, 32]",
            ],
        ),
        (
            "grid × patch ≠ size",
            |p| edit_manifest(p, "size = 112", "size = 224"),
            "manifest.toml",
            vec!["input.size (224)"],
        ),
        (
            "text.f32 of the wrong size (hash updated)",
            |p| replace_with_hash(p, "text.f32", &[0u8; 200]),
            "text.f32",
            vec!["expected 256 bytes", "found 200"],
        ),
        (
            "text.f32 modified",
            |p| {
                let mut b = std::fs::read(p.join("text.f32")).unwrap();
                b[0] ^= 1;
                std::fs::write(p.join("text.f32"), b).unwrap();
            },
            "text.f32",
            vec!["SHA-256 mismatch"],
        ),
        (
            "missing model.onnx",
            |p| std::fs::remove_file(p.join("model.onnx")).unwrap(),
            "model.onnx",
            vec!["cannot read"],
        ),
        (
            "tampered model.onnx (hash mismatch)",
            |p| {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(p.join("model.onnx"))
                    .unwrap();
                f.write_all(b"tampered").unwrap();
            },
            "model.onnx",
            vec!["SHA-256 mismatch", "corrupt or modified"],
        ),
        (
            "corrupt ONNX, hash updated (ONNX Runtime rejects it)",
            |p| {
                let b = std::fs::read(p.join("model.onnx")).unwrap();
                replace_with_hash(p, "model.onnx", &b[..5000]);
            },
            "model.onnx",
            vec!["ONNX Runtime cannot load the model"],
        ),
        (
            "ONNX that is not a model at all, hash updated",
            |p| replace_with_hash(p, "model.onnx", b"not protobuf \xff\xfe"),
            "model.onnx",
            vec!["ONNX Runtime cannot load the model"],
        ),
        (
            "model input name differs from the manifest",
            |p| edit_manifest(p, "name = \"image\"", "name = \"pixels\""),
            "model.onnx",
            vec![
                "does not match manifest.toml",
                "no input named \"pixels\"",
                "image",
            ],
        ),
    ];
    for (i, (case, setup, culprit, needles)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        let pkg = package_copy(&dir);
        setup(&pkg);
        let out = score(&lib, &pkg, &[&image], &[]);
        let named = pkg.join(culprit);
        let mut all = needles.clone();
        let named = named.to_str().unwrap().trim_end_matches('/').to_string();
        all.push(&named);
        let line = assert_one_error(case, &out, 2, &all);
        assert!(out.stdout.is_empty(), "{case}: stdout not empty");
        eprintln!("{case}: {line}");
    }

    // Missing ONNX Runtime library: names the path tried and how to install it.
    let out = score(
        Path::new("/nonexistent/libonnxruntime.so"),
        &tiny_package(),
        &[&image],
        &[],
    );
    let line = assert_one_error(
        "missing ORT library",
        &out,
        2,
        &[
            "ONNX Runtime library not usable",
            "/nonexistent/libonnxruntime.so",
            "scripts/setup",
            "ORT_DYLIB_PATH",
        ],
    );
    eprintln!("missing ORT library: {line}");
    // A file that is not a shared library at all.
    let not_lib = tmp.path().join("libonnxruntime.so");
    std::fs::write(&not_lib, "not a library").unwrap();
    let out = score(&not_lib, &tiny_package(), &[&image], &[]);
    assert_one_error(
        "ORT library not a library",
        &out,
        2,
        &[not_lib.to_str().unwrap(), "scripts/setup"],
    );
    // `--ort-library` overrides the environment and is reported the same way.
    let out = score(
        &lib,
        &tiny_package(),
        &[&image],
        &["--ort-library", "/nonexistent/ort/libonnxruntime.so"],
    );
    assert_one_error(
        "--ort-library missing",
        &out,
        2,
        &["/nonexistent/ort/libonnxruntime.so", "scripts/setup"],
    );
}

/// Bad usage: exit 2 before anything is scored.
#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn bad_usage_exit_2() {
    let Some(lib) = ort_or_skip("bad_usage_exit_2") else {
        return;
    };
    let golden = Golden::load();
    let image = golden.images[0].path.as_path();
    let out = score(&lib, &tiny_package(), &[image], &["--threshold", "1.5"]);
    assert_one_error("threshold out of range", &out, 2, &["--threshold 1.5"]);
    assert!(out.stdout.is_empty());
    // Output directory that cannot be created (a file is in the way).
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let sub = file.join("maps");
    let out = score(
        &lib,
        &tiny_package(),
        &[image],
        &["--raw-map", sub.to_str().unwrap()],
    );
    assert_one_error(
        "output dir",
        &out,
        2,
        &["cannot create output directory", sub.to_str().unwrap()],
    );
    // No image at all: clap's usage error (several lines, exit 2).
    let out = Command::new(BIN)
        .args(["score", "--model"])
        .arg(tiny_package())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Writes an 8-bit PNG of `w × h` pixels, every pixel `rgb` (or gray), streaming rows so that a
/// huge image costs no memory here; a uniform image compresses to a few hundred kB.
fn uniform_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    let f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut enc = png::Encoder::new(f, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    let mut writer = enc.write_header().unwrap().into_stream_writer().unwrap();
    let row: Vec<u8> = (0..w as usize).flat_map(|_| rgb).collect();
    for _ in 0..h {
        writer.write_all(&row).unwrap();
    }
    writer.finish().unwrap();
}

/// Bad image files: exit 1, one stderr line naming the file, a JSON line with `error` and no
/// score. Also an image over the pixel limit (header only: refused before any pixel is decoded).
#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn bad_images_exit_1_with_one_line_each() {
    let Some(lib) = ort_or_skip("bad_images_exit_1_with_one_line_each") else {
        return;
    };
    let golden = Golden::load();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // Tests run as root, so chmod 000 would not stop a read: use a directory and a dangling
    // symlink for "unreadable".
    let dir = t.join("a_directory.png");
    std::fs::create_dir(&dir).unwrap();
    let dangling = t.join("dangling.png");
    std::os::unix::fs::symlink(t.join("gone.png"), &dangling).unwrap();
    let missing = t.join("missing.png");
    let text = t.join("notes.png");
    std::fs::write(&text, "this is not an image\n").unwrap();
    let zero = t.join("zero.png");
    std::fs::write(&zero, b"").unwrap();
    let png_bytes = std::fs::read(&golden.images[0].path).unwrap();
    let truncated = t.join("truncated.png");
    std::fs::write(&truncated, &png_bytes[..png_bytes.len() / 2]).unwrap();
    let header_only = t.join("header_only.png");
    std::fs::write(&header_only, &png_bytes[..33]).unwrap();
    let mut flipped = png_bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    let corrupt = t.join("crc.png");
    std::fs::write(&corrupt, &flipped).unwrap();
    let jpeg = std::fs::read(fixtures_jpeg(&golden)).unwrap();
    let truncated_jpeg = t.join("truncated.jpg");
    std::fs::write(&truncated_jpeg, &jpeg[..jpeg.len() / 3]).unwrap();
    let gif = t.join("anim.gif");
    std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    // 20000×20000 (400 MP): over the 178 MP limit; only the header is written.
    let too_big = t.join("too_big.png");
    {
        let f = std::fs::File::create(&too_big).unwrap();
        let mut enc = png::Encoder::new(f, 20000, 20000);
        enc.set_color(png::ColorType::Rgb);
        let w = enc.write_header().unwrap();
        drop(w);
    }
    let cases: Vec<(&str, &Path, Vec<&str>)> = vec![
        (
            "directory",
            &dir,
            vec!["cannot read image", "Is a directory"],
        ),
        (
            "dangling symlink",
            &dangling,
            vec!["cannot read image", "No such file"],
        ),
        (
            "missing file",
            &missing,
            vec!["cannot read image", "No such file"],
        ),
        (
            "text file",
            &text,
            vec!["unsupported format", "not an image file"],
        ),
        ("zero-byte file", &zero, vec!["empty file"]),
        ("truncated PNG", &truncated, vec!["corrupt or truncated"]),
        (
            "PNG header only",
            &header_only,
            vec!["corrupt or truncated"],
        ),
        ("PNG with a bad CRC", &corrupt, vec!["corrupt or truncated"]),
        (
            "truncated JPEG",
            &truncated_jpeg,
            vec!["corrupt or truncated"],
        ),
        ("GIF", &gif, vec!["unsupported format (GIF)"]),
        (
            "20000×20000 PNG",
            &too_big,
            vec!["20000x20000", "over the limit"],
        ),
    ];
    for (case, path, needles) in cases {
        let out = score(&lib, &tiny_package(), &[path], &[]);
        let mut all = needles.clone();
        all.push(path.to_str().unwrap());
        let line = assert_one_error(case, &out, 1, &all);
        let json = json_lines(&out);
        assert_eq!(json.len(), 1, "{case}");
        assert_eq!(json[0]["path"].as_str(), path.to_str(), "{case}");
        assert!(json[0]["score"].is_null(), "{case}: {}", json[0]);
        let err = json[0]["error"].as_str().expect("error field");
        assert!(
            line.ends_with(err),
            "{case}: stderr {line:?} vs JSON {err:?}"
        );
        eprintln!("{case}: {line}");
    }
}

fn fixtures_jpeg(golden: &Golden) -> PathBuf {
    golden
        .images
        .iter()
        .find(|i| i.path.extension().is_some_and(|e| e == "jpg"))
        .expect("a JPEG golden image")
        .path
        .clone()
}

/// Good and bad images in one call: exit 1, the good ones scored (same numbers as alone), the bad
/// one reported, order kept; default logging (info) still gives exactly one `error:` line.
#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn mixed_good_and_bad_exit_1_good_still_scored() {
    let Some(lib) = ort_or_skip("mixed_good_and_bad_exit_1_good_still_scored") else {
        return;
    };
    let golden = Golden::load();
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nrubbish").unwrap();
    let good: Vec<&Path> = golden.images.iter().map(|i| i.path.as_path()).collect();
    let args = [good[0], bad.as_path(), good[1], good[2]];
    let out = Command::new(BIN)
        .env("ORT_DYLIB_PATH", &lib)
        .env_remove("RUST_LOG")
        .args(["score", "--model"])
        .arg(tiny_package())
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = stderr_lines(&out);
    let errors: Vec<&String> = stderr.iter().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{stderr:?}");
    assert!(errors[0].contains(bad.to_str().unwrap()));
    assert!(!stderr.iter().any(|l| l.contains("panicked")));
    let json = json_lines(&out);
    assert_eq!(json.len(), 4);
    for (line, path) in json.iter().zip(args) {
        assert_eq!(line["path"].as_str(), path.to_str());
    }
    assert!(json[1]["error"].is_string() && json[1]["score"].is_null());
    for (line, img) in [
        (&json[0], &golden.images[0]),
        (&json[2], &golden.images[1]),
        (&json[3], &golden.images[2]),
    ] {
        let s = line["score"].as_f64().expect("good image scored") as f32;
        if exact(&img.path) {
            assert!(
                (s - img.score).abs() <= TOL,
                "{}: {s} vs {}",
                img.name,
                img.score
            );
        }
    }
}

/// Tiny and huge images: a 1×1 PNG and a 12000×12000 PNG (144 MP, under the 178 MP limit) both
/// give a correct result. Both are the same uniform colour, and Pillow's resize of a uniform
/// image is that colour at any size, so both must get the same score and map (checked to 1e-6:
/// identical model input). The 12000×12000 run is timed (decode 432 MB of RGB + resize).
#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn one_pixel_and_12000_square_images() {
    let Some(lib) = ort_or_skip("one_pixel_and_12000_square_images") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let colour = [200, 60, 30];
    let one = tmp.path().join("one.png");
    uniform_png(&one, 1, 1, colour);
    let t0 = Instant::now();
    let big = tmp.path().join("big.png");
    uniform_png(&big, 12000, 12000, colour);
    let gen_s = t0.elapsed().as_secs_f64();
    let big_len = std::fs::metadata(&big).unwrap().len();
    let raw = tmp.path().join("raw");

    let out = score(
        &lib,
        &tiny_package(),
        &[&one],
        &[
            "--raw-map",
            raw.to_str().unwrap(),
            "--overlay",
            raw.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", stderr_lines(&out));
    let j1 = json_lines(&out).remove(0);
    assert_eq!(
        (j1["width"].as_u64(), j1["height"].as_u64()),
        (Some(1), Some(1))
    );
    let overlay = image::open(raw.join("one.overlay.png")).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (1, 1));

    let t0 = Instant::now();
    let out = score(
        &lib,
        &tiny_package(),
        &[&big],
        &["--raw-map", raw.to_str().unwrap()],
    );
    let big_s = t0.elapsed().as_secs_f64();
    assert_eq!(out.status.code(), Some(0), "{:?}", stderr_lines(&out));
    let j2 = json_lines(&out).remove(0);
    assert_eq!(
        (j2["width"].as_u64(), j2["height"].as_u64()),
        (Some(12000), Some(12000))
    );
    let (s1, s2) = (j1["score"].as_f64().unwrap(), j2["score"].as_f64().unwrap());
    assert!((0.0..=1.0).contains(&s1), "score {s1}");
    assert!(
        (s1 - s2).abs() <= 1e-6,
        "1×1 score {s1} vs 12000² score {s2}"
    );
    let m1 = common::f32_le(&std::fs::read(raw.join("one.map.f32")).unwrap());
    let m2 = common::f32_le(&std::fs::read(raw.join("big.map.f32")).unwrap());
    let (dm, _) = max_abs_diff(&m1, &m2);
    assert!(dm <= 1e-6, "1×1 map vs 12000² map |Δ| {dm}");
    assert!(m1.iter().all(|v| v.is_finite()));
    eprintln!(
        "12000×12000 PNG ({:.1} MB file, written in {gen_s:.1} s): scored in {big_s:.2} s wall \
         (process start to exit), in-process ms {}",
        big_len as f64 / 1e6,
        j2["ms"]
    );
}
