//! Regions of interest and per-region decisions: the `[[camera.region]]` configuration (every
//! bad region reported at its line, with its camera and region), and the daemon scoring each
//! region as its own image with its own verdict, alarm and mask over a real mosquitto.

use anomalyclip_edge::config::{ConfigErrors, FsChecks, Problem, parse_config};
use anomalyclip_edge::decision::Statistic;
use anomalyclip_edge::region::Units;

fn base(regions: &str) -> String {
    format!(
        "node_id = \"n1\"\n[model]\npackage = \"/nonexistent\"\n[mqtt]\nhost = \"localhost\"\n\
         [[camera]]\nname = \"cam\"\nuri = \"/dev/video0\"\nthreshold = 0.6\n{regions}"
    )
}

fn problems(text: &str) -> Vec<Problem> {
    match parse_config(text, "config.toml", FsChecks::Disabled) {
        Ok(c) => panic!("expected problems, got {c:?}"),
        Err(e) => e.problems,
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in text"))
}

/// Asserts a problem with this path on the line of `needle` whose message contains `msg`.
fn expect(ps: &[Problem], text: &str, path: &str, needle: &str, msg: &str) {
    let line = line_of(text, needle);
    assert!(
        ps.iter()
            .any(|p| p.path == path && p.line == Some(line) && p.message.contains(msg)),
        "no problem {path} at line {line} containing {msg:?}; got:\n{}",
        ConfigErrors {
            problems: ps.to_vec()
        }
    );
}

#[test]
fn a_camera_without_regions_has_one_implicit_whole_frame_region_with_its_threshold() {
    let cfg =
        parse_config(&base(""), "c.toml", FsChecks::Disabled).unwrap_or_else(|e| panic!("{e}"));
    let cam = &cfg.cameras[0];
    assert_eq!(cam.regions.len(), 1);
    let r = &cam.regions[0];
    assert_eq!(r.name, None);
    assert!(r.shape.is_full());
    assert_eq!((r.threshold, r.t1, r.calibrated), (0.6, None, false));
    assert_eq!(r.statistic, Statistic::Global);
    assert!(!cam.has_named_regions());
    // Without regions GStreamer scales the frames to the model's input, as before.
    assert_eq!(cam.settings(224).scale, Some((224, 224)));
}

#[test]
fn named_regions_resolve_with_inherited_and_own_keys() {
    let text = base(
        "statistic = \"map_max\"\n\
         [[camera.region]]\nname = \"left\"\nrect = [0.0, 0.0, 0.5, 1.0]\n\
         ignore = [[[0.1, 0.1], [0.2, 0.1], [0.2, 0.2]]]\n\
         [[camera.region]]\nname = \"right\"\nrect_px = [960, 0, 960, 1080]\nstatistic = \"blend\"\nthreshold = 0.8\nt1 = 0.7\n\
         [[camera.region]]\nname = \"lid\"\nrect = [0.25, 0.25, 0.5, 0.5]\ncalibration = true\n",
    );
    let cfg = parse_config(&text, "c.toml", FsChecks::Disabled).unwrap_or_else(|e| panic!("{e}"));
    let cam = &cfg.cameras[0];
    assert!(cam.has_named_regions());
    assert_eq!(
        cam.settings(224).scale,
        None,
        "regions crop the full-resolution frame"
    );
    let [l, r, lid] = &cam.regions[..] else {
        panic!("{:?}", cam.regions)
    };
    assert_eq!(l.name.as_deref(), Some("left"));
    assert_eq!(l.shape.units, Units::Fraction);
    assert_eq!(l.shape.ignore.len(), 1);
    assert_eq!((l.statistic, l.threshold), (Statistic::MapMax, 0.6));
    assert_eq!(r.shape.units, Units::Pixel);
    assert_eq!(
        (r.statistic, r.threshold, r.t1),
        (Statistic::Blend, 0.8, Some(0.7))
    );
    assert!(lid.calibrated && !l.calibrated);
}

#[test]
fn every_bad_region_is_reported_at_its_line_naming_camera_and_region() {
    let text = base(
        "[[camera.region]]\nname = \"status\"\nrect = [0.0, 0.0, 0.5, 1.0]\n\
         [[camera.region]]\nname = \"a\"\nrect = [0.6, 0.0, 0.5, 1.0] # outside\n\
         [[camera.region]]\nname = \"a\"\nrect = [0.0, 0.0, 0.0, 0.5] # zero\n\
         [[camera.region]]\nname = \"b\"\nrect = [0.0, 0.0, 0.5] # three\n\
         [[camera.region]]\nname = \"c\"\nrect = [0.0, 0.0, 0.5, 0.5] # both\nrect_px = [0, 0, 1, 1]\n\
         [[camera.region]]\nname = \"d\"\nrect = [0.0, 0.0, 0.5, 0.5]\nignore = [[[0.1, 0.1], [0.4, 0.4], [0.4, 0.1], [0.1, 0.4]]] # bow\n\
         [[camera.region]]\nname = \"e\"\nrect = [0.0, 0.0, 0.5, 0.5]\nignore = [[[0.1, 0.1], [0.9, 0.1], [0.1, 0.3]]] # poly-out\n\
         [[camera.region]]\nname = \"f\"\nrect = [0.0, 0.0, 0.5, 0.5]\nstatistic = \"mean\"\n\
         [[camera.region]]\nname = \"g\"\nrect = [0.0, 0.0, 0.5, 0.5]\nthreshold = 0.5\nt1 = 0.9\n\
         [[camera.region]]\nname = \"h\"\nrect = [0.0, 0.0, 0.5, 0.5]\nthreshold = 0.5\ncalibration = true\n\
         [[camera.region]]\nname = \"i\"\nrect_px = [0, 0, 10.5, 10]\n",
    );
    let ps = problems(&text);
    let p = "camera[0].region";
    expect(
        &ps,
        &text,
        &format!("{p}[0].name"),
        "\"status\"",
        "camera topic of its own",
    );
    expect(
        &ps,
        &text,
        &format!("{p}[1].rect"),
        "# outside",
        "outside the frame",
    );
    let dup = ps
        .iter()
        .find(|q| q.path == format!("{p}[2].name"))
        .unwrap_or_else(|| panic!("no duplicate-name problem: {ps:?}"));
    assert!(
        dup.message
            .contains("duplicate region name \"a\" (also region[1]"),
        "{dup:?}"
    );
    assert_eq!(dup.line, Some(line_of(&text, "# zero") - 1));
    expect(&ps, &text, &format!("{p}[2].rect"), "# zero", "zero area");
    expect(
        &ps,
        &text,
        &format!("{p}[3].rect"),
        "# three",
        "expected 4 numbers",
    );
    expect(&ps, &text, &format!("{p}[4].rect"), "# both", "not both");
    expect(
        &ps,
        &text,
        &format!("{p}[5].ignore[0]"),
        "# bow",
        "intersects itself",
    );
    expect(
        &ps,
        &text,
        &format!("{p}[6].ignore[0]"),
        "# poly-out",
        "outside the region",
    );
    expect(
        &ps,
        &text,
        &format!("{p}[7].statistic"),
        "\"mean\"",
        "global, map_max, blend",
    );
    expect(
        &ps,
        &text,
        &format!("{p}[8].t1"),
        "t1 = 0.9",
        "above threshold",
    );
    let both = ps
        .iter()
        .find(|q| q.path == format!("{p}[9].threshold"))
        .unwrap_or_else(|| panic!("no threshold/calibration problem: {ps:?}"));
    assert!(both.message.contains("not both"), "{both:?}");
    expect(
        &ps,
        &text,
        &format!("{p}[10].rect_px"),
        "10.5",
        "whole pixels",
    );
}

// ---------------------------------------------------------------------------------------------
// End to end: regions over a real mosquitto
// ---------------------------------------------------------------------------------------------

use std::path::Path;
use std::process::Command;

use crate::common;
use common::broker::{Broker, Msg, Watcher};
use common::daemon::{BIN, Daemon, config, tiny_model};

/// `(score, map_max)` of image files by the `score` command (the same model and resampling as
/// the daemon's crops).
pub(crate) fn score_files(files: &[&Path]) -> Vec<(f64, f64)> {
    let out = Command::new(BIN)
        .args(["--log", "warn", "score", "--threads", "1", "--model"])
        .arg(tiny_model())
        .args(files)
        .output()
        .expect("run score");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            (
                v["score"].as_f64().expect("score"),
                v["map_max"].as_f64().expect("map_max"),
            )
        })
        .collect()
}

/// A frame whose left half is a busy pattern (the "defect") and right half a smooth gradient.
fn frame(w: u32, h: u32) -> Vec<u8> {
    let mut px = Vec::with_capacity((w * h * 3) as usize);
    let mut state: u32 = 12345;
    for y in 0..h {
        for x in 0..w {
            if x < w / 2 {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let v = (state >> 16) as u8;
                px.extend_from_slice(&[v, v.wrapping_mul(3), 255 - v]);
            } else {
                let g = (y * 255 / h) as u8;
                px.extend_from_slice(&[g / 2 + 60, g / 2 + 60, g / 2 + 70]);
            }
        }
    }
    px
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_region_is_scored_as_its_own_image_with_its_own_verdict_alarm_and_mask() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (w, h) = (320u32, 160u32);
    let px = frame(w, h);
    let frame_png = dir.path().join("frame.png");
    common::fx::write_rgb_png(&frame_png, w, h, &px);
    // The halves as files, to learn the tiny model's scores of exactly these crops.
    let half = |left: bool| -> Vec<u8> {
        let mut out = Vec::new();
        for y in 0..h as usize {
            let row = &px[y * w as usize * 3..(y + 1) * w as usize * 3];
            let (a, b) = row.split_at(w as usize / 2 * 3);
            out.extend_from_slice(if left { a } else { b });
        }
        out
    };
    let (lp, rp) = (dir.path().join("left.png"), dir.path().join("right.png"));
    common::fx::write_rgb_png(&lp, w / 2, h, &half(true));
    common::fx::write_rgb_png(&rp, w / 2, h, &half(false));
    let s = score_files(&[&lp, &rp]);
    let ((sl, ml), (sr, _)) = (s[0], s[1]);
    assert!(
        (sl - sr).abs() > 2e-3,
        "the two halves must score apart for this test to mean anything: {sl} vs {sr}"
    );
    // One hand-set threshold between the two scores: the higher half is NG, the other OK.
    let t = (sl + sr) / 2.0;
    let (hot, cold) = if sl > sr {
        ("left", "right")
    } else {
        ("right", "left")
    };
    let rect = |side: &str| {
        if side == "left" {
            "[0.0, 0.0, 0.5, 1.0]"
        } else {
            "[0.5, 0.0, 0.5, 1.0]"
        }
    };
    // map_max on the left half: NG at half its map maximum; the same region with an ignore
    // polygon over all of it is OK (nothing is left to light up).
    let l_poly = "[[[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 1.0]]]";
    let cameras = format!(
        "[[camera]]\nname = \"cam\"\n\
         pipeline = \"filesrc location={frame} ! pngdec ! imagefreeze is-live=true ! video/x-raw,framerate=5/1\"\n\
         threshold = {t}\n\
         [camera.alarm]\nraise_count = 1\nraise_window = 1\nclear_count = 1\n\
         [camera.mask]\nsize = 32\nonly_on_anomaly = true\nmin_interval_ms = 0\n\
         [[camera.region]]\nname = \"{hot}\"\nrect = {hot_rect}\n\
         [[camera.region]]\nname = \"{cold}\"\nrect = {cold_rect}\n\
         [[camera.region]]\nname = \"lmap\"\nrect = [0.0, 0.0, 0.5, 1.0]\nstatistic = \"map_max\"\nthreshold = {mt}\n\
         [[camera.region]]\nname = \"lmasked\"\nrect = [0.0, 0.0, 0.5, 1.0]\nstatistic = \"map_max\"\nthreshold = {mt}\nignore = {l_poly}\n",
        frame = frame_png.display(),
        hot_rect = rect(hot),
        cold_rect = rect(cold),
        mt = ml / 2.0,
    );
    let broker = Broker::start(None).await;
    let mut plc = Watcher::start(broker.port, "anomalyclip/rg/#").await;
    let mut d = Daemon::start(&config("rg", broker.port, &cameras));
    d.wait_ready().await;
    let topic = |region: &str, leaf: &str| format!("anomalyclip/rg/cam/{region}/{leaf}");
    let mut got: Vec<Msg> = Vec::new();
    plc.until(|m| {
        got.push(m.clone());
        ["left", "right", "lmap", "lmasked"]
            .iter()
            .all(|r| got.iter().filter(|m| m.topic == topic(r, "result")).count() >= 3)
            && got.iter().any(|m| m.topic == topic(hot, "alarm"))
            && got.iter().any(|m| m.topic == topic(hot, "mask"))
    })
    .await;
    let on = |t: String| got.iter().filter(move |m| m.topic == t).collect::<Vec<_>>();
    let verdicts = |region: &str| -> Vec<String> {
        on(topic(region, "result"))
            .iter()
            .map(|m| {
                let v = m.json();
                assert!(m.payload.len() <= 512, "{}", m.text());
                assert_eq!(v["region"], region, "{v}");
                assert_eq!(v["camera"], "cam", "{v}");
                assert_eq!(v["cal"], "manual", "{v}");
                v["verdict"].as_str().expect("verdict").to_owned()
            })
            .collect()
    };
    assert!(
        verdicts(hot).iter().all(|v| v == "NG"),
        "{hot}: {:?}",
        verdicts(hot)
    );
    assert!(
        verdicts(cold).iter().all(|v| v == "OK"),
        "{cold}: {:?}",
        verdicts(cold)
    );
    assert!(
        verdicts("lmap").iter().all(|v| v == "NG"),
        "{:?}",
        verdicts("lmap")
    );
    assert!(
        verdicts("lmasked").iter().all(|v| v == "OK"),
        "an ignore polygon over the whole region leaves nothing to light up: {:?}",
        verdicts("lmasked")
    );
    let masked = on(topic("lmasked", "result"))[0].json();
    assert_eq!(masked["map_max"], 0.0, "{masked}");
    // The hot region's own alarm (retained, with its region) and mask; none for the cold one.
    let alarm = on(topic(hot, "alarm"))[0].json();
    assert_eq!(
        (alarm["active"].as_bool(), alarm["region"].as_str()),
        (Some(true), Some(hot))
    );
    assert!(on(topic(hot, "mask"))[0].payload.starts_with(b"\x89PNG"));
    assert!(on(topic(cold, "alarm")).is_empty() && on(topic(cold, "mask")).is_empty());
    // No whole-frame topics for a camera with regions.
    assert!(on("anomalyclip/rg/cam/result".into()).is_empty());
    // The retained calibration message of each region says what it decides with.
    let cal = on(topic(hot, "calibration"));
    let cal = cal.first().expect("retained calibration message").json();
    assert_eq!(
        (cal["state"].as_str(), cal["statistic"].as_str()),
        (Some("manual"), Some("global"))
    );
    assert!((cal["t2"].as_f64().expect("t2") - t).abs() < 1e-6, "{cal}");
    // The daemon's scores of the crops equal the `score` command's on the same pixels.
    let r = on(topic(hot, "result"))[0].json();
    let expect = if hot == "left" { sl } else { sr };
    assert!(
        (r["score"].as_f64().expect("score") - expect).abs() < 2e-4,
        "{r} vs {expect}"
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());
}
