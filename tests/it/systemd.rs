//! The daemon under a fake systemd: a Unix datagram socket bound by the test stands in for
//! systemd's notify socket (`NOTIFY_SOCKET`), with `WATCHDOG_USEC` = 1 s (and `WATCHDOG_PID`
//! unset, as `sd_notify::watchdog_enabled` requires it to be our own PID when set).
//!
//! Shown: `READY=1` after start-up; `WATCHDOG=1` while frames flow; pings withheld while the
//! inference worker is stalled (test hook: `ANOMALYCLIP_TEST_STALL_FILE`) and resumed after;
//! SIGHUP reload (`RELOADING=1` + `MONOTONIC_USEC`, then `READY=1`) applied without an MQTT
//! reconnect; a broken config rejected with the old one kept; SIGTERM → `STOPPING=1`,
//! `stopped` retained, exit 0.

use crate::common;

use std::time::{Duration, Instant};

use anomalyclip_edge::daemon::STALL_FILE_ENV;
use common::broker::{Broker, Msg, Watcher};
use common::daemon::{Daemon, config, sim_camera};

const WATCHDOG: Duration = Duration::from_secs(1);
/// Scheduling slack on a loaded 2-core machine, on top of the watchdog interval.
const SLACK: Duration = Duration::from_secs(1);

/// Receives results until `n` of them satisfy `pred`; returns those.
async fn results(
    plc: &mut Watcher,
    topic: &str,
    n: usize,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let mut got = Vec::new();
    plc.until(|m| {
        if m.topic == topic {
            let v = m.json();
            if pred(&v) {
                got.push(v);
            }
        }
        got.len() >= n
    })
    .await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_watchdog_stall_reload_and_stop() {
    let broker = Broker::start(None).await;
    let mut plc = Watcher::start(broker.port, "anomalyclip/sd/#").await;
    let mut node = Watcher::start(broker.port, "anomalyclip/sd/status").await;
    let hook = tempfile::tempdir().expect("tempdir");
    let stall = hook.path().join("stall");
    let cfg = |threshold: f32| config("sd", broker.port, &sim_camera("sim", threshold));
    let mut d = Daemon::start_with_env(
        &cfg(0.25),
        &[
            ("WATCHDOG_USEC", "1000000"),
            (STALL_FILE_ENV, stall.to_str().expect("utf-8 path")),
        ],
    );

    // READY=1 first, once the model is loaded (and the camera threads started, signals
    // handled: the SIGHUPs below would kill a daemon that is not ready for them).
    d.wait_ready().await;
    let notes = d.notify.notes();
    assert!(notes[0].has("READY=1"), "{notes:?}");
    assert!(
        notes[0].lines.iter().any(|l| l.starts_with("STATUS=")),
        "{notes:?}"
    );
    let loaded = d
        .log_time("inference engine ready")
        .expect("model loaded before READY=1");
    assert!(
        notes[0].wall >= loaded,
        "READY=1 before the model was loaded"
    );
    let running = d.wait_log(&["anomalyclip-edge running"], 1).await;
    assert!(running[0].contains("watchdog=Some(1s)"), "{running:?}");

    // Frames flow: WATCHDOG=1 pings, with a status line.
    let result_topic = "anomalyclip/sd/sim/result";
    results(&mut plc, result_topic, 3, |v| v["threshold"] == 0.25).await;
    let n = d.notify.with("WATCHDOG=1").len();
    d.notify.wait_for("WATCHDOG=1", n + 3).await;
    assert!(
        d.notify.with("WATCHDOG=1").iter().any(|p| p
            .lines
            .iter()
            .any(|l| l.starts_with("STATUS=cameras online 1/1; broker connected"))),
        "{:?}",
        d.notify.with("WATCHDOG=1")
    );

    // The inference worker stalls: pings stop within the interval, and stay stopped.
    std::fs::write(&stall, b"").expect("create the stall file");
    let stalled_at = Instant::now();
    d.wait_log(&["withholding WATCHDOG=1"], 3).await;
    let pings = d.notify.with("WATCHDOG=1");
    let last = pings.last().expect("pings").at;
    assert!(
        last.saturating_duration_since(stalled_at) <= WATCHDOG + SLACK,
        "a ping {:?} after the stall began",
        last - stalled_at
    );
    assert!(
        last.elapsed() >= WATCHDOG,
        "systemd would not have fired: last ping {:?} ago",
        last.elapsed()
    );
    // Removed: pings resume, results too.
    std::fs::remove_file(&stall).expect("remove the stall file");
    d.notify.wait_for("WATCHDOG=1", pings.len() + 2).await;
    plc.drain();
    results(&mut plc, result_topic, 2, |_| true).await;

    // SIGHUP with a new threshold: RELOADING=1 (with MONOTONIC_USEC), then READY=1; applied.
    d.write_config(&cfg(0.75));
    d.signal(libc::SIGHUP);
    let reloading = d.notify.wait_for("RELOADING=1", 1).await;
    assert!(
        reloading
            .lines
            .iter()
            .any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading:?}"
    );
    let ready = d.notify.wait_for("READY=1", 2).await;
    assert!(ready.at >= reloading.at);
    results(&mut plc, result_topic, 3, |v| v["threshold"] == 0.75).await;

    // SIGHUP with a broken file (and a changed threshold): rejected, the old config stays.
    let broken = format!("bogus_key = 1\n{}", cfg(0.1));
    d.write_config(&broken);
    d.signal(libc::SIGHUP);
    d.notify.wait_for("RELOADING=1", 2).await;
    d.notify.wait_for("READY=1", 3).await;
    let rejected = d.wait_log(&["reload rejected"], 2).await;
    assert!(
        rejected
            .iter()
            .any(|l| l.contains("config.toml:1: bogus_key: unknown field")),
        "{rejected:?}"
    );
    plc.drain();
    let after = results(&mut plc, result_topic, 5, |_| true).await;
    assert!(after.iter().all(|v| v["threshold"] == 0.75), "{after:?}");
    d.assert_running();

    // No MQTT reconnect through the stall and the reloads.
    assert_eq!(
        broker.connections_of("anomalyclip-sd"),
        1,
        "{}",
        broker.log()
    );
    let s = plc
        .until(|m| m.topic == "anomalyclip/sd/stats")
        .await
        .json();
    assert_eq!(s["mqtt"]["reconnects"], 0, "{s}");

    // SIGTERM: STOPPING=1, `stopped` retained, exit 0.
    d.signal(libc::SIGTERM);
    d.notify.wait_for("STOPPING=1", 1).await;
    assert_eq!(d.wait_exit().await.code(), Some(0), "{}", d.log());
    let mut seen: Vec<Msg> = Vec::new();
    node.until(|m| {
        seen.push(m.clone());
        m.text() == "stopped"
    })
    .await;
    let texts: Vec<String> = seen.iter().map(Msg::text).collect();
    assert_eq!(texts, ["online", "stopped"], "one connection, one `online`");
    let mut late = Watcher::start(broker.port, "anomalyclip/sd/status").await;
    let m = late.next_on("anomalyclip/sd/status").await;
    assert_eq!((m.text().as_str(), m.retain), ("stopped", true));
}
