//! Regression tests for the faults a field test found between camera, daemon and publisher
//! (a real RTSP/H.264 camera, a real mosquitto, a PLC subscribing): the real daemon binary, a
//! simulated RTSP camera on 127.0.0.1 and mosquitto on a free port. Every wait is bounded.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::broker::{Broker, Msg, Watcher};
use common::daemon::{Daemon, config, sim_camera};
use common::rtsp::RtspCamera;
use gstreamer as gst;
use gstreamer::prelude::*;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Receives until `done` holds for everything received so far (bounded); returns all of it.
async fn collect(plc: &mut Watcher, mut done: impl FnMut(&[Msg]) -> bool) -> Vec<Msg> {
    let mut got: Vec<Msg> = Vec::new();
    plc.until(|m| {
        got.push(m.clone());
        done(&got)
    })
    .await;
    got
}

fn on<'a>(msgs: &'a [Msg], topic: &'a str) -> impl Iterator<Item = &'a Msg> + 'a {
    msgs.iter().filter(move |m| m.topic == topic)
}

/// A live H.264 test pattern with a keyframe every 8 s (120 frames at 15 fps), as a camera with
/// a long GOP streams it.
const LONG_GOP: &str = "( videotestsrc is-live=true pattern=ball \
    ! video/x-raw,width=320,height=240,framerate=15/1 ! videoconvert \
    ! openh264enc gop-size=120 ! rtph264pay name=pay0 pt=96 config-interval=-1 )";

/// Another client of the shared stream: keeps the camera's media running and records the wall
/// clock (Unix ms) of every keyframe it receives, as the daemon receives them too.
struct KeyframeWatch {
    pipeline: gst::Pipeline,
    keyframes: Arc<Mutex<Vec<u64>>>,
}

impl KeyframeWatch {
    fn start(url: &str) -> Self {
        gst::init().expect("gstreamer");
        let pipeline = gst::parse::launch(&format!(
            "rtspsrc location={url} latency=0 ! rtph264depay ! h264parse ! fakesink name=sink sync=false"
        ))
        .expect("feeder pipeline")
        .downcast::<gst::Pipeline>()
        .expect("a pipeline");
        let keyframes = Arc::new(Mutex::new(Vec::new()));
        let pad = pipeline
            .by_name("sink")
            .and_then(|s| s.static_pad("sink"))
            .expect("fakesink pad");
        let record = Arc::clone(&keyframes);
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if let Some(gst::PadProbeData::Buffer(b)) = &info.data
                && !b.flags().contains(gst::BufferFlags::DELTA_UNIT)
            {
                record.lock().expect("keyframes").push(now_ms());
            }
            gst::PadProbeReturn::Ok
        });
        pipeline
            .set_state(gst::State::Playing)
            .expect("feeder playing");
        Self {
            pipeline,
            keyframes,
        }
    }

    fn keyframes(&self) -> Vec<u64> {
        self.keyframes.lock().expect("keyframes").clone()
    }

    /// Waits (bounded) until a keyframe arrived at or after `after_ms`; returns its time.
    async fn keyframe_after(&self, after_ms: u64, within: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(k) = self.keyframes().into_iter().find(|k| *k >= after_ms) {
                return k;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no keyframe after {after_ms} within {within:?}: {:?}",
                self.keyframes()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for KeyframeWatch {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_joined_mid_gop_publishes_nothing_decoded_before_the_first_keyframe() {
    let broker = Broker::start(None).await;
    let cam = RtspCamera::start_shared(LONG_GOP);
    let feeder = KeyframeWatch::start(&cam.url());
    // The stream runs: the first keyframe went out; the daemon joins 2 s into the GOP.
    let k0 = feeder.keyframe_after(0, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut plc = Watcher::start(broker.port, "anomalyclip/kf/#").await;
    // The threshold sits between the scores of the test pattern and of the uniform gray frames
    // a decoder outputs before the first keyframe, with the tiny model; one anomalous frame
    // raises the alarm.
    let cameras = format!(
        "[[camera]]\nname = \"gate\"\nuri = \"{}\"\nthreshold = {THRESHOLD:?}\n\
         [camera.alarm]\nraise_count = 1\nraise_window = 1\nclear_count = 1\n\
         [camera.mask]\nenabled = false\n",
        cam.url()
    );
    let joined = now_ms();
    let mut d = Daemon::start(&config("kf", broker.port, &cameras));
    d.wait_ready().await;
    let k1 = feeder.keyframe_after(joined, Duration::from_secs(15)).await;
    assert!(
        k1 >= joined + 1500,
        "the test setup did not join mid-GOP: keyframes {:?}, joined at {joined} (k0 {k0})",
        feeder.keyframes()
    );
    let results = "anomalyclip/kf/gate/result";
    let got = collect(&mut plc, |got| {
        on(got, results).any(|m| m.json()["ts_ms"].as_u64() > Some(k1 + 2000))
    })
    .await;
    let first = on(&got, results).next().expect("a result").json();
    let scores: Vec<f64> = on(&got, results)
        .filter_map(|m| m.json()["score"].as_f64())
        .collect();
    // Decoded frames are pulled after their keyframe arrived (both on this host; 200 ms for
    // the clocks of two processes and the feeder's own jitter buffer).
    assert!(
        first["ts_ms"].as_u64().is_some_and(|t| t + 200 >= k1),
        "first result {first} precedes the first keyframe at {k1} (joined at {joined}); scores {scores:?}"
    );
    let raised: Vec<String> = on(&got, "anomalyclip/kf/gate/alarm")
        .filter(|m| m.json()["active"] == true)
        .map(Msg::text)
        .collect();
    assert!(
        raised.is_empty(),
        "false alarm {raised:?}; scores {scores:?}"
    );
    assert!(
        scores.iter().all(|s| *s < f64::from(THRESHOLD)),
        "anomalous frame: {scores:?}"
    );
    // The gate's work is counted; a report never counts more frames scored than received.
    let s = plc
        .until(|m| m.topic == "anomalyclip/kf/stats")
        .await
        .json();
    assert!(
        s["cameras"]["gate"]["skipped_corrupt"].as_u64() > Some(0),
        "{s}"
    );
    let reports: Vec<serde_json::Value> = on(&got, "anomalyclip/kf/stats")
        .map(Msg::json)
        .chain([s])
        .collect();
    assert!(reports.len() >= 3, "{reports:?}");
    for r in &reports {
        let c = &r["cameras"]["gate"];
        let (fin, fscored) = (c["fps_in"].as_f64(), c["fps_scored"].as_f64());
        assert!(
            fin.zip(fscored).is_some_and(|(i, s)| s <= i),
            "fps_scored above fps_in: {r}"
        );
        for key in [
            "inference_errors",
            "reconnects",
            "dropped_overload",
            "skipped_rate",
        ] {
            assert!(c[key].is_u64(), "{key} missing: {r}");
        }
    }
    d.assert_running();
}

/// Between the tiny model's scores of the test pattern (0.09 to 0.22) and of the frames
/// `avdec_h264` decodes before the first keyframe (0.32 to 0.35), measured with this stream.
const THRESHOLD: f32 = 0.27;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_is_published_before_the_first_result_of_every_reconnection() {
    let broker = Broker::start(None).await;
    let mut cam = RtspCamera::start();
    let mut plc = Watcher::start(broker.port, "anomalyclip/ord/#").await;
    let cameras = common::daemon::rtsp_gate_camera(&cam.url());
    let mut d = Daemon::start(&config("ord", broker.port, &cameras));
    d.wait_ready().await;
    let status = "anomalyclip/ord/gate/status";
    let results = "anomalyclip/ord/gate/result";
    let mut connections = Vec::new();
    for round in 0..5 {
        // From the start (or the `reconnecting`) to the first result of the connection.
        let got = collect(&mut plc, |got| on(got, results).count() >= 1).await;
        let first_result = got
            .iter()
            .position(|m| m.topic == results)
            .expect("a result");
        let online = got
            .iter()
            .position(|m| m.topic == status && m.text() == "online");
        assert!(
            online.is_some_and(|i| i < first_result),
            "round {round}: the first result came before `online`: {:?}",
            got.iter().map(Msg::describe).collect::<Vec<_>>()
        );
        connections.push(first_result);
        // Take the camera away and bring it back.
        cam.stop();
        plc.until(|m| m.topic == status && m.text() == "reconnecting")
            .await;
        // Results of the old connection still in flight may follow `reconnecting`.
        tokio::time::sleep(Duration::from_millis(300)).await;
        plc.drain();
        cam.restart();
    }
    assert_eq!(connections.len(), 5);
    d.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_removed_by_reload_has_its_retained_topics_cleared_and_stays_gone_after_a_broker_restart()
 {
    let mut broker = Broker::start(None).await;
    let mut plc = Watcher::start(broker.port, "anomalyclip/rm/#").await;
    // `gone` raises its alarm at once (threshold 0: every frame is anomalous).
    let both = format!("{}{}", sim_camera("keep", 1.0), sim_camera("gone", 0.0));
    let mut d = Daemon::start(&config("rm", broker.port, &both));
    d.wait_ready().await;
    let got = collect(&mut plc, |got| {
        on(got, "anomalyclip/rm/gone/alarm").any(|m| m.json()["active"] == true)
            && on(got, "anomalyclip/rm/gone/status").any(|m| m.text() == "online")
    })
    .await;
    assert!(!got.is_empty());

    // Reload without `gone`: `offline` once, then both retained topics cleared.
    d.write_config(&config("rm", broker.port, &sim_camera("keep", 1.0)));
    d.signal(libc::SIGHUP);
    d.wait_log(&["configuration reloaded"], 1).await;
    let got = collect(&mut plc, |got| {
        on(got, "anomalyclip/rm/gone/status").any(|m| m.payload.is_empty())
            && on(got, "anomalyclip/rm/gone/alarm").any(|m| m.payload.is_empty())
    })
    .await;
    let statuses: Vec<String> = on(&got, "anomalyclip/rm/gone/status")
        .map(Msg::text)
        .collect();
    assert_eq!(
        statuses.first().map(String::as_str),
        Some("offline"),
        "{statuses:?}"
    );
    let retained = |port| async move {
        let mut late = Watcher::start(port, "anomalyclip/rm/+/+").await;
        late.collect_for(Duration::from_millis(1500)).await
    };
    let now = retained(broker.port).await;
    assert!(
        on(&now, "anomalyclip/rm/keep/status").any(|m| m.retain && m.text() == "online"),
        "{:?}",
        now.iter().map(Msg::describe).collect::<Vec<_>>()
    );
    assert!(
        !now.iter()
            .any(|m| m.topic.starts_with("anomalyclip/rm/gone/")),
        "retained after the reload: {:?}",
        now.iter().map(Msg::describe).collect::<Vec<_>>()
    );

    // The broker restarts (no persistence): the daemon re-publishes its state, without `gone`.
    broker.kill();
    broker.restart().await;
    plc.wait_subscribed(2).await;
    plc.until(|m| m.topic == "anomalyclip/rm/keep/status" && m.text() == "online")
        .await;
    let after = retained(broker.port).await;
    assert!(
        on(&after, "anomalyclip/rm/keep/status").any(|m| m.retain),
        "{:?}",
        after.iter().map(Msg::describe).collect::<Vec<_>>()
    );
    assert!(
        !after
            .iter()
            .any(|m| m.topic.starts_with("anomalyclip/rm/gone/")),
        "the removed camera came back after the broker restart: {:?}",
        after.iter().map(Msg::describe).collect::<Vec<_>>()
    );
    // Its alarm state is forgotten too.
    let state =
        std::fs::read_to_string(d.config_path().with_file_name("state/alarm-state.v1.json"))
            .unwrap_or_default();
    assert!(!state.contains("\"gone\""), "{state}");
    d.assert_running();
}

#[test]
fn camera_retry_backoff_is_configurable_per_camera_within_bounds() {
    use anomalyclip_edge::config::{FsChecks, parse_config};
    let cfg = |retry: &str| {
        format!(
            "node_id = \"n\"\n[model]\npackage = \"/nonexistent\"\n[mqtt]\nhost = \"h\"\n\
             [[camera]]\nname = \"a\"\nuri = \"rtsp://h/x\"\n{retry}\
             [[camera]]\nname = \"b\"\nuri = \"rtsp://h/y\"\n"
        )
    };
    let ok = parse_config(
        &cfg("[camera.retry]\ninitial_ms = 250\nmax_ms = 5000\n"),
        "t.toml",
        FsChecks::Disabled,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ok.cameras[0].retry.initial, Duration::from_millis(250));
    assert_eq!(ok.cameras[0].retry.max, Duration::from_secs(5));
    // The other camera keeps the defaults (1 s doubling to 30 s).
    assert_eq!(ok.cameras[1].retry.initial, Duration::from_secs(1));
    assert_eq!(ok.cameras[1].retry.max, Duration::from_secs(30));
    for (retry, expected) in [
        ("initial_ms = 10\n", "camera[0].retry.initial_ms"),
        ("max_ms = 700000\n", "camera[0].retry.max_ms"),
        ("initial_ms = 5000\nmax_ms = 1000\n", "below initial_ms"),
        ("initial_ms = 60000\n", "max_ms defaults to 30000"),
        ("initial = 5\n", "unknown field"),
    ] {
        let err = parse_config(
            &cfg(&format!("[camera.retry]\n{retry}")),
            "t.toml",
            FsChecks::Disabled,
        )
        .expect_err(retry)
        .to_string();
        assert!(err.contains(expected), "{retry}: {err}");
        assert!(err.contains("t.toml"), "{err}");
    }
}
