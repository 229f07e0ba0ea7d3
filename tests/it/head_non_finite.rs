//! A model that emits NaN: the frame fails with a typed error naming the output, and never
//! becomes a result (before: `score` 0.5 — an anomaly at the default threshold — or
//! `"score": null`).
//!
//! The fixture `tests/fixtures/nan_when_dark` (`engines/make_identity_package.py
//! --nan-when-dark`) is the identity package with a square root in its global feature: NaN for a
//! black image, finite for a white one. Checked through the scorer (one failing image of a batch
//! leaves the others scored), the `score` CLI (the image's `error`, exit 1) and the daemon
//! (nothing published for the dark camera, an inference error logged, the lit camera goes on).
//! Needs the ONNX Runtime library (skipped without it unless `ANOMALYCLIP_REQUIRE_ORT` is set);
//! the daemon test also needs mosquitto and GStreamer's `videotestsrc`.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anomalyclip_edge::engine::EngineOptions;
use anomalyclip_edge::head::FrameValue;
use anomalyclip_edge::package::HashCheck;
use anomalyclip_edge::scorer::{ScoreError, Scorer};
use common::broker::{Broker, Msg, Watcher};
use common::daemon::{Daemon, config, tiny_model};
use common::golden::ort_or_skip;
use serde_json::Value;

fn nan_package() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nan_when_dark")
}

/// Writes a uniform `value` grey 64×48 PNG into `dir`.
fn uniform_png(dir: &Path, name: &str, value: u8) -> PathBuf {
    let p = dir.join(name);
    image::RgbImage::from_pixel(64, 48, image::Rgb([value; 3]))
        .save(&p)
        .expect("write png");
    p
}

fn open_nan_scorer() -> Scorer {
    Scorer::open(&nan_package(), HashCheck::All, &EngineOptions::default()).expect("nan package")
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn a_model_that_emits_nan_fails_that_image_only_naming_the_global_feature() {
    let Some(_) = ort_or_skip("nan scorer") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let black = uniform_png(dir.path(), "black.png", 0);
    let white = uniform_png(dir.path(), "white.png", 255);
    let mut scorer = open_nan_scorer();

    let results = scorer
        .score_files(&[&black, &white, &black])
        .expect("the batch runs");
    assert_eq!(results.len(), 3);
    for r in [&results[0], &results[2]] {
        match r {
            Err(ScoreError::NonFinite(n)) => {
                assert_eq!(n.what, FrameValue::GlobalFeature);
                assert_eq!(n.count, 32, "every float of the global feature is NaN");
            }
            other => panic!("black image: expected ScoreError::NonFinite, got {other:?}"),
        }
    }
    let lit = results[1].as_ref().expect("the white image is scored");
    assert!((0.0..=1.0).contains(&lit.score), "{}", lit.score);
    assert!(lit.map.iter().all(|v| v.is_finite()));
    assert!(lit.map_max.is_finite() && (0.0..=1.0).contains(&lit.area));

    // One image at a time, and the all-or-nothing batch call.
    let err = scorer.score_file(&black).expect_err("black image");
    let msg = err.to_string();
    assert!(
        msg.contains("non-finite") && msg.contains("global feature"),
        "{msg}"
    );
    assert!(scorer.score_file(&white).is_ok());
    let s = scorer.size();
    let mut input = vec![0f32; 2 * 3 * s * s];
    for (i, p) in [&white, &black].into_iter().enumerate() {
        let img = anomalyclip_edge::image_io::load_image(p).expect("decode");
        scorer
            .prepare_image(&img, &mut input[i * 3 * s * s..(i + 1) * 3 * s * s])
            .expect("prepare");
    }
    assert!(matches!(
        scorer.score_batch(&input, 2),
        Err(ScoreError::NonFinite(_))
    ));
    let each = scorer
        .score_frames(&input, &[0.5, 0.5])
        .expect("the batch runs");
    assert!(each[0].is_ok() && matches!(each[1], Err(ScoreError::NonFinite(_))));
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[test]
fn score_cli_writes_a_nan_image_as_its_error_and_exits_1() {
    let Some(lib) = ort_or_skip("nan score cli") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let black = uniform_png(dir.path(), "black.png", 0);
    let white = uniform_png(dir.path(), "white.png", 255);
    let out = Command::new(common::daemon::BIN)
        .env("ORT_DYLIB_PATH", lib)
        .args(["--log", "off", "score", "--model"])
        .arg(nan_package())
        .arg(&black)
        .arg(&white)
        .output()
        .expect("run anomalyclip-edge");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout {stdout}\nstderr {stderr}"
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let err = lines[0]["error"]
        .as_str()
        .expect("error for the black image");
    assert!(
        err.contains("non-finite") && err.contains("global feature"),
        "{err}"
    );
    assert!(lines[0].get("score").is_none(), "{}", lines[0]);
    let score = lines[1]["score"]
        .as_f64()
        .expect("score for the white image");
    assert!((0.0..=1.0).contains(&score));
    assert!(lines[1].get("error").is_none());
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].starts_with("error: ") && errors[0].contains("non-finite"));
}

/// A `[[camera]]` table with a live `videotestsrc` of `pattern`, masks for every frame.
fn test_camera(name: &str, pattern: &str) -> String {
    format!(
        "[[camera]]\n\
         name = \"{name}\"\n\
         pipeline = \"videotestsrc is-live=true pattern={pattern} ! video/x-raw,width=160,height=120,framerate=10/1 ! appsink name=sink\"\n\
         threshold = 0.0\n\
         [camera.mask]\n\
         size = 32\n\
         only_on_anomaly = false\n\
         min_interval_ms = 0\n"
    )
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_publishes_nothing_for_nan_frames_and_logs_an_inference_error() {
    if ort_or_skip("nan daemon").is_none() {
        return;
    }
    let broker = Broker::start(None).await;
    let mut plc = Watcher::start(broker.port, "anomalyclip/nan/#").await;
    let cameras = format!(
        "{}{}",
        test_camera("dark", "black"),
        test_camera("lit", "white")
    );
    let text = config("nan", broker.port, &cameras).replace(
        &format!("package = \"{}\"", tiny_model().display()),
        &format!("package = \"{}\"", nan_package().display()),
    );
    assert!(text.contains("nan_when_dark"), "{text}");
    let mut d = Daemon::start(&text);
    d.wait_ready().await;

    // The lit camera publishes results and masks (threshold 0: every frame anomalous).
    let mut got: Vec<Msg> = Vec::new();
    plc.until(|m| {
        got.push(m.clone());
        got.iter()
            .filter(|m| m.topic == "anomalyclip/nan/lit/result")
            .count()
            >= 10
    })
    .await;
    let lines = d
        .wait_log(
            &["inference failed; this frame is not scored", "non-finite"],
            1,
        )
        .await;
    assert!(lines[0].contains("global feature"), "{}", lines[0]);
    // The dark camera is online, yet nothing was published for its frames.
    for suffix in ["result", "alarm", "mask"] {
        let topic = format!("anomalyclip/nan/dark/{suffix}");
        let n = got.iter().filter(|m| m.topic == topic).count();
        assert_eq!(n, 0, "{n} messages on {topic}");
    }
    assert!(
        got.iter()
            .any(|m| m.topic == "anomalyclip/nan/dark/status" && m.text() == "online"),
        "dark camera status"
    );
    for m in got
        .iter()
        .filter(|m| m.topic == "anomalyclip/nan/lit/result")
    {
        let v = m.json();
        let score = v["score"].as_f64().expect("numeric score");
        assert!((0.0..=1.0).contains(&score), "{v}");
        assert!(v["area"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)));
    }
    d.assert_running();
}
