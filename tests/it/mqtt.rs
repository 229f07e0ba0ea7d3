//! The MQTT publisher against a real mosquitto, observed by a separate client subscribed as a PLC
//! would be: topic/payload contract, retained statuses, Last Will, broker outage with alarm
//! replay, the disk queue across a publisher restart, clean stop.
//!
//! Every mosquitto runs under a guard that SIGKILLs it on drop; every wait is bounded.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anomalyclip_edge::mqtt::{MqttConfig, Publisher, PublisherHandle, QUEUE_FILE, TlsConfig};
use anomalyclip_edge::payload::{
    Alarm, CameraStatus, FrameResult, MAX_RESULT_BYTES, Stats, mask_png,
};
use common::broker::{Broker, Proxy, WAIT, Watcher, free_port};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn cfg(port: u16) -> MqttConfig {
    MqttConfig {
        host: "127.0.0.1".into(),
        port,
        keep_alive: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(200),
        ..MqttConfig::default()
    }
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < WAIT, "timed out waiting for {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

fn alarm(camera: &str, seq: u64) -> Alarm {
    Alarm {
        camera: camera.into(),
        active: seq.is_multiple_of(2),
        seq,
        ts_ms: 1_700_000_000_000 + seq,
        score: 0.75,
        region: None,
    }
}

fn result(camera: &str, seq: u64, model: &str) -> FrameResult {
    FrameResult {
        camera: camera.into(),
        seq,
        ts_ms: 1_700_000_000_000 + seq,
        score: 0.912_345,
        anomaly: true,
        threshold: 0.5,
        map_max: 0.99,
        area: 0.0123,
        latency_ms: 41.7,
        model: model.into(),
        region: None,
        verdict: "OK",
        score_norm: 0.5,
        cal: "manual".into(),
    }
}

async fn stop(h: &PublisherHandle, task: JoinHandle<()>, deadline: Duration) {
    h.shutdown(deadline);
    timeout(deadline + Duration::from_secs(5), task)
        .await
        .expect("publisher did not stop in time")
        .expect("publisher task panicked");
}

fn queue_lines(state: &Path) -> usize {
    std::fs::read_to_string(state.join(QUEUE_FILE))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_status_results_alarm_mask_stats_and_clean_stop() {
    let broker = Broker::start(None).await;
    let state = tempfile::tempdir().expect("state");
    let (h, task) = Publisher::spawn(&cfg(broker.port), "n1", state.path()).expect("spawn");
    // `online` acknowledged by the broker, then a PLC subscribes: it gets it retained.
    wait_until("online published", || h.counters().published >= 1).await;
    let mut plc = Watcher::start(broker.port, "anomalyclip/n1/#").await;
    let m = plc.next_on("anomalyclip/n1/status").await;
    assert_eq!((m.text().as_str(), m.retain), ("online", true));

    let cam = "c".repeat(64);
    let model = "anomalyclip-vitl14-518-with-a-deliberately-long-model-name-".repeat(4);
    h.camera_status(&cam, CameraStatus::Online);
    let m = plc.next_on(&format!("anomalyclip/n1/{cam}/status")).await;
    assert_eq!(m.text(), "online");

    // Results: flat JSON ≤ 512 bytes with the full schema.
    for seq in 0..3 {
        assert!(h.result(result(&cam, seq, &model)));
    }
    for seq in 0..3 {
        let m = plc.next_on(&format!("anomalyclip/n1/{cam}/result")).await;
        assert!(
            m.payload.len() <= MAX_RESULT_BYTES,
            "{} bytes",
            m.payload.len()
        );
        assert!(!m.retain);
        let v = m.json();
        let o = v.as_object().expect("object");
        assert_eq!(o.len(), 14, "{v}");
        assert_eq!(v["verdict"], "OK");
        assert_eq!(v["cal"], "manual");
        assert_eq!(v["v"], 1);
        assert_eq!(v["camera"], cam.as_str());
        assert_eq!(v["seq"], seq);
        assert_eq!(v["ts_ms"], 1_700_000_000_000u64 + seq);
        assert_eq!(v["score"], 0.9123);
        assert_eq!(v["anomaly"], true);
        assert_eq!(v["threshold"], 0.5);
        assert_eq!(v["latency_ms"], 41.7);
        assert!(v["model"].as_str().is_some_and(|s| s.len() <= 64));
        assert!(o.values().all(|x| !x.is_object() && !x.is_array()));
    }

    // A live alarm: not replayed.
    assert!(h.alarm(alarm(&cam, 0)));
    let m = plc.next_on(&format!("anomalyclip/n1/{cam}/alarm")).await;
    let v = m.json();
    assert_eq!(
        (
            v["v"].as_u64(),
            v["active"].as_bool(),
            v["seq"].as_u64(),
            v["replayed"].as_bool()
        ),
        (Some(1), Some(true), Some(0), Some(false))
    );
    assert_eq!(v.as_object().map(|o| o.len()), Some(7));

    // Mask: grayscale PNG with camera/seq/ts_ms text chunks.
    let pixels = vec![128u8; 32 * 32];
    let png_bytes = mask_png(&cam, 2, 1_700_000_000_002, 32, 32, &pixels).expect("png");
    assert!(h.mask(&cam, png_bytes));
    let m = plc.next_on(&format!("anomalyclip/n1/{cam}/mask")).await;
    let reader = png::Decoder::new(std::io::Cursor::new(m.payload))
        .read_info()
        .expect("png");
    let info = reader.info();
    assert_eq!(
        (info.width, info.color_type),
        (32, png::ColorType::Grayscale)
    );
    let text: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    assert!(text.contains(&("seq".into(), "2".into())), "{text:?}");
    assert!(text.contains(&("camera".into(), cam.clone())), "{text:?}");
    assert!(
        text.contains(&("ts_ms".into(), "1700000000002".into())),
        "{text:?}"
    );

    // Stats: publisher counters filled in.
    h.stats(Stats {
        uptime_s: 1,
        engine: "cpu".into(),
        ..Stats::default()
    });
    let v = plc.next_on("anomalyclip/n1/stats").await.json();
    assert_eq!(v["engine"], "cpu");
    assert!(
        v["mqtt"]["published"].as_u64().is_some_and(|n| n >= 5),
        "{v}"
    );
    assert_eq!(v["mqtt"]["connected"], true);

    // The alarm was acknowledged: queue empty, file truncated. Progress was recorded.
    wait_until("alarm acked", || h.counters().queued_alarms == 0).await;
    assert_eq!(queue_lines(state.path()), 0);
    assert!(h.last_progress().is_some());
    assert_eq!(h.counters().dropped_results, 0);

    // Clean stop: camera offline, node `stopped`, both retained.
    stop(&h, task, Duration::from_secs(3)).await;
    assert!(!h.is_connected());
    let mut late = Watcher::start(broker.port, "anomalyclip/n1/#").await;
    let mut got = std::collections::BTreeMap::new();
    while got.len() < 3 {
        let m = late.until(|m| m.retain).await;
        got.insert(m.topic.clone(), m);
    }
    assert_eq!(got["anomalyclip/n1/status"].text(), "stopped");
    assert_eq!(
        got[&format!("anomalyclip/n1/{cam}/status")].text(),
        "offline"
    );
    assert_eq!(
        got[&format!("anomalyclip/n1/{cam}/alarm")].json()["active"],
        true
    );
    // After a stop, results are refused and counted.
    assert!(!h.result(result(&cam, 9, "m")));
    assert_eq!(h.counters().dropped_results, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_will_offline_when_the_publisher_dies_without_disconnect() {
    let broker = Broker::start(None).await;
    let state = tempfile::tempdir().expect("state");
    let (h, task) = Publisher::spawn(&cfg(broker.port), "lw", state.path()).expect("spawn");
    wait_until("online published", || h.counters().published >= 1).await;
    let mut plc = Watcher::start(broker.port, "anomalyclip/lw/status").await;
    assert_eq!(plc.next_on("anomalyclip/lw/status").await.text(), "online");
    // Abort the task: its socket is dropped without DISCONNECT, as in a crash.
    task.abort();
    let m = plc.next_on("anomalyclip/lw/status").await;
    assert_eq!(m.text(), "offline");
    // And it is retained for PLCs that connect later.
    let mut late = Watcher::start(broker.port, "anomalyclip/lw/status").await;
    let m = late.next_on("anomalyclip/lw/status").await;
    assert_eq!((m.text().as_str(), m.retain), ("offline", true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_survive_a_broker_outage_in_order_and_results_are_dropped() {
    let mut broker = Broker::start(None).await;
    let proxy = Proxy::start(broker.port).await;
    let state = tempfile::tempdir().expect("state");
    let (h, task) = Publisher::spawn(&cfg(proxy.port), "out", state.path()).expect("spawn");
    let mut plc = Watcher::start(broker.port, "anomalyclip/out/#").await;
    wait_until("connected", || h.is_connected()).await;
    h.camera_status("cam", CameraStatus::Online);

    // Alarms while the broker is up arrive live.
    for seq in 0..3 {
        h.alarm(alarm("cam", seq));
    }
    for seq in 0..3 {
        let v = plc.next_on("anomalyclip/out/cam/alarm").await.json();
        assert_eq!(
            (v["seq"].as_u64(), v["replayed"].as_bool()),
            (Some(seq), Some(false))
        );
    }
    wait_until("live alarms acked", || h.counters().queued_alarms == 0).await;

    // Outage: SIGKILL the broker; the publisher may not reconnect until the test opens the gate.
    proxy.set_open(false);
    broker.kill();
    wait_until("disconnect noticed", || !h.is_connected()).await;
    let dropped_before = h.counters().dropped_results;
    for seq in 3..8 {
        assert!(h.alarm(alarm("cam", seq)));
        assert!(!h.result(result("cam", seq, "m")));
    }
    h.camera_status("cam", CameraStatus::Reconnecting);
    wait_until("alarms queued", || h.counters().queued_alarms == 5).await;
    assert_eq!(h.counters().dropped_results, dropped_before + 5);
    assert_eq!(queue_lines(state.path()), 5, "alarms are on disk");

    // Broker back on the same port; the PLC re-subscribes first, then the publisher may connect.
    let subs = plc.subscriptions();
    broker.restart().await;
    plc.wait_subscribed(subs + 1).await;
    proxy.set_open(true);

    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        let v = plc.next_on("anomalyclip/out/cam/alarm").await.json();
        assert_eq!(v["replayed"], true, "{v}");
        assert_eq!(v["v"], 1);
        seqs.push(v["seq"].as_u64().expect("seq"));
    }
    assert_eq!(
        seqs,
        vec![3, 4, 5, 6, 7],
        "every alarm, in order, none missing"
    );
    wait_until("replayed alarms acked", || h.counters().queued_alarms == 0).await;
    assert_eq!(queue_lines(state.path()), 0);
    assert_eq!(h.counters().reconnects, 1);

    // Statuses were re-published on reconnect (the restarted broker had lost them).
    let mut late = Watcher::start(broker.port, "anomalyclip/out/+/status").await;
    let m = late.next_on("anomalyclip/out/cam/status").await;
    assert_eq!((m.text().as_str(), m.retain), ("reconnecting", true));
    let mut late = Watcher::start(broker.port, "anomalyclip/out/status").await;
    assert_eq!(
        late.next_on("anomalyclip/out/status").await.text(),
        "online"
    );

    // Results flow again.
    assert!(h.result(result("cam", 8, "m")));
    let v = plc.next_on("anomalyclip/out/cam/result").await.json();
    assert_eq!(v["seq"], 8);
    stop(&h, task, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_queue_survives_a_publisher_restart_with_the_broker_down_at_start() {
    let port = free_port();
    let state = tempfile::tempdir().expect("state");

    // First life: the broker is down from the start; alarms go to disk only.
    let (h, task) = Publisher::spawn(&cfg(port), "dq", state.path()).expect("spawn");
    for seq in 0..4 {
        h.alarm(alarm("cam", seq));
    }
    wait_until("alarms queued", || h.counters().queued_alarms == 4).await;
    assert!(!h.is_connected());
    stop(&h, task, Duration::from_millis(200)).await;
    assert_eq!(queue_lines(state.path()), 4);

    // Second life, broker up: the restored alarms are replayed in order, then removed.
    let broker = Broker::start(Some(port)).await;
    let mut plc = Watcher::start(broker.port, "anomalyclip/dq/#").await;
    let (h, task) = Publisher::spawn(&cfg(port), "dq", state.path()).expect("respawn");
    assert_eq!(h.counters().queued_alarms, 4);
    let mut seqs = Vec::new();
    while seqs.len() < 4 {
        let v = plc.next_on("anomalyclip/dq/cam/alarm").await.json();
        assert_eq!(v["replayed"], true);
        seqs.push(v["seq"].as_u64().expect("seq"));
    }
    assert_eq!(seqs, vec![0, 1, 2, 3]);
    // A new alarm after the replay is live.
    h.alarm(alarm("cam", 4));
    let v = plc.next_on("anomalyclip/dq/cam/alarm").await.json();
    assert_eq!(
        (v["seq"].as_u64(), v["replayed"].as_bool()),
        (Some(4), Some(false))
    );
    wait_until("all acked", || h.counters().queued_alarms == 0).await;
    assert_eq!(queue_lines(state.path()), 0);
    stop(&h, task, Duration::from_secs(3)).await;
}

/// Runs openssl; false if it is not installed or fails (the TLS test is then skipped).
fn openssl(dir: &Path, args: &[&str]) -> bool {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all P-256.
fn make_certs(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ok = openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ][..],
        ]
        .concat(),
    );
    if !ok {
        return false;
    }
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let subj = format!("/CN={name}");
        let ok = openssl(
            dir,
            &[
                &["req"][..],
                &ec[..],
                &["-keyout", &key, "-out", &csr, "-subj", &subj][..],
            ]
            .concat(),
        ) && openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                ext,
            ],
        );
        if !ok {
            return false;
        }
    }
    for f in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let _ = std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644));
    }
    true
}

#[cfg_attr(
    not(have_openssl),
    ignore = "needs the openssl command (Debian package openssl)"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    if !make_certs(dir.path()) {
        panic!("openssl failed or is not installed: cannot make the test certificates");
    }
    let tls_port = free_port();
    let d = dir.path().display().to_string();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\n\
         keyfile {d}/server.key\nrequire_certificate true\n"
    );
    let broker = Broker::start_in(dir, None, extra).await;
    let mut plc = Watcher::start(broker.port, "anomalyclip/tls/status").await;
    let state = tempfile::tempdir().expect("state");
    let certs = broker.dir.path();
    let mut c = cfg(tls_port);
    c.tls = Some(TlsConfig {
        ca_file: certs.join("ca.pem"),
        client_cert_file: Some(certs.join("client.pem")),
        client_key_file: Some(certs.join("client.key")),
    });
    let (h, task) = Publisher::spawn(&c, "tls", state.path()).expect("spawn");
    assert_eq!(plc.next_on("anomalyclip/tls/status").await.text(), "online");
    assert!(h.is_connected());
    // The request connection (MQTT 5) over the same mutual TLS: it subscribes and a request
    // published in plain text on the other listener reaches it.
    let (inbox_tx, mut inbox) = tokio::sync::mpsc::channel(8);
    let link_stop = tokio_util::sync::CancellationToken::new();
    let (link, link_task) = anomalyclip_edge::mqtt::requests::spawn(
        &c,
        "tls",
        anomalyclip_edge::mqtt::requests::Sinks {
            inbox: inbox_tx,
            commands: None,
            publisher: h.clone(),
        },
        link_stop.clone(),
    )
    .expect("request connection");
    let listening = link.listening();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !listening.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the request connection subscribes over TLS");
    let (client, mut el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new("tls-plc", "127.0.0.1", broker.port),
        10,
    );
    let poll = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    client
        .publish(
            "anomalyclip/tls/cam/inspect",
            rumqttc::QoS::AtLeastOnce,
            false,
            &b"{\"meas_id\":\"T1\"}"[..],
        )
        .await
        .expect("publish");
    let req = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
        .await
        .expect("request in time")
        .expect("request");
    assert_eq!(req.camera, "cam");
    assert_eq!(req.payload, b"{\"meas_id\":\"T1\"}");
    assert!(req.response.is_none());
    poll.abort();
    link_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), link_task).await;
    stop(&h, task, Duration::from_secs(3)).await;
    assert_eq!(
        plc.next_on("anomalyclip/tls/status").await.text(),
        "stopped"
    );
}
