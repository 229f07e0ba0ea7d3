//! The whole daemon, as deployed: the real `anomalyclip-edge` binary on a config the test
//! writes (tiny model, CPU), a real mosquitto, cameras on 127.0.0.1 (an RTSP server acting as
//! an IP camera, GStreamer test pipelines), and a separate MQTT client subscribed as a PLC
//! would be. Camera outage and recovery, broker outage with alarm replay, Last Will, a broken
//! camera beside a working one, bad configuration files.
//!
//! Every child process (daemon, mosquitto) runs under a guard that kills it on drop; every
//! wait is bounded (`common::broker::WAIT`). The systemd side is in `tests/systemd.rs`.

use crate::common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::broker::{Broker, Msg, Proxy, Watcher};
use common::daemon::{BIN, Daemon, config, sim_camera, tiny_model};
use common::rtsp::RtspCamera;
use serde_json::Value;

/// Keys of a `result` payload, schema v1.
const RESULT_KEYS: [&str; 14] = [
    "v",
    "camera",
    "seq",
    "ts_ms",
    "score",
    "anomaly",
    "threshold",
    "map_max",
    "area",
    "latency_ms",
    "model",
    "verdict",
    "score_norm",
    "cal",
];

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Asserts the `result` contract: flat JSON ≤ 512 bytes, exactly the schema-v1 keys with the
/// right types and ranges. Returns the parsed payload.
fn check_result(m: &Msg, camera: &str) -> Value {
    assert!(
        m.payload.len() <= 512,
        "{} bytes: {}",
        m.payload.len(),
        m.text()
    );
    assert!(!m.retain, "results are not retained");
    let v = m.json();
    let o = v.as_object().expect("result is a JSON object");
    let keys: BTreeSet<&str> = o.keys().map(String::as_str).collect();
    assert_eq!(keys, RESULT_KEYS.into_iter().collect(), "{v}");
    assert!(
        o.values().all(|x| !x.is_object() && !x.is_array()),
        "flat: {v}"
    );
    assert_eq!(v["v"], 1);
    assert_eq!(v["camera"], camera);
    assert_eq!(v["model"], "tiny-seed0");
    assert!(v["seq"].is_u64(), "{v}");
    let ts = v["ts_ms"].as_u64().expect("ts_ms");
    assert!(
        ts.abs_diff(now_ms()) < 120_000,
        "ts_ms is the capture wall clock: {v}"
    );
    for k in ["score", "threshold", "map_max", "area"] {
        let x = v[k].as_f64().unwrap_or_else(|| panic!("{k}: {v}"));
        assert!((0.0..=1.0).contains(&x), "{k} out of [0, 1]: {v}");
    }
    let lat = v["latency_ms"].as_f64().expect("latency_ms");
    assert!((0.0..60_000.0).contains(&lat), "{v}");
    let score = v["score"].as_f64().expect("score");
    let threshold = v["threshold"].as_f64().expect("threshold");
    assert_eq!(
        v["anomaly"],
        score >= threshold,
        "anomaly = score >= threshold: {v}"
    );
    // A camera without regions decides on the global score with its hand-set threshold.
    assert_eq!(v["cal"], "manual", "{v}");
    let expected = if score >= threshold { "NG" } else { "OK" };
    assert_eq!(v["verdict"], expected, "{v}");
    let norm = v["score_norm"].as_f64().expect("score_norm");
    assert_eq!(
        norm >= 0.5,
        score >= threshold,
        "score_norm is 0.5 at the threshold: {v}"
    );
    v
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

/// Alarm transitions the daemon logged: (active, seq), in order.
fn logged_alarms(d: &Daemon, camera: &str) -> Vec<(bool, u64)> {
    d.log_lines(&["daemon::worker: alarm", &format!("camera={camera} ")])
        .iter()
        .map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .unwrap_or_else(|| panic!("no {k} in {l}"))
                    .to_owned()
            };
            (
                field("active=") == "true",
                field("seq=").parse().expect("seq"),
            )
        })
        .collect()
}

/// Waits (bounded) until the text of `path` (empty if missing) satisfies `cond`.
async fn wait_file(path: &std::path::Path, what: &str, cond: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + common::broker::WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if cond(&text) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: not {what} within {:?}:\n{text}",
            path.display(),
            common::broker::WAIT
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_camera_to_plc_status_results_masks_stats_and_clean_stop() {
    let broker = Broker::start(None).await;
    let cam = RtspCamera::start();
    let mut plc = Watcher::start(broker.port, "anomalyclip/e2e/#").await;
    let cameras = format!(
        "[[camera]]\nname = \"line\"\nuri = \"{}\"\nthreshold = 0.0\n\
         [camera.mask]\nsize = 48\nkind = \"gray-map\"\nonly_on_anomaly = false\nmin_interval_ms = 0\n",
        cam.url()
    );
    let mut d = Daemon::start(&config("e2e", broker.port, &cameras));
    d.wait_ready().await;

    let status = "anomalyclip/e2e/status";
    let cam_status = "anomalyclip/e2e/line/status";
    let results = "anomalyclip/e2e/line/result";
    let masks = "anomalyclip/e2e/line/mask";
    let stats = "anomalyclip/e2e/stats";
    let got = collect(&mut plc, |got| {
        on(got, status).count() >= 1
            && on(got, cam_status).count() >= 1
            && on(got, results).count() >= 8
            && on(got, masks).count() >= 3
            && on(got, stats).any(|m| m.json()["cameras"]["line"]["scored"].as_u64() > Some(0))
    })
    .await;

    assert_eq!(
        on(&got, status).next().map(Msg::text).as_deref(),
        Some("online")
    );
    assert_eq!(
        on(&got, cam_status).next().map(Msg::text).as_deref(),
        Some("online")
    );

    // Results: the schema, seq strictly increasing, threshold 0 → every frame anomalous.
    let rs: Vec<Value> = on(&got, results).map(|m| check_result(m, "line")).collect();
    let seqs: Vec<u64> = rs.iter().map(|v| v["seq"].as_u64().expect("seq")).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq increases: {seqs:?}"
    );
    assert!(
        rs.iter()
            .all(|v| v["anomaly"] == true && v["threshold"] == 0.0)
    );

    // Masks: grayscale PNGs with camera/seq/ts_ms text chunks matching a result.
    let mut matched = 0;
    for m in on(&got, masks) {
        assert!(!m.retain);
        let reader = png::Decoder::new(std::io::Cursor::new(m.payload.clone()))
            .read_info()
            .expect("the mask decodes as PNG");
        let info = reader.info();
        assert_eq!((info.width, info.height), (48, 48));
        assert_eq!(info.color_type, png::ColorType::Grayscale);
        let text = |k: &str| {
            info.uncompressed_latin1_text
                .iter()
                .find(|t| t.keyword == k)
                .map(|t| t.text.clone())
                .unwrap_or_else(|| panic!("no {k} text chunk"))
        };
        assert_eq!(text("camera"), "line");
        let seq: u64 = text("seq").parse().expect("seq chunk");
        let ts: u64 = text("ts_ms").parse().expect("ts_ms chunk");
        if let Some(r) = rs.iter().find(|v| v["seq"] == seq) {
            assert_eq!(
                r["ts_ms"], ts,
                "mask and result of seq {seq} agree on ts_ms"
            );
            matched += 1;
        }
    }
    assert!(matched >= 1, "no mask matched a received result");

    // Stats: per-camera counters and the publisher's.
    let s = on(&got, stats)
        .map(Msg::json)
        .find(|s| s["cameras"]["line"]["scored"].as_u64() > Some(0))
        .expect("stats");
    assert_eq!(s["v"], 1);
    assert_eq!(s["engine"], "cpu");
    let c = &s["cameras"]["line"];
    assert_eq!(c["status"], "online", "{s}");
    assert!(c["frames_in"].as_u64() >= c["scored"].as_u64(), "{s}");
    assert!(c["latency_p50_ms"].as_f64().is_some_and(|x| x > 0.0), "{s}");
    assert_eq!(s["mqtt"]["connected"], true);
    assert_eq!(s["mqtt"]["reconnects"], 0);

    // A PLC connecting later gets the statuses retained.
    let mut late = Watcher::start(broker.port, "anomalyclip/e2e/+/status").await;
    let m = late.next_on(cam_status).await;
    assert_eq!((m.text().as_str(), m.retain), ("online", true));
    let mut late = Watcher::start(broker.port, status).await;
    let m = late.next_on(status).await;
    assert_eq!((m.text().as_str(), m.retain), ("online", true));

    // SIGTERM: camera offline, node stopped (retained), exit 0.
    d.signal(libc::SIGTERM);
    let got = collect(&mut plc, |got| {
        on(got, status).any(|m| m.text() == "stopped")
    })
    .await;
    assert!(on(&got, cam_status).any(|m| m.text() == "offline"));
    assert_eq!(d.wait_exit().await.code(), Some(0), "{}", d.log());
    let m = late.next_on(status).await;
    assert_eq!(m.text(), "stopped");
    let mut late = Watcher::start(broker.port, status).await;
    let m = late.next_on(status).await;
    assert_eq!((m.text().as_str(), m.retain), ("stopped", true));
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_outage_is_reported_and_recovers_without_a_restart() {
    let broker = Broker::start(None).await;
    let mut cam = RtspCamera::start();
    let mut plc = Watcher::start(broker.port, "anomalyclip/co/#").await;
    // A fast retry backoff ([camera.retry]): several failed attempts within a second or two.
    let cameras = common::daemon::rtsp_gate_camera(&cam.url());
    let mut d = Daemon::start(&config("co", broker.port, &cameras));
    d.wait_ready().await;
    let cam_status = "anomalyclip/co/gate/status";
    let results = "anomalyclip/co/gate/result";
    let got = collect(&mut plc, |got| {
        on(got, cam_status).any(|m| m.text() == "online") && on(got, results).count() >= 3
    })
    .await;
    let pid = d.pid();

    // The camera goes away: `reconnecting` for as long as the daemon retries (never
    // `offline`, which means it stopped trying); the retries reach `stats`.
    cam.stop();
    let got_out = collect(&mut plc, |got| {
        on(got, "anomalyclip/co/stats")
            .any(|m| m.json()["cameras"]["gate"]["reconnects"].as_u64() >= Some(3))
    })
    .await;
    let during: Vec<String> = on(&got_out, cam_status).map(Msg::text).collect();
    assert_eq!(during, ["reconnecting"], "{during:?}");
    let last_seq = on(&got, results)
        .chain(on(&got_out, results))
        .map(|m| check_result(m, "gate")["seq"].as_u64().expect("seq"))
        .max()
        .expect("results before the outage");

    // It comes back on the same address: online again, results resume, same process.
    cam.restart();
    let got = collect(&mut plc, |got| {
        on(got, cam_status).any(|m| m.text() == "online")
            && on(got, results).any(|m| m.json()["seq"].as_u64() > Some(last_seq))
    })
    .await;
    let statuses: Vec<String> = on(&got, cam_status).map(Msg::text).collect();
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("online"),
        "{statuses:?}"
    );
    let after: Vec<u64> = on(&got, results)
        .map(|m| check_result(m, "gate")["seq"].as_u64().expect("seq"))
        .collect();
    assert!(after.windows(2).all(|w| w[0] < w[1]), "{after:?}");
    d.assert_running();
    assert_eq!(d.pid(), pid);
    assert_eq!(
        d.log_lines(&["anomalyclip-edge running"]).len(),
        1,
        "started once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_alarms_replayed_in_order_none_missing() {
    let mut broker = Broker::start(None).await;
    // The daemon reaches the broker through a gate, so the PLC can re-subscribe first.
    let proxy = Proxy::start(broker.port).await;
    let mut plc = Watcher::start(broker.port, "anomalyclip/bo/#").await;
    let cfg = |threshold: f32| config("bo", proxy.port, &sim_camera("sim", threshold));
    let mut d = Daemon::start(&cfg(0.0));
    d.wait_ready().await;

    // Threshold 0: every frame is anomalous; the alarm raises at once, live.
    let alarm_topic = "anomalyclip/bo/sim/alarm";
    let v = plc.next_on(alarm_topic).await.json();
    assert_eq!(
        (v["active"].as_bool(), v["replayed"].as_bool()),
        (Some(true), Some(false)),
        "{v}"
    );

    // The broker acknowledged it: the disk queue is empty again (else it is replayed too, as
    // delivery is at least once).
    let queue_file = d
        .dir
        .path()
        .join("state")
        .join(anomalyclip_edge::mqtt::QUEUE_FILE);
    wait_file(&queue_file, "the live alarm acknowledged", str::is_empty).await;

    // Outage: the broker is killed (no clean shutdown) and may not be reached again yet.
    proxy.set_open(false);
    broker.kill();
    d.wait_log(&["mqtt connection lost"], 1).await;

    // Three alarm transitions while it is away, driven by reloading the threshold: a score is
    // always < 1 (clears the alarm) and >= 0 (raises it).
    for (i, threshold) in [1.0, 0.0, 1.0].into_iter().enumerate() {
        d.write_config(&cfg(threshold));
        d.signal(libc::SIGHUP);
        d.wait_log(&["configuration reloaded"], i + 1).await;
        d.wait_log(&["daemon::worker: alarm", "camera=sim "], i + 2)
            .await;
    }
    let logged = logged_alarms(&d, "sim");
    let outage: Vec<(bool, u64)> = logged[1..4].to_vec();
    assert_eq!(
        outage.iter().map(|a| a.0).collect::<Vec<_>>(),
        [false, true, false],
        "{logged:?}"
    );
    // They wait on disk, in the state directory (written by the publisher task, just after).
    wait_file(&queue_file, "3 alarms queued on disk", |q| {
        q.lines().filter(|l| l.contains("\"add\"")).count() == 3
    })
    .await;

    // The broker is back on the same port; the PLC re-subscribes, then the gate opens.
    let subs = plc.subscriptions();
    broker.restart().await;
    plc.wait_subscribed(subs + 1).await;
    proxy.set_open(true);

    let mut replayed = Vec::new();
    while replayed.len() < 3 {
        let m = plc.next_on(alarm_topic).await;
        let v = m.json();
        assert_eq!(v["replayed"], true, "{v}");
        assert_eq!(v["camera"], "sim");
        replayed.push((
            v["active"].as_bool().expect("active"),
            v["seq"].as_u64().expect("seq"),
        ));
    }
    assert_eq!(replayed, outage, "every alarm, in order, none missing");

    // Results flow again; the publisher counted one reconnect and the results it dropped.
    let last = outage[2].1;
    plc.until(|m| m.topic == "anomalyclip/bo/sim/result" && m.json()["seq"].as_u64() > Some(last))
        .await;
    let s = plc
        .until(|m| m.topic == "anomalyclip/bo/stats" && m.json()["mqtt"]["queued_alarms"] == 0)
        .await
        .json();
    assert_eq!(s["mqtt"]["reconnects"], 1, "{s}");
    assert!(s["mqtt"]["dropped_results"].as_u64() > Some(0), "{s}");
    // The latest state is retained for a PLC connecting now.
    let mut late = Watcher::start(broker.port, alarm_topic).await;
    let v = late.next_on(alarm_topic).await.json();
    assert_eq!(
        (v["active"].as_bool(), v["seq"].as_u64()),
        (Some(false), Some(last))
    );

    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().await.code(), Some(0), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_offline_when_the_daemon_dies() {
    let broker = Broker::start(None).await;
    let mut d = Daemon::start(&config("lw", broker.port, &sim_camera("sim", 0.5)));
    d.wait_ready().await;
    let status = "anomalyclip/lw/status";
    let mut plc = Watcher::start(broker.port, status).await;
    assert_eq!(plc.next_on(status).await.text(), "online");

    // A crash: the connection drops without DISCONNECT; the broker publishes the Will.
    d.signal(libc::SIGKILL);
    d.wait_exit().await;
    let m = plc.next_on(status).await;
    assert_eq!(m.text(), "offline");
    let mut late = Watcher::start(broker.port, status).await;
    let m = late.next_on(status).await;
    assert_eq!((m.text().as_str(), m.retain), ("offline", true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_cameras_report_their_state_and_the_other_keeps_publishing() {
    let broker = Broker::start(None).await;
    let mut plc = Watcher::start(broker.port, "anomalyclip/bc/#").await;
    let cameras = format!(
        "{}\n[[camera]]\nname = \"broken\"\npipeline = \"nosuchelement ! appsink name=sink\"\n\
         [[camera]]\nname = \"gone\"\nuri = \"rtsp://127.0.0.1:1/none\"\n",
        sim_camera("good", 0.5)
    );
    let mut d = Daemon::start(&config("bc", broker.port, &cameras));
    d.wait_ready().await;
    let good = "anomalyclip/bc/good/result";
    let got = collect(&mut plc, |got| {
        on(got, "anomalyclip/bc/broken/status").count() >= 1
            && on(got, "anomalyclip/bc/gone/status").count() >= 1
            && on(got, good).count() >= 3
    })
    .await;
    let broken = on(&got, "anomalyclip/bc/broken/status")
        .next()
        .map(Msg::text)
        .expect("broken status");
    assert!(
        broken.starts_with("error: ") && broken.contains("nosuchelement"),
        "{broken}"
    );
    let gone: Vec<String> = on(&got, "anomalyclip/bc/gone/status")
        .map(Msg::text)
        .collect();
    assert_eq!(
        gone.first().map(String::as_str),
        Some("reconnecting"),
        "{gone:?}"
    );
    assert!(!gone.contains(&"online".to_owned()), "{gone:?}");

    // The good camera kept publishing all along, and goes on.
    let before = on(&got, good).count();
    assert!(
        before >= 3,
        "the good camera published {before} results meanwhile"
    );
    let later = collect(&mut plc, |got| on(got, good).count() >= 5).await;
    for m in on(&later, good) {
        check_result(m, "good");
    }
    let s = plc
        .until(|m| m.topic == "anomalyclip/bc/stats")
        .await
        .json();
    assert_eq!(s["cameras"]["good"]["status"], "online", "{s}");
    assert!(
        s["cameras"]["broken"]["status"]
            .as_str()
            .is_some_and(|t| t.starts_with("error: ")),
        "{s}"
    );
    assert_eq!(s["cameras"]["gone"]["status"], "reconnecting", "{s}");
    let s = plc
        .until(|m| {
            m.topic == "anomalyclip/bc/stats"
                && m.json()["cameras"]["gone"]["reconnects"].as_u64() >= Some(2)
        })
        .await
        .json();
    assert_eq!(s["cameras"]["gone"]["status"], "reconnecting", "{s}");
    assert_eq!(s["cameras"]["gone"]["frames_in"], 0, "{s}");
    let gone: Vec<String> = on(&plc.drain(), "anomalyclip/bc/gone/status")
        .map(Msg::text)
        .collect();
    assert!(gone.iter().all(|t| t == "reconnecting"), "{gone:?}");
    d.assert_running();
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in the config"))
}

#[test]
fn bad_config_every_problem_with_its_location_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    let text = format!(
        "node_id = \"n1\"\n\
         state_dir = \"{d}/state\"\n\
         stats_interval_s = \"ten\"\n\
         bogus_key = 1\n\
         [model]\n\
         package = \"{model}\"\n\
         [mqtt]\n\
         host = \"127.0.0.1\"\n\
         username = \"plc\"\n\
         password_file = \"{d}/no-such-password\"\n\
         [mqtt.tls]\n\
         ca_file = \"{d}/no-such-ca.pem\"\n\
         client_cert_file = \"{d}/no-such-client.pem\"\n\
         client_key_file = \"{d}\"\n\
         [[camera]]\n\
         name = \"no-source\"\n\
         threshold = 0.5\n\
         [[camera]]\n\
         name = \"typo\"\n\
         uri = \"rtsp://127.0.0.1:8554/cam\"\n\
         treshold = 0.5\n",
        model = tiny_model().display()
    );
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, &text).expect("write");
    let f = file.display().to_string();
    let expected = [
        ("stats_interval_s = ", "stats_interval_s", "invalid type"),
        ("bogus_key", "bogus_key", "unknown field `bogus_key`"),
        (
            "password_file",
            "mqtt.password_file",
            "cannot read password file",
        ),
        ("ca_file", "mqtt.tls.ca_file", "cannot read CA file"),
        (
            "client_cert_file",
            "mqtt.tls.client_cert_file",
            "cannot read client certificate",
        ),
        (
            "client_key_file",
            "mqtt.tls.client_key_file",
            "cannot read client key",
        ),
        ("[[camera]]", "camera[0]", "no source"),
        ("treshold", "camera[1].treshold", "unknown field `treshold`"),
    ];
    let check = Command::new(BIN)
        .args(["check-config", &f])
        .output()
        .expect("run");
    let run = Command::new(BIN)
        .args(["run", "--config", &f])
        .output()
        .expect("run");
    for (what, out) in [("check-config", &check), ("run", &run)] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        for (needle, path, msg) in expected {
            let prefix = format!("{f}:{}: {path}: ", line_of(&text, needle));
            assert!(
                stderr
                    .lines()
                    .any(|l| l.starts_with(&prefix) && l.contains(msg)),
                "{what}: no line {prefix}…{msg}…; got:\n{stderr}"
            );
        }
    }
    // `run` started nothing: no state directory, no broker connection attempt.
    assert!(!dir.path().join("state").exists());

    // A missing file is a problem of the same form.
    let missing = dir.path().join("missing.toml").display().to_string();
    for args in [
        vec!["check-config", &missing],
        vec!["run", "--config", &missing],
    ] {
        let out = Command::new(BIN).args(&args).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{missing}: cannot read config file")),
            "{args:?}: {stderr}"
        );
    }
}

/// Receives until a message matches `pred`, appending everything received to `all`.
async fn next_recorded(
    plc: &mut Watcher,
    all: &mut Vec<Msg>,
    mut pred: impl FnMut(&Msg) -> bool,
) -> Msg {
    plc.until(|m| {
        all.push(m.clone());
        pred(m)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_keeps_alarm_state_and_frame_numbering_and_applies_stats_interval() {
    let broker = Broker::start(None).await;
    let mut plc = Watcher::start(broker.port, "anomalyclip/rl/#").await;
    // One camera; a reload may change its threshold, its debounce (in place) and its max_fps
    // (the camera is restarted), and the stats interval.
    let cfg = |threshold: f32, clear_count: u32, max_fps: f32, stats_s: u32| {
        let cam = sim_camera("sim", threshold)
            .replace("clear_count = 1", &format!("clear_count = {clear_count}"))
            .replace(
                "[camera.alarm]",
                &format!("max_fps = {max_fps:?}\n[camera.alarm]"),
            );
        config("rl", broker.port, &cam).replace(
            "stats_interval_s = 1",
            &format!("stats_interval_s = {stats_s}"),
        )
    };
    let alarm = "anomalyclip/rl/sim/alarm";
    let is_alarm = |active: bool| move |m: &Msg| m.topic == alarm && m.json()["active"] == active;
    let mut all = Vec::new();
    let mut d = Daemon::start(&cfg(0.0, 1, 0.0, 0));
    d.wait_ready().await;
    next_recorded(&mut plc, &mut all, is_alarm(true)).await;

    // In place: a normal threshold and a new debounce: the raised alarm clears (it is not
    // forgotten with the old debouncer); stats, off at start, are switched on.
    d.write_config(&cfg(1.0, 2, 0.0, 1));
    d.signal(libc::SIGHUP);
    next_recorded(&mut plc, &mut all, is_alarm(false)).await;
    next_recorded(&mut plc, &mut all, |m| m.topic == "anomalyclip/rl/stats").await;
    assert!(
        !d.log().contains("stats_interval"),
        "applied, not deferred: {}",
        d.log()
    );

    // Raised again, then the camera is restarted by a max_fps change while the alarm is up and
    // frames turn normal: the alarm clears; frame numbers go on increasing.
    d.write_config(&cfg(0.0, 2, 0.0, 1));
    d.signal(libc::SIGHUP);
    next_recorded(&mut plc, &mut all, is_alarm(true)).await;
    d.write_config(&cfg(1.0, 2, 8.0, 1));
    d.signal(libc::SIGHUP);
    d.wait_log(&["reload: starting camera"], 1).await;
    next_recorded(&mut plc, &mut all, is_alarm(false)).await;
    let restarted = d.log_lines(&["daemon::worker: alarm"]).len();
    let mut after = 0;
    next_recorded(&mut plc, &mut all, |m| {
        if m.topic == "anomalyclip/rl/sim/result" {
            after += 1;
        }
        after >= 5
    })
    .await;
    let seqs: Vec<u64> = on(&all, "anomalyclip/rl/sim/result")
        .map(|m| check_result(m, "sim")["seq"].as_u64().expect("seq"))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq increases across a camera restart: {seqs:?}"
    );
    let alarms: Vec<(bool, u64)> = on(&all, alarm)
        .map(|m| {
            let v = m.json();
            (
                v["active"].as_bool().expect("active"),
                v["seq"].as_u64().expect("seq"),
            )
        })
        .collect();
    assert_eq!(
        alarms.iter().map(|a| a.0).collect::<Vec<_>>(),
        [true, false, true, false],
        "{alarms:?}"
    );
    assert!(alarms.windows(2).all(|w| w[0].1 < w[1].1), "{alarms:?}");
    assert_eq!(restarted, 4, "{}", d.log());
    d.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_a_broker_outage_then_restart_replays_and_clears_the_alarm() {
    // One state directory for two lives of the daemon; no broker during the first.
    let state = tempfile::tempdir().expect("state dir");
    let port = common::broker::free_port();
    let cfg = |threshold: f32| {
        config("rs", port, &sim_camera("sim", threshold)).replace(
            "state_dir = \"state\"",
            &format!("state_dir = \"{}\"", state.path().display()),
        )
    };

    // First life: the alarm raises while the broker is away; SIGTERM still exits 0 (within the
    // stop deadline) and leaves the alarm in the disk queue.
    let mut d = Daemon::start(&cfg(0.0));
    d.wait_ready().await;
    d.wait_log(&["daemon::worker: alarm", "camera=sim ", "active=true"], 1)
        .await;
    let raised = logged_alarms(&d, "sim");
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().await.code(), Some(0), "{}", d.log());
    let queue = std::fs::read_to_string(state.path().join(anomalyclip_edge::mqtt::QUEUE_FILE))
        .expect("alarm queue file");
    assert_eq!(queue.lines().count(), 1, "{queue}");

    // Second life, broker up, frames now normal: the alarm of the first life is replayed, then
    // cleared (not left raised on the broker for good).
    let broker = Broker::start(Some(port)).await;
    let alarm = "anomalyclip/rs/sim/alarm";
    let mut plc = Watcher::start(broker.port, alarm).await;
    let mut d = Daemon::start(&cfg(1.0));
    d.wait_ready().await;
    let v = plc.next_on(alarm).await.json();
    assert_eq!(
        (
            v["active"].as_bool(),
            v["seq"].as_u64(),
            v["replayed"].as_bool()
        ),
        (Some(true), Some(raised[0].1), Some(true)),
        "{v}"
    );
    let v = plc.next_on(alarm).await.json();
    assert_eq!(
        (v["active"].as_bool(), v["replayed"].as_bool()),
        (Some(false), Some(false)),
        "{v}"
    );
    let mut late = Watcher::start(broker.port, alarm).await;
    assert_eq!(late.next_on(alarm).await.json()["active"], false);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().await.code(), Some(0), "{}", d.log());
}

/// Whether process `pid` has a handler for signal `sig` (`SigCgt` in /proc/PID/status).
fn catches(pid: i32, sig: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << (sig - 1)) != 0)
}

/// Waits (bounded) until the daemon handles `sig`, which it does from the start of `run`.
async fn wait_catches(d: &mut Daemon, sig: i32) {
    let t0 = std::time::Instant::now();
    while !catches(d.pid(), sig) {
        assert!(d.try_exit().is_none(), "the daemon exited:\n{}", d.log());
        assert!(
            t0.elapsed() < common::broker::WAIT,
            "signal {sig} never handled"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// SIGHUP before the daemon is ready (while the model loads) used to kill it: the default action
/// of SIGHUP is to terminate, and the handler was installed just before READY=1. Now the
/// handler is there from the start of `run`, and a SIGHUP during start-up is a reload request
/// carried out once the daemon is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_start_up_is_deferred_not_fatal() {
    let broker = Broker::start(None).await;
    let mut d = Daemon::start(&config("hup", broker.port, &sim_camera("sim", 0.5)));
    wait_catches(&mut d, libc::SIGHUP).await;
    let mut sent_before_ready = 0;
    while d.notify.notes().iter().all(|n| !n.has("READY=1")) {
        assert!(
            d.try_exit().is_none(),
            "the daemon died during start-up:\n{}",
            d.log()
        );
        d.signal(libc::SIGHUP);
        sent_before_ready += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(sent_before_ready >= 1, "no SIGHUP sent before READY=1");
    d.wait_ready().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.assert_running();
    let log = d.log();
    let requested = log
        .find("SIGHUP: reload requested")
        .expect("reload request logged");
    let running = log
        .find("anomalyclip-edge running")
        .expect("running logged");
    assert!(
        requested < running,
        "no SIGHUP arrived during start-up:\n{log}"
    );
    d.signal(libc::SIGTERM);
    let status = d.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{}", d.log());
}

/// SIGTERM during start-up (before READY=1): a clean exit (0) without connecting, never death
/// by the signal's default action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_start_up_exits_cleanly() {
    let broker = Broker::start(None).await;
    let mut d = Daemon::start(&config("term", broker.port, &sim_camera("sim", 0.5)));
    wait_catches(&mut d, libc::SIGTERM).await;
    let ready_before = d.notify.notes().iter().any(|n| n.has("READY=1"));
    d.signal(libc::SIGTERM);
    let status = d.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", d.log());
    if !ready_before {
        assert!(
            d.notify.notes().iter().all(|n| !n.has("READY=1")),
            "stopped during start-up, yet reported ready"
        );
    }
}

/// The daemon as a library call: `daemon::run(config, control)` in a thread of the test
/// process, stopped through its control handle within the one stop deadline, leaving the
/// retained node status `stopped`.
#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_runs_in_process_and_stops_on_its_control_handle() {
    use anomalyclip_edge::daemon;
    let lib = common::golden::ort_or_skip("daemon_runs_in_process").expect("ONNX Runtime");
    let broker = Broker::start(None).await;
    let status = "anomalyclip/inproc/status";
    let mut plc = Watcher::start(broker.port, status).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config("inproc", broker.port, &sim_camera("sim", 0.5))
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = {:?}", dir.path().join("state")),
        )
        .replace(
            "[engine]\n",
            &format!("[engine]\nort_library = {:?}\n", lib),
        );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).expect("config");
    let (handle, control) = daemon::control();
    let thread = std::thread::spawn(move || daemon::run(&path, control));
    assert_eq!(plc.next_on(status).await.text(), "online");
    let t0 = std::time::Instant::now();
    assert!(handle.stop(), "first stop");
    let joined = tokio::task::spawn_blocking(move || thread.join());
    let res = tokio::time::timeout(daemon::STOP_DEADLINE + Duration::from_secs(1), joined)
        .await
        .expect("daemon::run did not return within the stop deadline")
        .expect("join")
        .expect("daemon thread panicked");
    assert!(res.is_ok(), "{res:?}");
    assert!(t0.elapsed() <= daemon::STOP_DEADLINE + Duration::from_millis(500));
    assert_eq!(plc.next_on(status).await.text(), "stopped");
}
