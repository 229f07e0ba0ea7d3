//! Speed options as a user meets them: `bench` on the committed tiny package, the int8 model
//! against fp32 on the golden images, and the precision rules — the manifest's `precisions` list
//! is honoured, a missing or unknown precision and fp16 on the CPU are errors (exit 2), never a
//! silent fallback. The tiny package has random weights: its timings say nothing about the real
//! model, only that the wiring works (real numbers: `docs/measurements/speed-cpu.md`).
//! Needs the ONNX Runtime library (ignored without it; CI runs it with `--include-ignored`).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anomalyclip_edge::config::{FsChecks, parse_config};
use anomalyclip_edge::engine::{Backend, EngineOptions, Precision};
use anomalyclip_edge::package::{HashCheck, ModelPackage};
use anomalyclip_edge::scorer::Scorer;
use common::golden::{Golden, ort_or_skip, tiny_package};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_anomalyclip-edge");

/// Drift of the int8 model against fp32 on the golden images (tiny model, this pipeline).
/// Measured (AMD EPYC, ONNX Runtime 1.31.1): |Δscore| ≤ 0.020, max |Δmap| ≤ 0.016 — the same as
/// the exporter's Python check. Bounds with margin; the tiny model's 32-wide features make each
/// quantization step count more than the real model's 768-wide ones.
const INT8_SCORE_TOL: f32 = 0.03;
const INT8_MAP_TOL: f32 = 0.025;

fn run(lib: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .env("ORT_DYLIB_PATH", lib)
        .args(["--log", "off"])
        .args(args)
        .output()
        .expect("run anomalyclip-edge")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

/// Exit 2 and one `error: ` line on stderr holding every needle.
fn assert_exit_2(case: &str, out: &Output, needles: &[&str]) {
    let err = stderr_of(out);
    assert_eq!(out.status.code(), Some(2), "{case}: stderr {err:?}");
    assert_eq!(err.lines().count(), 1, "{case}: {err:?}");
    assert!(
        err.starts_with("error: ") && !err.contains("panicked"),
        "{case}: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{case}: {err:?} does not mention {n:?}");
    }
    assert!(
        out.stdout.is_empty(),
        "{case}: something was measured or scored"
    );
}

/// A copy of the tiny package whose manifest lists `precisions` (the files stay, hashed).
fn package_listing(dir: &Path, precisions: &str) -> PathBuf {
    let pkg = dir.join("pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    for e in std::fs::read_dir(tiny_package()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), pkg.join(e.file_name())).unwrap();
    }
    let manifest = std::fs::read_to_string(pkg.join("manifest.toml")).unwrap();
    let replaced = manifest.replace(
        "precisions = [\"fp32\", \"fp16\", \"int8\"]",
        &format!("precisions = {precisions}"),
    );
    assert_ne!(replaced, manifest, "the tiny manifest lists its precisions");
    std::fs::write(pkg.join("manifest.toml"), replaced).unwrap();
    pkg
}

/// `bench --json` on the tiny package, batches 1 and 2, two iterations, small frames, one
/// thread, plus `extra`.
fn bench_tiny(lib: &Path, extra: &[&str]) -> Output {
    let model = tiny_package();
    let mut args = vec![
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--batch",
        "1,2",
        "--iterations",
        "2",
        "--frame",
        "320x240",
        "--threads",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    run(lib, &args)
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn bench_on_the_tiny_package_prints_one_json_object_with_positive_timings() {
    let Some(lib) = ort_or_skip("bench_json") else {
        return;
    };
    for precision in ["fp32", "int8"] {
        let out = bench_tiny(&lib, &["--precision", precision]);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr_of(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.trim().lines().count(), 1, "one JSON object: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["precision"], precision);
        assert_eq!(v["backend"], "cpu");
        assert_eq!(v["head"], "cpu");
        assert_eq!(v["tiny"], true);
        assert_eq!(v["input_size"], 112);
        assert_eq!(v["iterations"], 2);
        assert!(v["load_ms"].as_f64().unwrap() > 0.0);
        assert!(v["peak_rss_mb"].as_f64().unwrap() > 1.0);
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        for (r, batch) in results.iter().zip([1, 2]) {
            assert_eq!(r["batch"], batch);
            for key in [
                "engine_ms_per_batch",
                "engine_ms_per_batch_min",
                "engine_ms_per_image",
                "preprocess_ms_per_image",
                "head_ms_per_image",
                "end_to_end_ms_per_image",
                "frames_per_s",
            ] {
                let x = r[key].as_f64().unwrap_or_else(|| panic!("{key}: {r}"));
                assert!(x.is_finite() && x > 0.0, "{key} = {x}");
            }
            let per_image = r["engine_ms_per_batch"].as_f64().unwrap() / f64::from(batch);
            assert!((r["engine_ms_per_image"].as_f64().unwrap() - per_image).abs() < 1e-9);
            assert!(r["few_shot_ms_per_image"].is_null(), "no bank asked: {r}");
        }
        assert_eq!(v["few_shot_k"], 0);
    }
}

/// `bench --few-shot K` builds a bank of K synthetic frames, states its size (layers × K ×
/// tokens × dim × 4 bytes) and times the matching per image beside the end-to-end frame.
#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn bench_few_shot_times_the_bank_matching_and_states_the_bank_size() {
    let Some(lib) = ort_or_skip("bench_few_shot") else {
        return;
    };
    let out = bench_tiny(&lib, &["--few-shot", "3"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr_of(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["few_shot_k"], 3);
    assert_eq!(v["bank_layers"], 1);
    // The tiny package: 8 × 8 tokens of dimension 32, one layer, f32.
    assert_eq!(v["bank_bytes"], 3 * 64 * 32 * 4);
    for r in v["results"].as_array().unwrap() {
        let f = r["few_shot_ms_per_image"]
            .as_f64()
            .unwrap_or_else(|| panic!("{r}"));
        assert!(f.is_finite() && f > 0.0, "few_shot_ms_per_image = {f}");
    }
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn bench_refuses_bad_options_before_measuring() {
    let Some(lib) = ort_or_skip("bench_bad_options") else {
        return;
    };
    let model = tiny_package();
    let m = model.to_str().unwrap();
    for (case, args, needle) in [
        ("batch 0", vec!["--batch", "0"], "--batch 0"),
        ("batch 65", vec!["--batch", "1,65"], "--batch 65"),
        ("iterations 0", vec!["--iterations", "0"], "--iterations 0"),
        ("threads", vec!["--threads", "100000"], "--threads 100000"),
        ("frame", vec!["--frame", "0x5"], "WIDTHxHEIGHT"),
        ("precision", vec!["--precision", "int4"], "int4"),
        ("few-shot 65", vec!["--few-shot", "65"], "--few-shot 65"),
    ] {
        let mut all = vec!["bench", "--model", m];
        all.extend(args);
        let out = run(&lib, &all);
        assert_eq!(out.status.code(), Some(2), "{case}: {}", stderr_of(&out));
        assert!(
            stderr_of(&out).contains(needle),
            "{case}: {}",
            stderr_of(&out)
        );
        assert!(out.stdout.is_empty(), "{case}");
    }
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn the_int8_model_scores_the_golden_images_within_the_stated_drift_of_fp32() {
    let Some(lib) = ort_or_skip("int8_drift") else {
        return;
    };
    let open = |precision| {
        let opts = EngineOptions {
            backend: Backend::Cpu,
            ort_library: Some(lib.clone()),
            precision,
            threads: 1,
            ..EngineOptions::default()
        };
        Scorer::open(&tiny_package(), HashCheck::All, &opts).expect("scorer")
    };
    let (mut fp32, mut int8) = (open(Precision::Fp32), open(Precision::Int8));
    assert_eq!(int8.engine().info().precision, Precision::Int8);
    let golden = Golden::load();
    let (mut worst_score, mut worst_map) = (0f32, 0f32);
    for img in &golden.images {
        let (_, a) = fp32.score_file(&img.path).unwrap();
        let (_, b) = int8.score_file(&img.path).unwrap();
        assert!(b.score.is_finite() && b.map.iter().all(|v| v.is_finite()));
        worst_score = worst_score.max((a.score - b.score).abs());
        worst_map = worst_map.max(common::max_abs_diff(&a.map, &b.map).0);
    }
    eprintln!("int8 vs fp32 on the golden images: |Δscore| ≤ {worst_score}, |Δmap| ≤ {worst_map}");
    assert!(
        worst_score <= INT8_SCORE_TOL && worst_map <= INT8_MAP_TOL,
        "int8 drift: score {worst_score} (bound {INT8_SCORE_TOL}), map {worst_map} (bound {INT8_MAP_TOL})"
    );
    assert!(
        worst_score > 0.0,
        "int8 gave the fp32 scores exactly: did it load model.int8.onnx?"
    );
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn a_precision_the_manifest_does_not_list_is_exit_2_naming_the_package_and_what_it_has() {
    let Some(lib) = ort_or_skip("missing_precision") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // model.int8.onnx is present and hashed, but the manifest does not list int8: refused.
    let pkg = package_listing(tmp.path(), r#"["fp32", "fp16"]"#);
    let loaded = ModelPackage::load(&pkg, HashCheck::All).unwrap();
    assert_eq!(loaded.precisions(), vec![Precision::Fp32, Precision::Fp16]);
    let p = pkg.to_str().unwrap();
    let image = Golden::load().images[0].path.clone();
    let img = image.to_str().unwrap();
    let needles = [p, "no int8 model", "it has fp32, fp16", "export.py --int8"];
    let out = run(&lib, &["score", "--model", p, "--precision", "int8", img]);
    assert_exit_2("score", &out, &needles);
    let out = run(&lib, &["bench", "--model", p, "--precision", "int8"]);
    assert_exit_2("bench", &out, &needles);
    let data = tmp.path().join("data");
    let out = run(
        &lib,
        &[
            "eval",
            "--model",
            p,
            "--precision",
            "int8",
            "--data",
            data.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "eval: {}", stderr_of(&out));
    // The same package scores with what it lists.
    let out = run(&lib, &["score", "--model", p, "--precision", "fp32", img]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn fp16_on_the_cpu_backend_is_exit_2_not_a_silent_fp32_run() {
    let Some(lib) = ort_or_skip("fp16_cpu") else {
        return;
    };
    let m = tiny_package();
    let image = Golden::load().images[0].path.clone();
    let out = run(
        &lib,
        &[
            "score",
            "--model",
            m.to_str().unwrap(),
            "--precision",
            "fp16",
            "--backend",
            "cpu",
            image.to_str().unwrap(),
        ],
    );
    assert_exit_2(
        "fp16 on cpu",
        &out,
        &["precision fp16 needs a GPU backend", "cpu"],
    );
}

#[test]
fn the_engine_precision_key_parses_and_an_unknown_one_is_a_problem_at_its_line() {
    let base = "node_id = \"n\"\n[model]\npackage = \"/p\"\n[mqtt]\nhost = \"b\"\n\
                [[camera]]\nname = \"c\"\nuri = \"rtsp://h/s\"\n[engine]\n";
    let cfg = parse_config(base, "t.toml", FsChecks::Disabled).unwrap();
    assert_eq!(cfg.engine.precision, Precision::Fp32, "default");
    let cfg = parse_config(
        &format!("{base}precision = \"int8\"\n"),
        "t.toml",
        FsChecks::Disabled,
    )
    .unwrap();
    assert_eq!(cfg.engine.precision, Precision::Int8);
    let e = parse_config(
        &format!("{base}precision = \"int4\"\n"),
        "t.toml",
        FsChecks::Disabled,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("t.toml:10") && e.contains("int4"), "{e}");
}

/// A package exported with `--fused-attention` (ONNX Runtime's MultiHeadAttention operator, the
/// CPU graph option of docs/measurements/speed-cpu.md) loads, says so in its manifest, and scores
/// the golden images through this binary like the PyTorch reference (≤ 1e-4 on the score and
/// the map maximum: fp32 parity).
#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn a_fused_attention_package_scores_like_the_reference() {
    let Some(lib) = ort_or_skip("fused_attention") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pkg = dir.path().join("fused");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(common::venv_python())
        .arg(repo.join("engines/export.py"))
        .args([
            "--tiny",
            "--seed",
            "0",
            "--fused-attention",
            "--quiet",
            "--out",
        ])
        .arg(&pkg)
        .output()
        .expect("run engines/export.py");
    assert!(out.status.success(), "export: {}", stderr_of(&out));
    let m = ModelPackage::load(&pkg, HashCheck::All).expect("fused package loads");
    assert_eq!(
        m.manifest.model.attention,
        anomalyclip_edge::package::Attention::Fused
    );
    let golden = Golden::load();
    let mut args = vec!["score".to_string(), "--model".into()];
    args.push(pkg.to_str().unwrap().into());
    for img in &golden.images {
        args.push(img.path.to_str().unwrap().into());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&lib, &argv);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), golden.images.len());
    for (img, line) in golden.images.iter().zip(&lines) {
        let score = line["score"].as_f64().unwrap() as f32;
        let map_max = line["map_max"].as_f64().unwrap() as f32;
        assert!(
            (score - img.score).abs() <= 1e-4,
            "{}: score {score} vs {}",
            img.name,
            img.score
        );
        assert!(
            (map_max - img.map_max).abs() <= 1e-4,
            "{}: map max {map_max} vs {}",
            img.name,
            img.map_max
        );
    }
}
