//! Commands from SCADA (`[commands]`, src/commands.rs, src/daemon/commands.rs) against the real
//! daemon (tiny model, CPU), a real mosquitto and a simulated camera: a test client publishes
//! on `<prefix>/cmd` and reads `<prefix>/cmd/ack`; a Sparkplug host writes DCMD metrics.
//!
//! The tiny model has random weights; thresholds 0 and 1 make every frame anomalous or normal
//! whatever the score, so the alarm's course is known.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::broker::{Broker, Msg, Watcher, publish_once};
use common::daemon::{Daemon, config};
use prost::Message;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;

const ACK: &str = "anomalyclip/c1/cmd/ack";
const CMD: &str = "anomalyclip/c1/cmd";

/// A simulated camera (10 fps) whose alarm raises on one frame over `threshold`, and after
/// two normal frames is held until acknowledged (`latch = true`).
fn latched_camera(threshold: f32) -> String {
    format!(
        "[[camera]]\n\
         name = \"cam\"\n\
         pipeline = \"videotestsrc is-live=true pattern=ball ! video/x-raw,width=160,height=120,framerate=10/1 ! appsink name=sink\"\n\
         threshold = {threshold:?}\n\
         [camera.alarm]\n\
         raise_count = 1\n\
         raise_window = 1\n\
         clear_count = 2\n\
         latch = true\n\
         [camera.mask]\n\
         enabled = false\n"
    )
}

/// The config of node `c1` with `extra` top-level tables and an absolute state directory (so a
/// second daemon process finds the first one's overrides).
fn cmd_config(port: u16, state: &Path, extra: &str, camera: &str) -> String {
    let text = config("c1", port, camera).replace(
        "state_dir = \"state\"",
        &format!("state_dir = \"{}\"", state.display()),
    );
    let (top, cams) = text.split_once("[[camera]]").expect("camera");
    format!("{top}{extra}[[camera]]{cams}")
}

/// Publishes one message (QoS 1, not retained) as an anonymous client.
async fn publish(port: u16, topic: &str, payload: impl Into<Vec<u8>>) {
    publish_once(port, topic, payload, false, None).await;
}

/// Sends a command and returns its acknowledgement (matched on `id`).
async fn command(w: &mut Watcher, port: u16, id: &str, body: &str) -> Value {
    command_seen(w, port, id, body).await.0
}

/// Sends a command; returns its acknowledgement and the messages received before it (an
/// alarm clear is published before the acknowledgement).
async fn command_seen(w: &mut Watcher, port: u16, id: &str, body: &str) -> (Value, Vec<Msg>) {
    let payload = format!(r#"{{"id":"{id}",{body}}}"#);
    publish(port, CMD, payload).await;
    until_ack(w, |a| a["id"] == id).await
}

/// Receives until an acknowledgement matching `pred`; returns it and what came before.
async fn until_ack(w: &mut Watcher, mut pred: impl FnMut(&Value) -> bool) -> (Value, Vec<Msg>) {
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + common::broker::WAIT;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no matching acknowledgement in {:?}; seen: {:?}",
            common::broker::WAIT,
            seen.iter()
                .rev()
                .take(5)
                .map(Msg::describe)
                .collect::<Vec<_>>()
        );
        let m = w.until(|_| true).await;
        if m.topic == ACK && pred(&m.json()) {
            return (m.json(), seen);
        }
        seen.push(m);
    }
}

/// Waits for a message matching `pred`, which may have come before the acknowledgement (in
/// `seen`).
async fn seen_or_wait(w: &mut Watcher, seen: &[Msg], mut pred: impl FnMut(&Msg) -> bool) {
    if !seen.iter().any(&mut pred) {
        w.until(pred).await;
    }
}

/// Waits for the alarm clear, which may have come before the acknowledgement (in `seen`).
async fn cleared(w: &mut Watcher, seen: &[Msg]) {
    seen_or_wait(w, seen, |m| alarm(m) == Some(false)).await;
}

/// The next result of `cam` with threshold `t` (the command's reload has reached the worker).
async fn result_with_threshold(w: &mut Watcher, t: f64) -> Value {
    w.until(|m| {
        m.topic == "anomalyclip/c1/cam/result"
            && m.json()["threshold"]
                .as_f64()
                .is_some_and(|x| (x - t).abs() < 1e-6)
    })
    .await
    .json()
}

fn alarm(m: &Msg) -> Option<bool> {
    (m.topic == "anomalyclip/c1/cam/alarm" && !m.payload.is_empty())
        .then(|| m.json()["active"].as_bool())
        .flatten()
}

/// Thresholds, a latched alarm and its acknowledgement, refusals, disable/enable, overrides
/// that survive a restart and leave the config file alone, `clear_overrides`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(have_ort),
    ignore = "needs ONNX Runtime (ORT_DYLIB_PATH or scripts/setup)"
)]
async fn commands_change_thresholds_ack_latched_alarms_and_disable_cameras() {
    crate::common::init_tracing();
    let broker = Broker::start(None).await;
    let state = tempfile::tempdir().expect("state");
    let mut w = Watcher::start(broker.port, "anomalyclip/c1/#").await;
    let text = cmd_config(
        broker.port,
        state.path(),
        "[commands]\n",
        &latched_camera(0.0),
    );
    let mut d = Daemon::start(&text);
    d.wait_ready().await;
    // Commands published before the request connection subscribed would reach nobody.
    d.wait_log(&["listening for requests"], 1).await;
    let file_before = std::fs::read(d.config_path()).expect("config");

    // Threshold 0: every frame is anomalous, the alarm raises.
    w.until(|m| alarm(m) == Some(true)).await;

    // T2 = 1: every frame normal; the latched alarm stays raised.
    let ack = command(
        &mut w,
        broker.port,
        "c1",
        r#""cmd":"set_thresholds","camera":"cam","t2":1.0"#,
    )
    .await;
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["cmd"], "set_thresholds");
    assert_eq!(ack["source"], "mqtt");
    result_with_threshold(&mut w, 1.0).await;
    let held: Vec<Msg> = w.collect_for(Duration::from_millis(1500)).await;
    assert!(
        held.iter().all(|m| alarm(m) != Some(false)),
        "a latched alarm must not clear by itself"
    );
    assert!(
        held.iter()
            .any(|m| m.topic == "anomalyclip/c1/cam/result" && m.json()["anomaly"] == false),
        "frames are normal now"
    );

    // The acknowledgement clears it.
    let (ack, seen) = command_seen(
        &mut w,
        broker.port,
        "c2",
        r#""cmd":"ack_alarm","camera":"cam""#,
    )
    .await;
    assert_eq!(ack["ok"], true, "{ack}");
    assert!(
        ack["detail"]
            .as_str()
            .is_some_and(|d| d.contains("cleared")),
        "{ack}"
    );
    cleared(&mut w, &seen).await;
    let ack = command(
        &mut w,
        broker.port,
        "c2b",
        r#""cmd":"ack_alarm","camera":"cam""#,
    )
    .await;
    assert!(
        ack["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no alarm raised")),
        "{ack}"
    );

    // Refusals: one line each, correlated by id; the daemon keeps running.
    for (id, body, why) in [
        (
            "r1",
            r#""cmd":"set_thresholds","camera":"cam","t2":2"#,
            "t2 must be a number in [0, 1]",
        ),
        (
            "r2",
            r#""cmd":"set_thresholds","camera":"nope","t2":0.5"#,
            "unknown camera \"nope\"",
        ),
        ("r3", r#""cmd":"reboot""#, "unknown cmd \"reboot\""),
        (
            "r4",
            r#""cmd":"start_calibration","camera":"cam","frames":100,"rate":0.05"#,
            "needs the live view",
        ),
        (
            "r5",
            r#""cmd":"set_thresholds","camera":"cam","t2":0.5,"t1":0.7"#,
            "t1 (0.7) is above t2 (0.5)",
        ),
    ] {
        let ack = command(&mut w, broker.port, id, body).await;
        assert_eq!(ack["ok"], false, "{ack}");
        assert!(
            ack["detail"].as_str().is_some_and(|d| d.contains(why)),
            "{id}: {ack}"
        );
    }
    publish(broker.port, CMD, "not json").await;
    let ack = w.next_on(ACK).await.json();
    assert_eq!(ack["ok"], false, "{ack}");
    assert!(ack.get("id").is_none(), "{ack}");
    d.assert_running();

    // Disable: status `disabled`, the birth certificate says so, no more results.
    let (ack, seen) = command_seen(
        &mut w,
        broker.port,
        "c3",
        r#""cmd":"disable_camera","camera":"cam""#,
    )
    .await;
    assert_eq!(ack["ok"], true, "{ack}");
    seen_or_wait(&mut w, &seen, |m| {
        m.topic == "anomalyclip/c1/cam/status" && m.text() == "disabled"
    })
    .await;
    seen_or_wait(&mut w, &seen, |m| {
        m.topic == "anomalyclip/c1/info" && m.json()["disabled"] == serde_json::json!(["cam"])
    })
    .await;
    // Frames in flight may still land; then silence.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quiet = w.collect_for(Duration::from_millis(1500)).await;
    assert!(
        !quiet.iter().any(|m| m.topic == "anomalyclip/c1/cam/result"),
        "a disabled camera is not scored"
    );
    let ov: Value = serde_json::from_slice(
        &std::fs::read(state.path().join("overrides.v1.json")).expect("overrides file"),
    )
    .expect("json");
    assert_eq!(ov["cameras"]["cam"]["enabled"], false, "{ov}");
    assert_eq!(ov["cameras"]["cam"]["thresholds"][""]["t2"], 1.0, "{ov}");

    // The overrides survive a restart; the config file was never written.
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());
    assert_eq!(
        std::fs::read(d.config_path()).expect("config"),
        file_before,
        "commands never write the config file"
    );
    let mut d = Daemon::start(&text);
    d.wait_ready().await;
    // Commands published before the request connection subscribed would reach nobody.
    d.wait_log(&["listening for requests"], 1).await;
    w.until(|m| m.topic == "anomalyclip/c1/cam/status" && m.text() == "disabled")
        .await;
    let (ack, seen) = command_seen(
        &mut w,
        broker.port,
        "c4",
        r#""cmd":"enable_camera","camera":"cam""#,
    )
    .await;
    assert_eq!(ack["ok"], true, "{ack}");
    // Back, with the threshold a command set before the restart.
    seen_or_wait(&mut w, &seen, |m| {
        m.topic == "anomalyclip/c1/cam/status" && m.text() == "online"
    })
    .await;
    result_with_threshold(&mut w, 1.0).await;

    // clear_overrides: the file's threshold (0) again, and the file is gone.
    let ack = command(&mut w, broker.port, "c5", r#""cmd":"clear_overrides""#).await;
    assert_eq!(ack["ok"], true, "{ack}");
    result_with_threshold(&mut w, 0.0).await;
    assert!(!state.path().join("overrides.v1.json").exists());
    assert!(
        d.log().contains("command carried out"),
        "commands are logged"
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());
}

/// Without `[commands]` nothing is subscribed; `allow` restricts what is carried out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(have_ort),
    ignore = "needs ONNX Runtime (ORT_DYLIB_PATH or scripts/setup)"
)]
async fn commands_are_off_by_default_and_allow_restricts_them() {
    crate::common::init_tracing();
    let broker = Broker::start(None).await;
    let state = tempfile::tempdir().expect("state");
    let mut w = Watcher::start(broker.port, "anomalyclip/c1/#").await;
    let mut d = Daemon::start(&cmd_config(
        broker.port,
        state.path(),
        "",
        &latched_camera(0.5),
    ));
    d.wait_ready().await;
    // Commands published before the request connection subscribed would reach nobody.
    d.wait_log(&["listening for requests"], 1).await;
    w.next_on("anomalyclip/c1/cam/result").await;
    publish(
        broker.port,
        CMD,
        r#"{"id":"x","cmd":"disable_camera","camera":"cam"}"#,
    )
    .await;
    let after = w.collect_for(Duration::from_millis(1500)).await;
    assert!(
        !after.iter().any(|m| m.topic == ACK),
        "no [commands]: no answer"
    );
    assert!(
        after.iter().any(|m| m.topic == "anomalyclip/c1/cam/result"),
        "and the camera still runs"
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());

    // A retained command (left on the broker while the daemon was away) reaches the next
    // process as retained at its subscription: never acted on (it would repeat at every
    // reconnect).
    publish_once(
        broker.port,
        CMD,
        r#"{"id":"stale","cmd":"ack_alarm","camera":"cam"}"#,
        true,
        None,
    )
    .await;
    let text = cmd_config(
        broker.port,
        state.path(),
        "[commands]\nallow = [\"ack_alarm\"]\n",
        &latched_camera(0.5),
    );
    let mut d = Daemon::start(&text);
    d.wait_ready().await;
    // Commands published before the request connection subscribed would reach nobody.
    d.wait_log(&["listening for requests"], 1).await;
    let ack = command(
        &mut w,
        broker.port,
        "y",
        r#""cmd":"disable_camera","camera":"cam""#,
    )
    .await;
    assert_eq!(ack["ok"], false, "{ack}");
    assert!(
        ack["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not allowed")),
        "{ack}"
    );
    d.wait_log(&["a retained request or command is not acted on"], 1)
        .await;

    // A storm: 1000 commands at once, each answered (carried out or `busy`), nothing crashes;
    // an oversized one is answered too.
    let mut o = MqttOptions::new(
        format!("storm-{}", std::process::id()),
        "127.0.0.1",
        broker.port,
    );
    o.set_keep_alive(Duration::from_secs(5));
    o.set_inflight(200);
    let (client, mut el) = AsyncClient::new(o, 2000);
    let poller = tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    for i in 0..1000 {
        let body = format!(r#"{{"id":"s{i}","cmd":"ack_alarm","camera":"cam"}}"#);
        client
            .publish(CMD, QoS::AtLeastOnce, false, body.into_bytes())
            .await
            .expect("publish");
    }
    let mut ids = std::collections::BTreeSet::new();
    let (mut done, mut busy) = (0, 0);
    while ids.len() < 1000 {
        let m = w.next_on(ACK).await;
        let a = m.json();
        match a["id"].as_str() {
            Some(id) if id.starts_with('s') => {
                assert!(ids.insert(id.to_owned()), "one answer per command: {a}");
                if a["ok"] == true {
                    done += 1;
                } else {
                    assert!(
                        a["detail"].as_str().is_some_and(|d| d.starts_with("busy")),
                        "{a}"
                    );
                    busy += 1;
                }
            }
            _ => panic!("an answer to no command of the storm: {a}"),
        }
    }
    let big = format!(
        r#"{{"id":"big","cmd":"ack_alarm","camera":"{}"}}"#,
        "c".repeat(5000)
    );
    client
        .publish(CMD, QoS::AtLeastOnce, false, big.into_bytes())
        .await
        .expect("publish");
    let big_ack = w.next_on(ACK).await.json();
    poller.abort();
    assert_eq!(big_ack["ok"], false, "{big_ack}");
    assert!(
        big_ack["detail"]
            .as_str()
            .is_some_and(|d| d.contains("exceeds 4096")),
        "{big_ack}"
    );
    eprintln!("storm of 1000 commands: {done} carried out, {busy} busy");
    d.assert_running();
    let later = w.collect_for(Duration::from_millis(1000)).await;
    assert!(
        !later
            .iter()
            .any(|m| m.topic == ACK && m.json()["id"] == "stale"),
        "a retained command is not carried out"
    );
    publish_once(broker.port, CMD, Vec::new(), true, None).await;
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());
}

fn dcmd(
    metric: &str,
    value: anomalyclip_edge::sparkplug::proto::payload::metric::Value,
) -> Vec<u8> {
    use anomalyclip_edge::sparkplug::proto;
    proto::Payload {
        timestamp: Some(1),
        metrics: vec![proto::payload::Metric {
            name: Some(metric.into()),
            timestamp: Some(1),
            value: Some(value),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

/// A Sparkplug host writes `(frame)/threshold`, acknowledges by writing `(frame)/alarm` =
/// false, disables through `Device Control/Disable` and enables through the node's
/// `Node Control/Enable Camera`; each is acknowledged on `<prefix>/cmd/ack` with source
/// `sparkplug`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(have_ort),
    ignore = "needs ONNX Runtime (ORT_DYLIB_PATH or scripts/setup)"
)]
async fn sparkplug_dcmd_writes_become_commands() {
    use anomalyclip_edge::sparkplug::proto::payload::metric::Value as V;
    crate::common::init_tracing();
    let broker = Broker::start(None).await;
    let state = tempfile::tempdir().expect("state");
    let mut w = Watcher::start(broker.port, "anomalyclip/c1/#").await;
    let mut spb = Watcher::start(broker.port, "spBv1.0/g1/#").await;
    let text = cmd_config(
        broker.port,
        state.path(),
        "[commands]\n[sparkplug]\ngroup_id = \"g1\"\n",
        &latched_camera(0.0),
    );
    let mut d = Daemon::start(&text);
    d.wait_ready().await;
    // Commands published before the request connection subscribed would reach nobody.
    d.wait_log(&["listening for requests"], 1).await;
    spb.until(|m| m.topic == "spBv1.0/g1/DBIRTH/c1/cam").await;
    w.until(|m| alarm(m) == Some(true)).await;

    let dcmd_topic = "spBv1.0/g1/DCMD/c1/cam";
    publish(
        broker.port,
        dcmd_topic,
        dcmd("(frame)/threshold", V::FloatValue(1.0)),
    )
    .await;
    let ack = w.next_on(ACK).await.json();
    assert_eq!(ack["ok"], true, "{ack}");
    assert_eq!(ack["source"], "sparkplug");
    assert_eq!(ack["cmd"], "set_thresholds");
    result_with_threshold(&mut w, 1.0).await;
    // Held by the latch; the host's write of alarm = false acknowledges it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish(
        broker.port,
        dcmd_topic,
        dcmd("(frame)/alarm", V::BooleanValue(false)),
    )
    .await;
    let (ack, seen) = until_ack(&mut w, |_| true).await;
    assert_eq!(ack["cmd"], "ack_alarm", "{ack}");
    assert_eq!(ack["ok"], true, "{ack}");
    cleared(&mut w, &seen).await;

    publish(
        broker.port,
        dcmd_topic,
        dcmd("Device Control/Disable", V::BooleanValue(true)),
    )
    .await;
    let ack = w.next_on(ACK).await.json();
    assert_eq!(
        (ack["cmd"].as_str(), ack["ok"].as_bool()),
        (Some("disable_camera"), Some(true)),
        "{ack}"
    );
    spb.until(|m| m.topic == "spBv1.0/g1/DDEATH/c1/cam").await;
    publish(
        broker.port,
        "spBv1.0/g1/NCMD/c1",
        dcmd("Node Control/Enable Camera", V::StringValue("cam".into())),
    )
    .await;
    let ack = w.next_on(ACK).await.json();
    assert_eq!(
        (ack["cmd"].as_str(), ack["ok"].as_bool()),
        (Some("enable_camera"), Some(true)),
        "{ack}"
    );
    spb.until(|m| m.topic == "spBv1.0/g1/DBIRTH/c1/cam").await;
    // A write the daemon does not take is ignored, not answered, and nothing breaks.
    publish(
        broker.port,
        dcmd_topic,
        dcmd("(frame)/score", V::FloatValue(0.1)),
    )
    .await;
    w.until(|m| m.topic == "anomalyclip/c1/cam/result").await;
    d.assert_running();
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());
}

/// The mosquitto ACL block of docs/commands.md, node id `station-1` replaced by `c1`.
fn acl_from_docs() -> String {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/commands.md"))
            .expect("docs/commands.md");
    let block = doc
        .split_once("<!-- acl:begin -->")
        .and_then(|(_, rest)| rest.split_once("<!-- acl:end -->"))
        .map(|(block, _)| block)
        .expect("the ACL block markers in docs/commands.md");
    block
        .lines()
        .filter(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("station-1", "c1")
}

/// The broker set up as docs/commands.md says (no anonymous access, a password file, the ACL
/// block of the docs): the daemon works as `anomalyclip-edge`, `scada` commands it, a `viewer`
/// command is dropped by the broker (no acknowledgement, nothing changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(have_ort),
    ignore = "needs ONNX Runtime (ORT_DYLIB_PATH or scripts/setup)"
)]
async fn mosquitto_acl_from_the_docs_lets_only_scada_command() {
    use std::os::unix::fs::PermissionsExt;
    crate::common::init_tracing();
    let dir = tempfile::tempdir().expect("broker dir");
    let passwd = dir.path().join("passwd");
    let acl = dir.path().join("acl");
    for (i, user) in ["anomalyclip-edge", "scada", "viewer"].iter().enumerate() {
        let mut cmd = std::process::Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let st = cmd
            .args([
                "-b",
                &passwd.display().to_string(),
                user,
                &format!("pw-{user}"),
            ])
            .status()
            .expect("mosquitto_passwd (Debian package mosquitto)");
        assert!(st.success(), "mosquitto_passwd {user}");
    }
    std::fs::write(&acl, acl_from_docs()).expect("acl");
    for f in [&passwd, &acl] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let extra = format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}\n",
        passwd.display(),
        acl.display()
    );
    let broker = Broker::start_in(dir, None, extra).await;
    let mut w = Watcher::start_as(
        broker.port,
        "anomalyclip/c1/#",
        Some(("viewer", "pw-viewer")),
    )
    .await;
    let state = tempfile::tempdir().expect("state");
    let text = cmd_config(
        broker.port,
        state.path(),
        "[commands]\n",
        &latched_camera(0.5),
    )
    .replace(
        "host = \"127.0.0.1\"",
        "host = \"127.0.0.1\"\nusername = \"anomalyclip-edge\"\npassword = \"pw-anomalyclip-edge\"",
    );
    let mut d = Daemon::start(&text);
    d.wait_ready().await;
    // Commands published before the request connection subscribed would reach nobody.
    d.wait_log(&["listening for requests"], 1).await;
    // The viewer reads what the daemon publishes …
    w.next_on("anomalyclip/c1/cam/result").await;
    // … but its command is dropped by the broker.
    publish_once(
        broker.port,
        CMD,
        r#"{"id":"v1","cmd":"disable_camera","camera":"cam"}"#,
        false,
        Some(("viewer", "pw-viewer")),
    )
    .await;
    let after = w.collect_for(Duration::from_millis(1500)).await;
    assert!(
        !after.iter().any(|m| m.topic == ACK),
        "a viewer's command must not reach the daemon"
    );
    assert!(after.iter().any(|m| m.topic == "anomalyclip/c1/cam/result"));
    // SCADA's is carried out and acknowledged.
    publish_once(
        broker.port,
        CMD,
        r#"{"id":"s1","cmd":"set_thresholds","camera":"cam","t2":0.9}"#,
        false,
        Some(("scada", "pw-scada")),
    )
    .await;
    let (ack, _) = until_ack(&mut w, |a| a["id"] == "s1").await;
    assert_eq!(ack["ok"], true, "{ack}");
    result_with_threshold(&mut w, 0.9).await;
    assert!(
        !d.log().contains("id=\"v1\""),
        "the viewer's command never reached the daemon"
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit().await.success());
}
