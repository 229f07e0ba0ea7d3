//! Triggered inspection end to end: the real daemon (tiny model, CPU), a real mosquitto, a
//! simulated camera (GStreamer `videotestsrc`) or an RTSP camera that is down, and a test MQTT
//! client acting as the PLC: it publishes requests on `<prefix>/<camera>/inspect` and reads the
//! answers on `<prefix>/<camera>/inspection`.
//!
//! The tiny model has random weights: these tests check the wiring (ids, exactly-once answers,
//! store-and-forward, errors), never what a score means.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::broker::{Broker, Msg, Proxy, Watcher, free_port};
use common::daemon::{Daemon, config};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A simulated live camera (10 fps) in `mode`.
fn sim(name: &str, mode: &str) -> String {
    format!(
        "[[camera]]\n\
         name = \"{name}\"\n\
         mode = \"{mode}\"\n\
         pipeline = \"videotestsrc is-live=true pattern=ball ! video/x-raw,width=160,height=120,framerate=10/1 ! appsink name=sink\"\n\
         threshold = 0.5\n\
         [camera.mask]\n\
         enabled = false\n"
    )
}

/// The PLC: publishes requests (QoS 1) and counts the broker's PUBACKs.
struct Plc {
    client: AsyncClient,
    acks: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Drop for Plc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Plc {
    async fn connect(port: u16) -> Plc {
        let mut o = MqttOptions::new(format!("plc-{}", std::process::id()), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_inflight(200);
        let (client, mut el) = AsyncClient::new(o, 2000);
        let (tx, acks) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => tx.send_modify(|n| *n += 1),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        Plc { client, acks, task }
    }

    async fn send(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish request");
    }

    /// Waits until the broker acknowledged `n` requests in all.
    async fn acked(&mut self, n: u64) {
        tokio::time::timeout(common::broker::WAIT, self.acks.wait_for(|c| *c >= n))
            .await
            .expect("requests acknowledged in time")
            .expect("plc task");
    }
}

/// Receives `n` inspection results on `topic` (bounded), then a further `quiet` to prove no
/// more arrive; returns them all.
async fn answers(w: &mut Watcher, topic: &str, n: usize, quiet: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        got.push(w.next_on(topic).await.json());
    }
    let extra: Vec<Msg> = w
        .collect_for(quiet)
        .await
        .into_iter()
        .filter(|m| m.topic == topic)
        .collect();
    got.extend(extra.iter().map(Msg::json));
    got
}

async fn wait_ready_flag(w: &mut Watcher, topic: &str) {
    w.until(|m| m.topic == topic && m.text() == "true").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_triggers_get_exactly_a_hundred_answers_with_their_ids_and_no_stream() {
    let broker = Broker::start(None).await;
    let mut w = Watcher::start(broker.port, "anomalyclip/t1/#").await;
    let cfg = config("t1", broker.port, &sim("cam", "triggered"))
        + "[trigger]\nmax_pending = 128\ntimeout_ms = 20000\n";
    let mut d = Daemon::start(&cfg);
    d.wait_ready().await;
    wait_ready_flag(&mut w, "anomalyclip/t1/cam/ready").await;

    let mut plc = Plc::connect(broker.port).await;
    for i in 0..100 {
        let req = format!(r#"{{"meas_id":"M{i:03}","part_id":"P{i}"}}"#);
        plc.send("anomalyclip/t1/cam/inspect", req).await;
    }
    plc.acked(100).await;
    let got = answers(
        &mut w,
        "anomalyclip/t1/cam/inspection",
        100,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(got.len(), 100, "exactly one answer per request");
    let mut ids = BTreeMap::new();
    for v in &got {
        let meas = v["meas_id"].as_str().expect("meas_id").to_owned();
        let n: usize = meas[1..].parse().expect("M<n>");
        assert_eq!(v["part_id"], format!("P{n}"), "{v}");
        assert!(
            matches!(v["verdict"].as_str(), Some("OK" | "NG")),
            "scored: {v}"
        );
        assert_eq!(v["replayed"], false);
        assert_eq!(v["camera"], "cam");
        let (t, f, done) = (
            v["trigger_ts_ms"].as_u64().expect("trigger_ts_ms"),
            v["frame_ts_ms"].as_u64().expect("frame_ts_ms"),
            v["done_ts_ms"].as_u64().expect("done_ts_ms"),
        );
        assert!(t <= f && f <= done, "frame at or after the trigger: {v}");
        let score = v["score"].as_f64().expect("score");
        assert_eq!(v["verdict"] == "NG", score >= 0.5, "{v}");
        ids.insert(meas, v["result_id"].as_str().expect("result_id").to_owned());
    }
    assert_eq!(ids.len(), 100, "every meas_id answered");
    let unique: BTreeSet<&String> = ids.values().collect();
    assert_eq!(unique.len(), 100, "result ids are unique");
    // A triggered camera streams nothing.
    let stream: Vec<Msg> = w
        .drain()
        .into_iter()
        .filter(|m| m.topic.ends_with("/result") || m.topic.ends_with("/alarm"))
        .collect();
    assert!(stream.is_empty(), "{stream:?}");

    // A repeat of a meas_id: the same result again, not a new inspection.
    plc.send("anomalyclip/t1/cam/inspect", r#"{"meas_id":"M007"}"#)
        .await;
    let v = w.next_on("anomalyclip/t1/cam/inspection").await.json();
    assert_eq!(v["meas_id"], "M007");
    assert_eq!(v["result_id"].as_str(), ids.get("M007").map(String::as_str));

    d.assert_running();
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().await.code(), Some(0), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_an_error_with_a_reason_or_a_log_line_and_the_daemon_keeps_running() {
    let broker = Broker::start(None).await;
    let mut w = Watcher::start(broker.port, "anomalyclip/t2/#").await;
    let cfg = config("t2", broker.port, &sim("cam", "continuous"));
    let mut d = Daemon::start(&cfg);
    d.wait_ready().await;
    wait_ready_flag(&mut w, "anomalyclip/t2/cam/ready").await;
    let plc = Plc::connect(broker.port).await;
    let topic = "anomalyclip/t2/cam/inspect";
    let answer = "anomalyclip/t2/cam/inspection";

    plc.send(topic, "this is not json").await;
    d.wait_log(&["request is not JSON"], 1).await;
    let cases = [
        (
            r#"{"meas_id":"B1","deadline_ms":0}"#.to_owned(),
            "deadline_ms",
        ),
        (
            r#"{"meas_id":"B2","regions":["left"]}"#.to_owned(),
            "unknown region",
        ),
        (
            format!(r#"{{"meas_id":"B3","pad":"{}"}}"#, "x".repeat(5000)),
            "exceeds 4096",
        ),
        (
            r#"{"meas_id":"B4","part_id":{"x":1}}"#.to_owned(),
            "part_id",
        ),
    ];
    for (payload, reason) in &cases {
        plc.send(topic, payload.clone()).await;
        let v = w.next_on(answer).await.json();
        assert_eq!(v["verdict"], "ERROR", "{v}");
        assert!(
            v["reason"].as_str().is_some_and(|r| r.contains(reason)),
            "{reason}: {v}"
        );
    }
    // An unknown camera is answered on its own topic.
    plc.send("anomalyclip/t2/nosuch/inspect", r#"{"meas_id":"U1"}"#)
        .await;
    let v = w.next_on("anomalyclip/t2/nosuch/inspection").await.json();
    assert_eq!(
        (v["verdict"].as_str(), v["reason"].as_str()),
        (Some("ERROR"), Some("unknown camera"))
    );
    // And a good request after all that is served (continuous camera: from the stream).
    plc.send(topic, r#"{"meas_id":"G1"}"#).await;
    let v = w.next_on(answer).await.json();
    assert_eq!(v["meas_id"], "G1");
    assert!(matches!(v["verdict"].as_str(), Some("OK" | "NG")), "{v}");
    w.until(|m| m.topic == "anomalyclip/t2/cam/result").await;

    // A storm: 1000 requests at once; beyond max_pending they are answered busy, every one is
    // answered exactly once.
    for i in 0..1000 {
        plc.send(topic, format!(r#"{{"meas_id":"S{i}"}}"#)).await;
    }
    let mut seen = BTreeMap::new();
    while seen.len() < 1000 {
        let m = w.next_on(answer).await;
        let v = m.json();
        let id = v["meas_id"].as_str().expect("meas_id").to_owned();
        assert!(id.starts_with('S'), "{v}");
        assert!(
            seen.insert(id, v["verdict"].as_str().unwrap_or("").to_owned())
                .is_none(),
            "one answer each: {v}"
        );
    }
    let busy = seen.values().filter(|v| *v == "ERROR").count();
    let scored = seen.values().filter(|v| *v == "OK" || *v == "NG").count();
    assert_eq!(busy + scored, 1000, "{seen:?}");
    assert!(scored >= 1 && busy >= 1, "scored {scored}, busy {busy}");
    d.assert_running();
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().await.code(), Some(0), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_while_the_camera_is_offline_is_answered_error() {
    let broker = Broker::start(None).await;
    let mut w = Watcher::start(broker.port, "anomalyclip/t3/#").await;
    // Nothing listens on this RTSP port: the camera keeps reconnecting.
    let cam = format!(
        "[[camera]]\nname = \"gate\"\nmode = \"triggered\"\nuri = \"rtsp://127.0.0.1:{}/none\"\n\
         [camera.retry]\ninitial_ms = 100\nmax_ms = 200\n",
        free_port()
    );
    let mut d = Daemon::start(&config("t3", broker.port, &cam));
    d.wait_ready().await;
    // `ready` is false for this camera anyway: wait for the request connection instead.
    d.wait_log(&["listening for requests"], 1).await;
    w.until(|m| m.topic == "anomalyclip/t3/gate/ready" && m.text() == "false")
        .await;
    let plc = Plc::connect(broker.port).await;
    plc.send(
        "anomalyclip/t3/gate/inspect",
        r#"{"meas_id":"OFF1","deadline_ms":300}"#,
    )
    .await;
    let v = w.next_on("anomalyclip/t3/gate/inspection").await.json();
    assert_eq!(v["meas_id"], "OFF1");
    assert!(
        matches!(v["verdict"].as_str(), Some("ERROR" | "TIMEOUT")),
        "{v}"
    );
    assert_eq!(v["reason"], "camera offline", "{v}");
    assert!(v.get("score").is_none(), "{v}");
    d.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_decided_during_a_broker_outage_are_delivered_after_it_marked_replayed() {
    let mut broker = Broker::start(None).await;
    // The daemon reaches the broker through a gate, so the PLC can re-subscribe first.
    let proxy = Proxy::start(broker.port).await;
    let mut w = Watcher::start(broker.port, "anomalyclip/t4/#").await;
    // Requests wait 2 s for their frame (settle time): the broker dies meanwhile.
    let cfg = config("t4", proxy.port, &sim("cam", "triggered"))
        + "[trigger]\nsettle_ms = 2000\ntimeout_ms = 20000\n";
    let mut d = Daemon::start(&cfg);
    d.wait_ready().await;
    wait_ready_flag(&mut w, "anomalyclip/t4/cam/ready").await;
    let mut plc = Plc::connect(broker.port).await;
    for i in 0..10 {
        plc.send(
            "anomalyclip/t4/cam/inspect",
            format!(r#"{{"meas_id":"O{i}"}}"#),
        )
        .await;
    }
    plc.acked(10).await;
    // The broker forwards them to the daemon at once (127.0.0.1); then it dies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_open(false);
    broker.kill();
    d.wait_log(&["mqtt connection lost"], 1).await;
    let queue = d
        .dir
        .path()
        .join("state")
        .join(anomalyclip_edge::mqtt::INSPECTION_QUEUE_FILE);
    let t0 = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&queue).unwrap_or_default();
        if text.matches("\"add\"").count() >= 10 {
            break;
        }
        assert!(
            t0.elapsed() < common::broker::WAIT,
            "10 answers queued on disk: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let subs = w.subscriptions();
    broker.restart().await;
    w.wait_subscribed(subs + 1).await;
    proxy.set_open(true);
    let got = answers(
        &mut w,
        "anomalyclip/t4/cam/inspection",
        10,
        Duration::from_secs(1),
    )
    .await;
    let ids: BTreeSet<String> = got
        .iter()
        .map(|v| {
            assert_eq!(v["replayed"], true, "{v}");
            assert!(matches!(v["verdict"].as_str(), Some("OK" | "NG")), "{v}");
            v["meas_id"].as_str().expect("meas_id").to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 10, "all 10, each once: {got:?}");
    assert_eq!(got.len(), 10, "{got:?}");
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().await.code(), Some(0), "{}", d.log());
}

/// Percentile (nearest rank on the sorted values).
fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Benchmark (run explicitly, see `docs/measurements/trigger-latency.md`): trigger → answer
/// latency on a triggered camera at 25 fps, tiny model on the CPU, one request at a time every
/// 97 ms (not aligned with the frames). Prints the daemon's `latency_ms` (request arrival →
/// decided), the PLC's round trip (publish → answer received, through mosquitto and the disk
/// queue) and the camera's capture → scored latency from `stats` (the engine time, with
/// preprocessing and the head). `TRIGGER_BENCH_N` sets the number of requests (default 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --test it trigger::trigger_latency_benchmark -- --ignored --nocapture"]
async fn trigger_latency_benchmark() {
    let n: usize = std::env::var("TRIGGER_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let broker = Broker::start(None).await;
    let mut w = Watcher::start(broker.port, "anomalyclip/tb/#").await;
    let cam = "[[camera]]\nname = \"cam\"\nmode = \"triggered\"\n\
         pipeline = \"videotestsrc is-live=true pattern=ball ! video/x-raw,width=640,height=480,framerate=25/1 ! appsink name=sink\"\n\
         [camera.mask]\nenabled = false\n";
    let mut d = Daemon::start(&config("tb", broker.port, cam));
    d.wait_ready().await;
    wait_ready_flag(&mut w, "anomalyclip/tb/cam/ready").await;
    let plc = Plc::connect(broker.port).await;
    let mut daemon_ms = Vec::new();
    let mut round_trip_ms = Vec::new();
    for i in 0..n {
        let t0 = std::time::Instant::now();
        plc.send(
            "anomalyclip/tb/cam/inspect",
            format!(r#"{{"meas_id":"L{i}"}}"#),
        )
        .await;
        let id = format!("L{i}");
        let v = w
            .until(|m| {
                m.topic == "anomalyclip/tb/cam/inspection" && m.json()["meas_id"] == id.as_str()
            })
            .await
            .json();
        round_trip_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        assert!(matches!(v["verdict"].as_str(), Some("OK" | "NG")), "{v}");
        daemon_ms.push(v["latency_ms"].as_f64().expect("latency_ms"));
        tokio::time::sleep(Duration::from_millis(97)).await;
    }
    let s = w.until(|m| m.topic == "anomalyclip/tb/stats").await.json();
    let cs = &s["cameras"]["cam"];
    daemon_ms.sort_by(f64::total_cmp);
    round_trip_ms.sort_by(f64::total_cmp);
    println!(
        "requests {n}; frame interval 40.0 ms (25 fps); \
         daemon latency_ms p50 {:.1} p99 {:.1} max {:.1}; \
         PLC round trip p50 {:.1} p99 {:.1} max {:.1}; \
         capture->scored (stats, last interval) p50 {} p99 {}",
        pct(&daemon_ms, 0.5),
        pct(&daemon_ms, 0.99),
        daemon_ms[n - 1],
        pct(&round_trip_ms, 0.5),
        pct(&round_trip_ms, 0.99),
        round_trip_ms[n - 1],
        cs["latency_p50_ms"],
        cs["latency_p99_ms"],
    );
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().await.code(), Some(0), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_birth_certificate_is_retained_and_follows_a_reload() {
    let broker = Broker::start(None).await;
    let cfg = |mode: &str| config("t5", broker.port, &sim("cam", mode));
    let mut d = Daemon::start(&cfg("continuous"));
    d.wait_ready().await;
    // Once it is out (READY=1 can come before the broker connection), a client connecting
    // later gets it retained.
    let mut first = Watcher::start(broker.port, "anomalyclip/t5/info").await;
    first.next_on("anomalyclip/t5/info").await;
    let mut w = Watcher::start(broker.port, "anomalyclip/t5/info").await;
    let v = w.next_on("anomalyclip/t5/info").await;
    assert!(v.retain, "retained");
    let v = v.json();
    assert_eq!(v["node"], "t5");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["model"]["name"], "tiny-seed0");
    assert_eq!(v["model"]["tiny"], true);
    let manifest: toml::Table = toml::from_str(
        &std::fs::read_to_string(common::daemon::tiny_model().join("manifest.toml")).expect("read"),
    )
    .expect("manifest");
    let onnx = manifest["files"]["model.onnx"]
        .as_str()
        .expect("model.onnx hash");
    assert_eq!(v["model"]["files"]["model.onnx"], onnx);
    assert_eq!(v["cameras"][0]["name"], "cam");
    assert_eq!(v["cameras"][0]["mode"], "continuous");
    assert_eq!(
        v["cameras"][0]["regions"][0]["rect"],
        serde_json::json!([0.0, 0.0, 1.0, 1.0])
    );
    // A reload that changes the mode updates it.
    d.write_config(&cfg("triggered"));
    d.signal(libc::SIGHUP);
    let v = w
        .until(|m| {
            m.topic == "anomalyclip/t5/info" && m.json()["cameras"][0]["mode"] == "triggered"
        })
        .await
        .json();
    assert!(v["started_ms"].is_u64(), "{v}");
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().await.code(), Some(0), "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_named_regions_the_answer_is_the_worst_region_counted() {
    let broker = Broker::start(None).await;
    let mut w = Watcher::start(broker.port, "anomalyclip/t6/#").await;
    // "left" is NG on every frame (T2 = 0: every score is at or above it), "right" OK (T2 = 1).
    let cam = sim("cam", "triggered")
        + "[[camera.region]]\nname = \"left\"\nrect = [0.0, 0.0, 0.5, 1.0]\nthreshold = 0.0\n\
           [[camera.region]]\nname = \"right\"\nrect = [0.5, 0.0, 0.5, 1.0]\nthreshold = 1.0\n";
    let mut d = Daemon::start(&config("t6", broker.port, &cam));
    d.wait_ready().await;
    wait_ready_flag(&mut w, "anomalyclip/t6/cam/ready").await;
    let plc = Plc::connect(broker.port).await;
    let topic = "anomalyclip/t6/cam/inspect";
    let answer = "anomalyclip/t6/cam/inspection";
    plc.send(topic, r#"{"meas_id":"R1"}"#).await;
    let v = w.next_on(answer).await.json();
    assert_eq!(
        (v["verdict"].as_str(), v["region"].as_str()),
        (Some("NG"), Some("left")),
        "{v}"
    );
    plc.send(topic, r#"{"meas_id":"R2","regions":["right"]}"#)
        .await;
    let v = w.next_on(answer).await.json();
    assert_eq!(
        (v["verdict"].as_str(), v["region"].as_str()),
        (Some("OK"), Some("right")),
        "{v}"
    );
    assert_eq!(v["threshold"].as_f64(), Some(1.0), "{v}");
    plc.send(topic, r#"{"meas_id":"R3","regions":["middle"]}"#)
        .await;
    let v = w.next_on(answer).await.json();
    assert_eq!(v["verdict"], "ERROR", "{v}");
    assert_eq!(v["reason"], "unknown region 'middle'", "{v}");
    // The birth certificate lists the named regions.
    let mut late = Watcher::start(broker.port, "anomalyclip/t6/info").await;
    let info = late.next_on("anomalyclip/t6/info").await.json();
    let names: Vec<&str> = info["cameras"][0]["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["left", "right"], "{info}");
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().await.code(), Some(0), "{}", d.log());
}

/// MQTT 5 request/response: a requester that sets a response topic and correlation data gets
/// the answer there, with its correlation data, as well as on the plain `inspection` topic;
/// the same for a command and its acknowledgement. A request without them is answered on the
/// plain topics only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_response_topic_and_correlation_data_are_honoured() {
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
    use rumqttc::v5::{AsyncClient as Client5, Event as E5, MqttOptions as Options5};
    let broker = Broker::start(None).await;
    let mut w = Watcher::start(broker.port, "anomalyclip/t7/#").await;
    let cfg = config("t7", broker.port, &sim("cam", "triggered")) + "[commands]\n";
    let mut d = Daemon::start(&cfg);
    d.wait_ready().await;
    wait_ready_flag(&mut w, "anomalyclip/t7/cam/ready").await;

    // The MQTT 5 requester: subscribes to its own reply topic.
    let mut o = Options5::new(
        format!("plc5-{}", std::process::id()),
        "127.0.0.1",
        broker.port,
    );
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = Client5::new(o, 100);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let poll = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(E5::Incoming(P5::Publish(p))) => {
                    let corr = p
                        .properties
                        .as_ref()
                        .and_then(|pr| pr.correlation_data.clone())
                        .map(|c| c.to_vec());
                    let _ = tx.send((
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        corr,
                        p.payload.to_vec(),
                    ));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    client
        .subscribe("plc5/replies/#", Q5::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let props = |topic: &str, corr: &[u8]| PublishProperties {
        response_topic: Some(topic.to_owned()),
        correlation_data: Some(corr.to_vec().into()),
        ..Default::default()
    };
    client
        .publish_with_properties(
            "anomalyclip/t7/cam/inspect",
            Q5::AtLeastOnce,
            false,
            r#"{"meas_id":"V5-1"}"#,
            props("plc5/replies/inspect", b"\x00corr-1\xff"),
        )
        .await
        .expect("publish");
    let (topic, corr, payload) = next_response(&mut rx).await;
    assert_eq!(topic, "plc5/replies/inspect");
    assert_eq!(
        corr.as_deref(),
        Some(&b"\x00corr-1\xff"[..]),
        "correlation data echoed"
    );
    let v: Value = serde_json::from_slice(&payload).expect("json");
    assert_eq!(v["meas_id"], "V5-1", "{v}");
    // The plain contract gets the same answer.
    let plain = w.next_on("anomalyclip/t7/cam/inspection").await.json();
    assert_eq!(plain["result_id"], v["result_id"], "{plain} vs {v}");

    // A command with a response topic: the acknowledgement goes there too.
    client
        .publish_with_properties(
            "anomalyclip/t7/cmd",
            Q5::AtLeastOnce,
            false,
            r#"{"id":"k1","cmd":"ack_alarm","camera":"cam"}"#,
            props("plc5/replies/cmd", b"k1-corr"),
        )
        .await
        .expect("publish");
    let (topic, corr, payload) = next_response(&mut rx).await;
    assert_eq!(topic, "plc5/replies/cmd");
    assert_eq!(corr.as_deref(), Some(&b"k1-corr"[..]));
    let a: Value = serde_json::from_slice(&payload).expect("json");
    assert_eq!(
        (a["id"].as_str(), a["ok"].as_bool()),
        (Some("k1"), Some(true)),
        "{a}"
    );
    w.until(|m| m.topic == "anomalyclip/t7/cmd/ack" && m.json()["id"] == "k1")
        .await;

    // Without a response topic: plain topics only, nothing on the reply topic.
    client
        .publish(
            "anomalyclip/t7/cam/inspect",
            Q5::AtLeastOnce,
            false,
            r#"{"meas_id":"V5-2"}"#,
        )
        .await
        .expect("publish");
    let plain = w.next_on("anomalyclip/t7/cam/inspection").await.json();
    assert_eq!(plain["meas_id"], "V5-2");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "no response topic: no response");
    poll.abort();
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());
}

type Response5 = (String, Option<Vec<u8>>, Vec<u8>);

async fn next_response(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Response5>) -> Response5 {
    tokio::time::timeout(common::broker::WAIT, rx.recv())
        .await
        .expect("a response in time")
        .expect("requester task")
}
