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

/// The venv's Python (scripts/setup), or `ANOMALYCLIP_PYTHON`.
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.is_file() {
        return venv;
    }
    std::env::var_os("ANOMALYCLIP_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .expect("no .venv/bin/python and ANOMALYCLIP_PYTHON unset (run scripts/setup)")
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
    let o = Command::new(python())
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
