//! `calibrate` and calibrated regions: thresholds from a folder of good images equal the
//! documented order statistic of the scores the `score` command gives the same images; too few
//! images for a rate is refused with the number needed; `--rollback` restores the previous file
//! byte for byte; the daemon applies a calibration whose fingerprint matches (results carry its
//! id, the retained calibration message says `calibrated`) and turns a region whose
//! calibration no longer matches into UNKNOWN with `uncalibrated: <reason>`, over a real
//! mosquitto.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common;
use crate::regions::score_files;
use common::broker::{Broker, Msg, Watcher};
use common::daemon::{BIN, Daemon, config};

/// `n` good-part images (64 × 64 RGB noise around a grey level, seeded) in `dir/good`.
fn good_images(dir: &Path, n: usize) -> Vec<PathBuf> {
    let good = dir.join("good");
    std::fs::create_dir_all(&good).expect("mkdir");
    let mut state: u32 = 7;
    (0..n)
        .map(|i| {
            let px: Vec<u8> = (0..64 * 64 * 3)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    100u8.wrapping_add((state >> 27) as u8)
                })
                .collect();
            let p = good.join(format!("{i:03}.png"));
            common::fx::write_rgb_png(&p, 64, 64, &px);
            p
        })
        .collect()
}

/// The daemon config of these tests: one camera (a still image), the implicit region decided
/// by its calibration; `extra` goes into the camera table. The state directory is `dir/state`.
fn cal_config(dir: &Path, node: &str, port: u16, image: &Path, extra: &str) -> String {
    let state = format!("state_dir = \"{}\"", dir.join("state").display());
    config(
        node,
        port,
        &format!(
            "[[camera]]\nname = \"cam\"\n\
             pipeline = \"filesrc location={} ! pngdec ! imagefreeze is-live=true ! video/x-raw,framerate=5/1\"\n\
             calibration = true\n{extra}\
             [camera.mask]\nenabled = false\n",
            image.display()
        ),
    )
    .replace("state_dir = \"state\"", &state)
}

fn calibrate(cfg: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["--log", "warn", "calibrate", "--config"])
        .arg(cfg)
        .args(["--camera", "cam"])
        .args(args)
        .output()
        .expect("run calibrate")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn folder_calibration_is_the_documented_order_statistic_and_rollback_restores_the_previous_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = good_images(dir.path(), 39);
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, cal_config(dir.path(), "c1", 1, &images[0], "")).expect("config");
    let good = dir.path().join("good");
    let good = good.to_str().expect("utf8");

    // N = 39, α = 0.05: r = N + 1 − ⌊α (N + 1)⌋ = 38, the second largest score.
    let o = calibrate(&cfg, &["--images", good, "--rate", "0.05"]);
    assert!(o.status.success(), "{}", text(&o));
    let cal: serde_json::Value = serde_json::from_slice(&o.stdout).expect("calibration JSON");
    let refs: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    let mut scores: Vec<f64> = score_files(&refs).into_iter().map(|(s, _)| s).collect();
    scores.sort_by(f64::total_cmp);
    let t2 = cal["t2"].as_f64().expect("t2");
    assert!(
        (t2 - scores[37]).abs() < 1e-5,
        "T2 {t2} is not the 38th of 39 sorted scores {scores:?}"
    );
    assert_eq!(cal["stats"]["n"], 39);
    assert!(cal["t1"].as_f64().expect("t1") <= t2);
    let file = dir.path().join("state/calibration/cam/_frame.json");
    let first = std::fs::read(&file).expect("calibration file written");

    // A second calibration replaces it; --rollback brings the first back, byte for byte.
    let o = calibrate(&cfg, &["--images", good, "--rate", "0.1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_ne!(std::fs::read(&file).expect("file"), first);
    let o = calibrate(&cfg, &["--rollback"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&file).expect("file"), first);

    // Too few images for the rate: exit 2, the number needed, nothing written.
    let o = calibrate(&cfg, &["--images", good, "--rate", "0.001"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("999"),
        "names the frames needed: {}",
        text(&o)
    );
    assert_eq!(std::fs::read(&file).expect("file"), first);

    // Unknown camera and region: one line naming them, exit 2.
    let o = Command::new(BIN)
        .args(["calibrate", "--config"])
        .arg(&cfg)
        .args(["--camera", "nope", "--images", good])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("no camera \"nope\""), "{}", text(&o));
    let o = calibrate(&cfg, &["--region", "lid", "--images", good]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("no region \"lid\""), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_applies_a_matching_calibration_and_refuses_a_stale_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = good_images(dir.path(), 19);
    let broker = Broker::start(None).await;
    let cfg_text = cal_config(dir.path(), "cal", broker.port, &images[3], "");
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, &cfg_text).expect("config");
    let mut plc = Watcher::start(broker.port, "anomalyclip/cal/#").await;
    let good = dir.path().join("good");
    let o = calibrate(
        &cfg,
        &["--images", good.to_str().expect("utf8"), "--rate", "0.05"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let cal: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let id = cal["id"].as_str().expect("id").to_owned();

    let mut d = Daemon::start(&cfg_text);
    d.wait_ready().await;
    let mut got: Vec<Msg> = Vec::new();
    plc.until(|m| {
        got.push(m.clone());
        got.iter()
            .filter(|m| m.topic == "anomalyclip/cal/cam/result")
            .count()
            >= 2
            && got
                .iter()
                .any(|m| m.topic == "anomalyclip/cal/cam/calibration")
    })
    .await;
    let r = got
        .iter()
        .find(|m| m.topic == "anomalyclip/cal/cam/result")
        .expect("result")
        .json();
    assert_eq!(r["cal"], id.as_str(), "{r}");
    let t2 = cal["t2"].as_f64().expect("t2");
    assert!(
        (r["threshold"].as_f64().expect("threshold") - t2).abs() < 1e-4,
        "{r}"
    );
    let expected = if r["score"].as_f64().expect("score") >= t2 {
        "NG"
    } else {
        "OK"
    };
    // (UNKNOWN between T1 and T2.)
    assert!(r["verdict"] == expected || r["verdict"] == "UNKNOWN", "{r}");
    let m = got
        .iter()
        .rev()
        .find(|m| m.topic == "anomalyclip/cal/cam/calibration")
        .expect("calibration message")
        .json();
    assert_eq!(
        (m["state"].as_str(), m["id"].as_str()),
        (Some("calibrated"), Some(id.as_str())),
        "{m}"
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());

    // The same calibration no longer applies once the statistic changes: every verdict is
    // UNKNOWN and the retained message says why.
    let stale = cal_config(
        dir.path(),
        "cal",
        broker.port,
        &images[3],
        "statistic = \"map_max\"\n",
    );
    let _ = plc.drain();
    let mut d = Daemon::start(&stale);
    d.wait_ready().await;
    let uncalibrated = |m: &Msg| {
        m.topic == "anomalyclip/cal/cam/calibration" && m.json()["state"] == "uncalibrated"
    };
    let mut got: Vec<Msg> = Vec::new();
    plc.until(|m| {
        got.push(m.clone());
        // Results of this daemon: those after its calibration message.
        got.iter()
            .skip_while(|m| !uncalibrated(m))
            .filter(|m| m.topic == "anomalyclip/cal/cam/result")
            .count()
            >= 2
    })
    .await;
    let after: Vec<&Msg> = got.iter().skip_while(|m| !uncalibrated(m)).collect();
    for m in after
        .iter()
        .filter(|m| m.topic == "anomalyclip/cal/cam/result")
    {
        let r = m.json();
        assert_eq!(
            (r["verdict"].as_str(), r["cal"].as_str()),
            (Some("UNKNOWN"), Some("")),
            "{r}"
        );
        assert_eq!(r["score_norm"], -1.0, "{r}");
    }
    let m = got
        .iter()
        .rev()
        .find(|m| m.topic == "anomalyclip/cal/cam/calibration")
        .expect("calibration message")
        .json();
    let status = m["status"].as_str().expect("status");
    assert!(
        status.starts_with("uncalibrated:")
            && status.contains("statistic changed (global → map_max)"),
        "{m}"
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());
}

#[test]
fn live_calibration_takes_distinct_frames_from_the_camera_and_a_silent_camera_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("config.toml");
    let state = format!("state_dir = \"{}\"", dir.path().join("state").display());
    let camera = |pipeline: &str| {
        config(
            "live",
            1,
            &format!(
                "[[camera]]\nname = \"cam\"\npipeline = \"{pipeline}\"\n\
                 [[camera.region]]\nname = \"part\"\nrect = [0.25, 0.25, 0.5, 0.5]\ncalibration = true\n"
            ),
        )
        .replace("state_dir = \"state\"", &state)
    };
    // A moving ball: consecutive frames differ, so none is skipped as a near-duplicate.
    std::fs::write(
        &cfg,
        camera("videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=20/1"),
    )
    .expect("config");
    let o = calibrate(
        &cfg,
        &[
            "--region",
            "part",
            "--frames",
            "12",
            "--min-interval-ms",
            "20",
            "--rate",
            "0.08",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let cal: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(cal["stats"]["n"], 12, "{cal}");
    assert_eq!(cal["source"], "camera");
    assert_eq!(cal["region"], "part");
    assert!(dir.path().join("state/calibration/cam/part.json").is_file());

    // A camera that never delivers a frame: one clear line, exit 2, nothing written.
    std::fs::write(&cfg, camera("videotestsrc is-live=true ! valve drop=true")).expect("config");
    let before = std::fs::read(dir.path().join("state/calibration/cam/part.json")).expect("file");
    let o = calibrate(
        &cfg,
        &["--region", "part", "--frames", "12", "--timeout-s", "3"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("delivered no frame"), "{}", text(&o));
    assert_eq!(
        std::fs::read(dir.path().join("state/calibration/cam/part.json")).expect("file"),
        before
    );
}
