//! Few-shot reference banks (`src/reference.rs`): parity of the few-shot map and score with the
//! Python reference written from APRIL-GAN's computation (`engines/fewshot_ref.py`, fixture
//! `tests/fixtures/fewshot`), the `reference` command, and `eval --few-shot` on a synthetic
//! texture dataset whose defects only a bank can see. The tiny package has random weights: these
//! tests check wiring and arithmetic, not detection quality.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anomalyclip_edge::engine::{Backend, EngineOptions};
use anomalyclip_edge::package::{HashCheck, ModelPackage};
use anomalyclip_edge::reference::{Bank, Fingerprint, Reference, WHOLE_FRAME};
use anomalyclip_edge::scorer::Scorer;
use serde_json::Value;

use crate::common;
use crate::common::fx::{fixtures, index, max_abs_diff};
use crate::common::golden::{Golden, ort_or_skip, tiny_package};

const BIN: &str = env!("CARGO_BIN_EXE_anomalyclip-edge");

/// Maps and scores against the Python reference (float32 GEMM vs scikit-learn, summation order).
const TOL: f32 = 1e-4;

struct Expected {
    name: String,
    score: f32,
    fs_map: Vec<f32>,
    map: Vec<f32>,
}

fn expected() -> (Vec<String>, Vec<Expected>) {
    let idx: Value = index("fewshot");
    let bank = idx["bank"]
        .as_array()
        .expect("bank")
        .iter()
        .map(|v| v.as_str().expect("bank stem").to_string())
        .collect();
    let dir = fixtures("fewshot");
    let f32s = |p: PathBuf| crate::common::fx::f32_le(&crate::common::fx::bytes(&p));
    let images = idx["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("name").to_string();
            Expected {
                score: e["score"].as_f64().expect("score") as f32,
                fs_map: f32s(dir.join(format!("{name}.fs_map.f32"))),
                map: f32s(dir.join(format!("{name}.map.f32"))),
                name,
            }
        })
        .collect();
    (bank, images)
}

fn tiny() -> ModelPackage {
    ModelPackage::load(&tiny_package(), HashCheck::All).expect("tiny package")
}

#[test]
fn the_few_shot_map_and_score_equal_the_python_reference_on_the_golden_features() {
    let golden = Golden::load();
    let (bank_stems, expected) = expected();
    assert!(expected.len() >= 5 && bank_stems.len() == 2);
    let pkg = tiny();
    let locals: Vec<Vec<f32>> = bank_stems
        .iter()
        .map(|s| golden.reference(s, "local"))
        .collect();
    let views: Vec<Vec<&[f32]>> = locals.iter().map(|l| vec![l.as_slice()]).collect();
    let fp = Fingerprint::for_package(&pkg, WHOLE_FRAME, 0);
    let bank = Bank::build(fp, &views, u64::MAX).expect("bank");
    let mut reference = Reference::new(bank);
    let mut moved = 0;
    for (img, want) in golden.images.iter().zip(&expected) {
        assert_eq!(img.name, want.name);
        let local = golden.reference(&img.name, "local");
        let mut map = golden.reference(&img.name, "map");
        let mut score = img.score;
        let fs = reference
            .apply(&[&local], &mut map, &mut score)
            .expect("apply");
        let (d, at) = max_abs_diff(&map, &want.map);
        assert!(d <= TOL, "{}: combined map |Δ| {d} at {at}", img.name);
        assert!(
            (score - want.score).abs() <= TOL,
            "{}: score {score} vs {}",
            img.name,
            want.score
        );
        assert_eq!(fs.zero_shot_score, img.score);
        let fs_max = want.fs_map.iter().cloned().fold(f32::MIN, f32::max);
        assert!(
            (fs.map_max - fs_max).abs() <= TOL,
            "{}: few-shot max",
            img.name
        );
        // The bank's own images match themselves (map ~0); the others must move.
        if fs_max > 0.05 {
            moved += 1;
        }
    }
    assert_eq!(
        moved,
        expected.len() - 2,
        "only the non-bank images differ from the bank"
    );
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn the_scorer_with_a_bank_from_the_engine_matches_the_python_reference_end_to_end() {
    let Some(lib) = ort_or_skip("reference end to end") else {
        return;
    };
    let golden = Golden::load();
    let (bank_stems, expected) = expected();
    let opts = EngineOptions {
        backend: Backend::Cpu,
        ort_library: Some(lib),
        ..EngineOptions::default()
    };
    let mut scorer = Scorer::open(&tiny_package(), HashCheck::All, &opts).expect("scorer");
    // The reference's own preprocessed tensors: no JPEG decoder differences.
    let input: Vec<f32> = bank_stems
        .iter()
        .flat_map(|s| golden.reference(s, "input"))
        .collect();
    let bank = scorer
        .build_bank(&input, bank_stems.len(), WHOLE_FRAME, 16)
        .expect("bank");
    assert_eq!(bank.fingerprint().k, 2);
    bank.check(
        &Fingerprint::for_package(scorer.package(), WHOLE_FRAME, 2),
        "bank",
    )
    .expect("a bank built for this package is accepted");
    scorer.set_reference(Some(Reference::new(bank)));
    for (img, want) in golden.images.iter().zip(&expected) {
        let input = golden.reference(&img.name, "input");
        let scored = scorer.score_batch(&input, 1).expect("score").remove(0);
        let (d, at) = max_abs_diff(&scored.map, &want.map);
        assert!(d <= TOL, "{}: combined map |Δ| {d} at {at}", img.name);
        assert!(
            (scored.score - want.score).abs() <= TOL,
            "{}: score {} vs {}",
            img.name,
            scored.score,
            want.score
        );
        let fs = scored.few_shot.expect("few-shot applied");
        assert!((fs.zero_shot_score - img.score).abs() <= TOL);
        let max = want.map.iter().cloned().fold(f32::MIN, f32::max);
        assert!((scored.map_max - max).abs() <= TOL, "map_max is recomputed");
    }
}

/// The whole-package parity tool (`engines/check_fewshot_parity.py`, used at full size for
/// docs/measurements/few-shot.md) on the tiny package: this binary's `reference` and `score`
/// against the PyTorch reference encoder and APRIL-GAN's computation, ≤ 1e-4 (its exit 0 and
/// PASS line), so the tool that measured the full-size figure keeps working.
#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn the_whole_package_parity_tool_passes_on_the_tiny_package() {
    let Some(lib) = ort_or_skip("check_fewshot_parity") else {
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(common::venv_python())
        .arg(repo.join("engines/check_fewshot_parity.py"))
        .arg(tiny_package())
        .args(["--ref-tiny", "--binary", BIN, "--k", "3", "--tests", "2"])
        .env("ORT_DYLIB_PATH", &lib)
        .output()
        .expect("run engines/check_fewshot_parity.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    let last = text
        .lines()
        .find(|l| l.starts_with("worst |delta|"))
        .unwrap_or_else(|| panic!("no summary line: {text}"));
    assert!(last.ends_with("PASS"), "{last}");
    assert!(
        text.contains("test_01:"),
        "both test images reported: {text}"
    );
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run anomalyclip-edge");
    eprintln!(
        "$ anomalyclip-edge {}\n-> {:?}\n{}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn the_reference_command_writes_a_bank_this_package_accepts_and_refuses_bad_usage() {
    ort_or_skip("reference command");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("bank.bin");
    let images = fixtures("golden").join("images");
    let model = tiny_package();
    let o = run(&[
        "reference",
        "--model",
        s(&model),
        "--images",
        s(&images),
        "--out",
        s(&out),
        "--k",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let line: Value = serde_json::from_slice(&o.stdout).expect("one JSON line");
    assert_eq!(line["k"], 3);
    assert_eq!(line["feature_bytes"], 3 * 64 * 32 * 4);
    let pkg = tiny();
    let bank = Bank::load_checked(&out, 1, &Fingerprint::for_package(&pkg, WHOLE_FRAME, 3))
        .expect("bank accepted");
    assert_eq!(bank.fingerprint().k, 3);
    // Built for the whole frame: refused for a named region, naming the field.
    let e = Bank::load_checked(&out, 1, &Fingerprint::for_package(&pkg, "left:1234", 3))
        .expect_err("region mismatch")
        .to_string();
    assert!(e.contains("region") && e.contains("left:1234"), "{e}");
    // `score --reference` applies it: the line carries the zero-shot score beside the combined.
    let image = images.join("gray.png");
    let o = run(&[
        "score",
        "--model",
        s(&model),
        "--reference",
        s(&out),
        s(&image),
    ]);
    assert_eq!(o.status.code(), Some(0));
    let line: Value = serde_json::from_slice(&o.stdout).expect("one JSON line");
    let (score, zs) = (
        line["score"].as_f64().expect("score"),
        line["zero_shot_score"].as_f64().expect("zero_shot_score"),
    );
    assert!(
        score < zs,
        "gray.png is in the bank: few-shot term ~0, combined ~ half: {score} vs {zs}"
    );
    // Truncated: refused with a reason, by the library and by `score` (exit 2).
    let bytes = std::fs::read(&out).expect("bank");
    std::fs::write(&out, &bytes[..bytes.len() / 2]).expect("truncate");
    let e = Bank::load(&out, 1).expect_err("truncated").to_string();
    assert!(e.contains("checksum"), "{e}");
    let o = run(&[
        "score",
        "--model",
        s(&model),
        "--reference",
        s(&out),
        s(&image),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("checksum mismatch"));
    // Bad usage: exit 2, one line, nothing written.
    let missing = dir.path().join("none.bin");
    for args in [
        vec!["--k", "0"],
        vec!["--k", "99"],
        vec!["--max-bank-mb", "0"],
    ] {
        let mut a = vec![
            "reference",
            "--model",
            s(&model),
            "--images",
            s(&images),
            "--out",
            s(&missing),
        ];
        a.extend(args.iter().copied());
        let o = run(&a);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(!missing.exists(), "{args:?}: nothing written");
        assert_eq!(
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .filter(|l| l.starts_with("error"))
                .count(),
            1
        );
    }
}

/// Deterministic generator for the synthetic textures.
struct Lcg(u64);

impl Lcg {
    fn unit(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A 112 × 112 texture of diagonal stripes (the "good" surface), with noise and a random phase;
/// `defect` pastes a square of another texture (fine checkerboard in other colours) and returns
/// its mask.
fn texture(rng: &mut Lcg, defect: bool) -> (image::RgbImage, image::GrayImage) {
    let n = 112u32;
    let phase = rng.unit() * 12.0;
    let mut img = image::RgbImage::from_fn(n, n, |x, y| {
        let t = ((x + y) as f32 + phase) / 12.0 * std::f32::consts::TAU;
        let v = 0.5 + 0.35 * t.sin();
        let c = |base: f32| ((base * v + 0.05) * 255.0).clamp(0.0, 255.0) as u8;
        image::Rgb([c(0.9), c(0.8), c(0.6)])
    });
    for p in img.pixels_mut() {
        for ch in p.0.iter_mut() {
            *ch = ch.saturating_add((rng.unit() * 12.0) as u8);
        }
    }
    let mut mask = image::GrayImage::new(n, n);
    if defect {
        let (x0, y0) = (
            (rng.unit() * 60.0) as u32 + 5,
            (rng.unit() * 60.0) as u32 + 5,
        );
        for y in y0..y0 + 42 {
            for x in x0..x0 + 42 {
                let on = ((x / 3) + (y / 3)) % 2 == 0;
                img.put_pixel(
                    x,
                    y,
                    if on {
                        image::Rgb([40, 90, 160])
                    } else {
                        image::Rgb([200, 220, 240])
                    },
                );
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
    }
    (img, mask)
}

/// `ROOT/tex/{train/good, test/good, test/patch, ground_truth/patch}`.
fn texture_tree(root: &Path) {
    let mut rng = Lcg(7);
    let class = root.join("tex");
    for d in [
        "train/good",
        "test/good",
        "test/patch",
        "ground_truth/patch",
    ] {
        std::fs::create_dir_all(class.join(d)).expect("mkdir");
    }
    for i in 0..6 {
        let (img, _) = texture(&mut rng, false);
        img.save(class.join(format!("train/good/{i:03}.png")))
            .expect("png");
    }
    for i in 0..10 {
        let (img, _) = texture(&mut rng, false);
        img.save(class.join(format!("test/good/{i:03}.png")))
            .expect("png");
        let (img, mask) = texture(&mut rng, true);
        img.save(class.join(format!("test/patch/{i:03}.png")))
            .expect("png");
        mask.save(class.join(format!("ground_truth/patch/{i:03}_mask.png")))
            .expect("png");
    }
}

fn mean(report: &Value, metric: &str) -> f64 {
    report["mean"][metric]["value"]
        .as_f64()
        .unwrap_or_else(|| panic!("mean {metric}: {report}"))
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn few_shot_eval_finds_texture_defects_that_zero_shot_misses() {
    ort_or_skip("few-shot eval");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("data");
    let out = dir.path().join("out");
    texture_tree(&root);
    let model = tiny_package();
    let o = run(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&root),
        "--out",
        s(&out),
        "--no-progress",
        "--few-shot",
        "4",
        "--seed",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let read = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(out.join(name)).expect(name)).expect(name)
    };
    let zs = read("eval-report.json");
    let fs = read("eval-report.few-shot-4.json");
    let refs = read("eval-report.references.few-shot-4.json");
    let drawn = refs["references"]["tex"].as_array().expect("drawn files");
    assert_eq!(drawn.len(), 4);
    assert!(
        drawn
            .iter()
            .all(|p| p.as_str().is_some_and(|p| p.contains("train/good")))
    );
    let (zs_img, fs_img) = (mean(&zs, "image_auroc"), mean(&fs, "image_auroc"));
    let (zs_px, fs_px) = (mean(&zs, "pixel_auroc"), mean(&fs, "pixel_auroc"));
    eprintln!("image AUROC {zs_img:.3} -> {fs_img:.3}, pixel AUROC {zs_px:.3} -> {fs_px:.3}");
    assert!(
        fs_img >= 0.95 && fs_img >= zs_img + 0.2,
        "image AUROC {zs_img} -> {fs_img}"
    );
    // The random head's own map is anti-correlated with these defects (it stays in the sum).
    assert!(
        fs_px >= 0.7 && fs_px >= zs_px + 0.3,
        "pixel AUROC {zs_px} -> {fs_px}"
    );
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("zero-shot vs few-shot (K = 4, seed 3)"),
        "{table}"
    );
    // Too few training images: exit 2 before the model loads.
    let o = run(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&root),
        "--out",
        s(&out),
        "--no-progress",
        "--few-shot",
        "7",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("holds 6 images"));
}

#[cfg_attr(
    not(all(have_ort, have_python)),
    ignore = "needs the ONNX Runtime library and the Python venv: run scripts/setup"
)]
#[test]
fn extra_few_shot_layers_feed_the_bank_and_leave_the_zero_shot_head_unchanged() {
    let Some(lib) = ort_or_skip("few-shot layers") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let pkg_dir = dir.path().join("tiny-fs");
    let export = Path::new(env!("CARGO_MANIFEST_DIR")).join("engines/export.py");
    let o = Command::new(common::venv_python())
        .args([
            s(&export),
            "--tiny",
            "--few-shot-layers",
            "2,3,4",
            "--out",
            s(&pkg_dir),
        ])
        .output()
        .expect("run export.py");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let opts = EngineOptions {
        backend: Backend::Cpu,
        ort_library: Some(lib),
        ..EngineOptions::default()
    };
    let mut plain = Scorer::open(&tiny_package(), HashCheck::All, &opts).expect("tiny");
    let mut extra = Scorer::open(&pkg_dir, HashCheck::All, &opts).expect("tiny + few-shot layers");
    assert_eq!(extra.package().manifest.model.feature_layers, vec![4]);
    assert_eq!(extra.package().bank_layers(), &[2, 3, 4]);
    let golden = Golden::load();
    let input: Vec<f32> = ["square_rgb", "gray"]
        .iter()
        .flat_map(|s| golden.reference(s, "input"))
        .collect();
    // Same seed, same weights: the head sees the same layer-4 features, whatever else is output.
    let a = plain.score_batch(&input, 2).expect("plain");
    let b = extra.score_batch(&input, 2).expect("extra");
    for (x, y) in a.iter().zip(&b) {
        assert!((x.score - y.score).abs() <= 1e-6);
        assert!(max_abs_diff(&x.map, &y.map).0 <= 1e-6);
    }
    let bank = extra
        .build_bank(&input[..input.len() / 2], 1, WHOLE_FRAME, 16)
        .expect("bank");
    assert_eq!(bank.fingerprint().layers, vec![2, 3, 4]);
    assert_eq!(bank.feature_bytes(), 3 * 64 * 32 * 4);
    // A bank of the plain package (layer 4 only) is refused by this one.
    let plain_bank = plain
        .build_bank(&input[..input.len() / 2], 1, WHOLE_FRAME, 16)
        .expect("plain bank");
    let e = plain_bank
        .check(
            &Fingerprint::for_package(extra.package(), WHOLE_FRAME, 1),
            "b",
        )
        .expect_err("other model")
        .to_string();
    assert!(e.contains("model"), "{e}");
    // Per-image banks (regions of one frame): image 0 with the bank, image 1 zero-shot.
    let mut own = Reference::new(bank.clone());
    let per = extra
        .score_frames_with_references(&input, &[0.5, 0.5], &mut [Some(&mut own), None])
        .expect("engine");
    let per: Vec<_> = per.into_iter().map(|r| r.expect("scored")).collect();
    assert!(per[0].few_shot.is_some() && per[1].few_shot.is_none());
    assert!(
        (per[1].score - b[1].score).abs() <= 1e-6,
        "image 1 stays zero-shot"
    );
    extra.set_reference(Some(Reference::new(bank)));
    let c = extra.score_batch(&input, 2).expect("with bank");
    // The bank's own image matches itself on every layer: few-shot term ~0.
    assert!(c[0].few_shot.expect("applied").map_max < 1e-3);
    assert!(c[1].few_shot.expect("applied").map_max > 0.05);

    // A manifest naming a block outside the model is refused, naming the field.
    let manifest = pkg_dir.join("manifest.toml");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(
        &manifest,
        text.replace("few_shot_layers = [2, 3, 4]", "few_shot_layers = [2, 9]"),
    )
    .expect("write");
    let e = match ModelPackage::load(&pkg_dir, HashCheck::None) {
        Ok(_) => panic!("a few-shot block outside the model was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("few_shot_layers") && e.contains('9'), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Region banks in the daemon: `reference = true | "path"`, `reference --config`, check-config
// ---------------------------------------------------------------------------------------------

use anomalyclip_edge::config::{FsChecks, ReferenceSource, parse_config};

/// A 96 × 64 frame: a horizontal gradient with seeded noise of amplitude `noise`.
fn frame_png(path: &Path, seed: u32, noise: u8) {
    let mut state = seed;
    let px: Vec<u8> = (0..96 * 64)
        .flat_map(|i| {
            let x = (i % 96) as u8;
            [x * 2, 80 + x, 200 - x]
        })
        .map(|v: u8| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            v.wrapping_add(((state >> 24) as u8) % noise.max(1))
        })
        .collect();
    crate::common::fx::write_rgb_png(path, 96, 64, &px);
}

/// The daemon config of the region-bank tests: one camera showing the still image `image`, one
/// region `part` at `rect` with `reference = true`, state directory `dir/state`.
fn bank_config(dir: &Path, node: &str, port: u16, image: &Path, rect: &str) -> String {
    let state = format!("state_dir = \"{}\"", dir.join("state").display());
    crate::common::daemon::config(
        node,
        port,
        &format!(
            "[[camera]]\nname = \"cam\"\n\
             pipeline = \"filesrc location={} ! pngdec ! imagefreeze is-live=true ! video/x-raw,framerate=5/1\"\n\
             [camera.mask]\nenabled = false\n\
             [[camera.region]]\nname = \"part\"\nrect = {rect}\nthreshold = 0.9\nreference = true\n",
            image.display()
        ),
    )
    .replace("state_dir = \"state\"", &state)
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in text"))
}

fn all_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn reference_keys_resolve_on_cameras_and_regions_and_bad_ones_are_reported_at_their_line() {
    let base = |cam: &str| {
        format!(
            "node_id = \"n1\"\n[model]\npackage = \"/nonexistent\"\nmax_bank_mb = 32\n[mqtt]\nhost = \"localhost\"\n\
             [[camera]]\nname = \"cam\"\nuri = \"/dev/video0\"\n{cam}"
        )
    };
    let text = base("reference = \"/banks/cam.bank\"\n");
    let cfg = parse_config(&text, "c.toml", FsChecks::Disabled).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.model.max_bank_mb, 32);
    let r = cfg.cameras[0].regions[0]
        .reference
        .as_ref()
        .expect("whole-frame reference");
    assert_eq!(r.source, ReferenceSource::File("/banks/cam.bank".into()));
    assert_eq!(
        (r.line, r.path.as_str()),
        (line_of(&text, "reference ="), "camera[0].reference")
    );

    let text = base(
        "[[camera.region]]\nname = \"a\"\nrect = [0.0, 0.0, 0.5, 1.0]\nreference = true\n\
         [[camera.region]]\nname = \"b\"\nrect = [0.5, 0.0, 0.5, 1.0]\nreference = false\n",
    );
    let cfg = parse_config(&text, "c.toml", FsChecks::Disabled).unwrap_or_else(|e| panic!("{e}"));
    let regions = &cfg.cameras[0].regions;
    let a = regions[0].reference.as_ref().expect("region a has a bank");
    assert_eq!(a.source, ReferenceSource::StateDir);
    assert_eq!(a.line, line_of(&text, "reference = true"));
    assert!(regions[1].reference.is_none(), "false is zero-shot");
    let default = parse_config(
        &base("").replace("max_bank_mb = 32\n", ""),
        "c.toml",
        FsChecks::Disabled,
    )
    .expect("default");
    assert_eq!(
        default.model.max_bank_mb,
        anomalyclip_edge::reference::DEFAULT_MAX_BANK_MB
    );

    // Refused, each at its line: a camera-level reference beside regions, an empty path, a
    // number, a bound of 0.
    let text = base(
        "reference = true\n[[camera.region]]\nname = \"a\"\nrect = [0.0, 0.0, 0.5, 1.0]\nreference = \"\"\n\
         [[camera.region]]\nname = \"b\"\nrect = [0.5, 0.0, 0.5, 1.0]\nreference = 3\n",
    )
    .replace("max_bank_mb = 32", "max_bank_mb = 0");
    let ps = parse_config(&text, "c.toml", FsChecks::Disabled)
        .expect_err("bad references")
        .problems;
    let has = |path: &str, needle: &str, msg: &str| {
        let line = line_of(&text, needle);
        assert!(
            ps.iter()
                .any(|p| p.path == path && p.line == Some(line) && p.message.contains(msg)),
            "no problem {path} at line {line} containing {msg:?}: {ps:#?}"
        );
    };
    has(
        "camera[0].reference",
        "reference = true",
        "set reference on each region",
    );
    has(
        "camera[0].region[0].reference",
        "reference = \"\"",
        "an empty path",
    );
    has("camera[0].region[1].reference", "reference = 3", "");
    has("model.max_bank_mb", "max_bank_mb = 0", "");
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_scored_with_its_bank_publishes_the_scorers_combined_score_and_a_stale_bank_is_unknown()
 {
    use crate::common::broker::{Broker, Msg, Watcher};
    use crate::common::daemon::Daemon;

    let lib = ort_or_skip("region banks in the daemon").expect("ort");
    let dir = tempfile::tempdir().expect("tempdir");
    let frame = dir.path().join("frame.png");
    frame_png(&frame, 1, 24);
    let good = dir.path().join("good");
    std::fs::create_dir_all(&good).expect("mkdir");
    for i in 0..3 {
        frame_png(&good.join(format!("{i}.png")), 10 + i, 24);
    }
    let broker = Broker::start(None).await;
    let rect = "[0.25, 0.25, 0.5, 0.5]";
    let cfg_text = bank_config(dir.path(), "fsd", broker.port, &frame, rect);
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, &cfg_text).expect("config");

    // check-config refuses the missing bank at the key's line, naming camera and region.
    let check = |cfg: &Path| run(&["check-config", s(cfg)]);
    let o = check(&cfg);
    assert_eq!(o.status.code(), Some(2), "{}", all_text(&o));
    let want = format!(
        "config.toml:{}: camera[0].region[0].reference: camera \"cam\" region \"part\": no bank file",
        line_of(&cfg_text, "reference = true")
    );
    assert!(all_text(&o).contains(&want), "{want:?} in {}", all_text(&o));

    // The bank of the region's crops, into the state directory.
    let o = run(&[
        "reference",
        "--config",
        s(&cfg),
        "--camera",
        "cam",
        "--region",
        "part",
        "--images",
        s(&good),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", all_text(&o));
    let line: Value = serde_json::from_slice(&o.stdout).expect("one JSON line");
    let bank = dir.path().join("state/reference/cam/part.bank");
    assert_eq!(line["bank"], s(&bank));
    assert_eq!(line["k"], 3);
    let key = line["region_key"].as_str().expect("region_key").to_owned();
    assert!(key.starts_with("part:"), "{key}");
    assert!(bank.is_file());
    let o = check(&cfg);
    assert_eq!(o.status.code(), Some(0), "{}", all_text(&o));

    // What the scorer gives the region's crop of the camera's frame, with and without the bank.
    let opts = EngineOptions {
        backend: Backend::Cpu,
        threads: 1,
        ort_library: Some(lib),
        ..EngineOptions::default()
    };
    let mut scorer = Scorer::open(&tiny_package(), HashCheck::All, &opts).expect("scorer");
    let img = anomalyclip_edge::image_io::load_image(&frame).expect("frame");
    let rgb = img.to_rgb();
    let parsed = parse_config(&cfg_text, "c.toml", FsChecks::Disabled).expect("config");
    let shape = parsed.cameras[0].regions[0].shape.clone();
    let score = |scorer: &mut Scorer| {
        scorer
            .score_region(&rgb, 96, 64, 96 * 3, &shape, 0.5)
            .expect("score")
            .score
    };
    let zero_shot = score(&mut scorer);
    let reference = Reference::load(&bank, scorer.package(), &key, 256).expect("bank");
    scorer.set_reference(Some(reference));
    let combined = score(&mut scorer);
    assert!(
        (combined - zero_shot).abs() > 1e-3,
        "the bank changes the score: {combined} vs {zero_shot}"
    );

    let mut plc = Watcher::start(broker.port, "anomalyclip/fsd/#").await;
    let mut d = Daemon::start(&cfg_text);
    d.wait_ready().await;
    let topic = "anomalyclip/fsd/cam/part/result";
    let mut got: Vec<Msg> = Vec::new();
    plc.until(|m| {
        got.push(m.clone());
        got.iter().filter(|m| m.topic == topic).count() >= 2
    })
    .await;
    // Same pixels (PNG), crop, resize, engine and bank: equal up to the payload's rounding to
    // 4 decimals and float noise: |Δ| <= 1e-4.
    for m in got.iter().filter(|m| m.topic == topic) {
        let r = m.json();
        let published = r["score"].as_f64().expect("score") as f32;
        assert!(
            (published - combined).abs() <= 1e-4,
            "published {published}, scorer with the bank {combined}, zero-shot {zero_shot}: {r}"
        );
        assert_ne!(r["verdict"], "UNKNOWN", "{r}");
    }
    assert_eq!(
        d.log_lines(&["few-shot reference bank loaded", "cam/part"])
            .len(),
        1,
        "{}",
        d.log()
    );

    // The region moves: the bank was built for the old geometry. On reload the region is
    // UNKNOWN with `uncalibrated: reference: …` (logged once), and the daemon keeps running.
    let moved = bank_config(
        dir.path(),
        "fsd",
        broker.port,
        &frame,
        "[0.0, 0.0, 0.5, 0.5]",
    );
    d.write_config(&moved);
    let _ = plc.drain();
    d.signal(libc::SIGHUP);
    let stale = |m: &Msg| {
        m.topic == "anomalyclip/fsd/cam/part/calibration"
            && m.json()["status"]
                .as_str()
                .is_some_and(|s| s.starts_with("uncalibrated: reference:"))
    };
    let mut got: Vec<Msg> = Vec::new();
    plc.until(|m| {
        got.push(m.clone());
        got.iter()
            .skip_while(|m| !stale(m))
            .filter(|m| m.topic == topic)
            .count()
            >= 2
    })
    .await;
    let status = got
        .iter()
        .find(|m| stale(m))
        .map(|m| m.json()["status"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    assert!(
        status.contains("region") && status.contains(&key),
        "{status}"
    );
    for m in got
        .iter()
        .skip_while(|m| !stale(m))
        .filter(|m| m.topic == topic)
    {
        assert_eq!(m.json()["verdict"], "UNKNOWN", "{}", m.describe());
    }
    assert_eq!(
        d.log_lines(&["few-shot reference bank unusable", "cam/part"])
            .len(),
        1,
        "{}",
        d.log()
    );
    d.assert_running();
    // check-config refuses it too, naming the region key it was built for.
    std::fs::write(&cfg, &moved).expect("config");
    let o = check(&cfg);
    assert_eq!(o.status.code(), Some(2), "{}", all_text(&o));
    assert!(
        all_text(&o).contains("camera \"cam\" region \"part\"") && all_text(&o).contains(&key),
        "{}",
        all_text(&o)
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn a_live_region_bank_takes_distinct_frames_and_a_silent_camera_is_one_clear_error() {
    ort_or_skip("live region bank");
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("config.toml");
    let state = format!("state_dir = \"{}\"", dir.path().join("state").display());
    let camera = |pipeline: &str| {
        crate::common::daemon::config(
            "live",
            1,
            &format!(
                "[[camera]]\nname = \"cam\"\npipeline = \"{pipeline}\"\n\
                 [[camera.region]]\nname = \"part\"\nrect = [0.25, 0.25, 0.5, 0.5]\nreference = true\n"
            ),
        )
        .replace("state_dir = \"state\"", &state)
    };
    std::fs::write(
        &cfg,
        camera("videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=20/1"),
    )
    .expect("config");
    let bank = dir.path().join("state/reference/cam/part.bank");
    let o = run(&[
        "reference",
        "--config",
        s(&cfg),
        "--camera",
        "cam",
        "--region",
        "part",
        "--frames",
        "3",
        "--interval-ms",
        "20",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", all_text(&o));
    let line: Value = serde_json::from_slice(&o.stdout).expect("one JSON line");
    assert_eq!(line["k"], 3, "{line}");
    let first = std::fs::read(&bank).expect("bank written");

    // A camera that never delivers: one line, exit 2, the bank left as it was.
    std::fs::write(&cfg, camera("videotestsrc is-live=true ! valve drop=true")).expect("config");
    let o = run(&[
        "reference",
        "--config",
        s(&cfg),
        "--camera",
        "cam",
        "--region",
        "part",
        "--frames",
        "3",
        "--timeout-s",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", all_text(&o));
    assert!(
        all_text(&o).contains("delivered no frame"),
        "{}",
        all_text(&o)
    );
    assert_eq!(std::fs::read(&bank).expect("bank"), first);
    // An unknown region: one line naming it.
    let o = run(&[
        "reference",
        "--config",
        s(&cfg),
        "--camera",
        "cam",
        "--region",
        "lid",
        "--frames",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        all_text(&o).contains("no region \"lid\""),
        "{}",
        all_text(&o)
    );
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calibration_records_its_bank_and_is_refused_without_it_or_with_another() {
    use crate::common::broker::{Broker, Msg, Watcher};
    use crate::common::daemon::Daemon;

    ort_or_skip("calibration with a bank");
    let dir = tempfile::tempdir().expect("tempdir");
    let frame = dir.path().join("frame.png");
    frame_png(&frame, 1, 24);
    let good = dir.path().join("good");
    std::fs::create_dir_all(&good).expect("mkdir");
    for i in 0..19 {
        frame_png(&good.join(format!("{i:02}.png")), 100 + i, 40);
    }
    let broker = Broker::start(None).await;
    let with_bank = bank_config(
        dir.path(),
        "fsc",
        broker.port,
        &frame,
        "[0.25, 0.25, 0.5, 0.5]",
    )
    .replace("threshold = 0.9\n", "calibration = true\n");
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, &with_bank).expect("config");
    let bank = dir.path().join("state/reference/cam/part.bank");
    let build = |k: &str| {
        run(&[
            "reference",
            "--config",
            s(&cfg),
            "--camera",
            "cam",
            "--region",
            "part",
            "--images",
            s(&good),
            "--k",
            k,
        ])
    };
    let o = build("4");
    assert_eq!(o.status.code(), Some(0), "{}", all_text(&o));
    let id = anomalyclip_edge::reference::identity(&std::fs::read(&bank).expect("bank"));
    let o = run(&[
        "calibrate",
        "--config",
        s(&cfg),
        "--camera",
        "cam",
        "--region",
        "part",
        "--images",
        s(&good),
        "--rate",
        "0.05",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", all_text(&o));
    let cal: Value = serde_json::from_slice(&o.stdout).expect("calibration JSON");
    assert_eq!(cal["fingerprint"]["reference"], id.as_str(), "{cal}");
    assert!(all_text(&o).contains("combined score"), "{}", all_text(&o));

    let status_of = |got: &[Msg]| {
        got.iter()
            .rev()
            .find(|m| m.topic == "anomalyclip/fsc/cam/part/calibration")
            .map(|m| m.json()["status"].as_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    let mut plc = Watcher::start(broker.port, "anomalyclip/fsc/#").await;
    let mut d = Daemon::start(&with_bank);
    d.wait_ready().await;
    let mut got: Vec<Msg> = Vec::new();
    plc.until(|m| {
        got.push(m.clone());
        m.topic == "anomalyclip/fsc/cam/part/calibration"
    })
    .await;
    let cal_id = cal["id"].as_str().expect("id");
    assert_eq!(status_of(&got), format!("calibrated {cal_id}"));

    // Without the bank: the calibration (of combined scores) no longer applies.
    let without = with_bank.replace("reference = true\n", "");
    for (text, rebuild, want) in [
        (
            &without,
            false,
            format!("reference bank changed ({id} → none)"),
        ),
        (
            &with_bank,
            true,
            format!("reference bank changed ({id} → sha256:"),
        ),
    ] {
        if rebuild {
            // Another bank (K = 2): another identity.
            let o = build("2");
            assert_eq!(o.status.code(), Some(0), "{}", all_text(&o));
        }
        d.write_config(text);
        let _ = plc.drain();
        d.signal(libc::SIGHUP);
        let mut got: Vec<Msg> = Vec::new();
        plc.until(|m| {
            got.push(m.clone());
            status_of(&got).contains(&want)
        })
        .await;
        assert!(
            status_of(&got).starts_with("uncalibrated: calibration"),
            "{}",
            status_of(&got)
        );
    }
    d.assert_running();
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());
}
