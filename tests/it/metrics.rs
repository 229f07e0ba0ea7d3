//! The Prometheus endpoint (`[metrics]`, src/metrics.rs) against the real daemon: a simulated
//! camera, the tiny random-weight model (wiring only: its scores mean nothing), a real
//! mosquitto, plain HTTP over TCP. The exposition is parsed by a parser that is not ours: the
//! official Python client's OpenMetrics parser (`prometheus_client`, pinned in
//! `engines/requirements.txt`, run with `<repo>/.venv/bin/python`, else `ANOMALYCLIP_PYTHON`).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common;
use crate::common::broker::{Broker, free_port};
use crate::common::daemon::{BIN, Daemon, config, sim_camera, tiny_model};
use crate::live::{Resp, listening_sockets, request};

/// The families every scrape has once the first second is over (OpenMetrics names: counters
/// without `_total`), with their types.
const FAMILIES: &[(&str, &str)] = &[
    ("anomalyclip_build", "info"),
    ("anomalyclip_frames_captured", "counter"),
    ("anomalyclip_frames_scored", "counter"),
    ("anomalyclip_frames_dropped", "counter"),
    ("anomalyclip_verdicts", "counter"),
    ("anomalyclip_alarms_raised", "counter"),
    ("anomalyclip_broker_reconnects", "counter"),
    ("anomalyclip_inference_seconds", "histogram"),
    ("anomalyclip_capture_to_publish_seconds", "histogram"),
    ("anomalyclip_trigger_to_result_seconds", "histogram"),
    ("anomalyclip_threshold", "gauge"),
    ("anomalyclip_camera_up", "gauge"),
    ("anomalyclip_broker_connected", "gauge"),
    ("anomalyclip_alarm_queue_depth", "gauge"),
    ("anomalyclip_inspection_queue_depth", "gauge"),
];

/// The only labels a sample may carry (`le`: histogram buckets; `version`: build info).
const LABELS: &[&str] = &["camera", "region", "cause", "verdict", "le", "version"];

/// The exposition as the official Python parser reads it: family name → `{type, unit,
/// samples: [[name, {labels}, value], …]}`. Panics (with the parser's error) if it does not
/// parse.
fn parse_with_python(text: &str) -> BTreeMap<String, Value> {
    const SCRIPT: &str = r#"
import json, math, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    out[fam.name] = {
        "type": fam.type,
        "unit": fam.unit,
        "samples": [[s.name, s.labels, s.value if math.isfinite(s.value) else str(s.value)]
                    for s in fam.samples],
    }
print(json.dumps(out))
"#;
    let mut child = Command::new(common::venv_python())
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write exposition");
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "the official parser rejects the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser script prints JSON")
}

/// The value of the sample `name` whose labels include `labels`, if any.
fn value(fams: &BTreeMap<String, Value>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    fams.values()
        .flat_map(|f| f["samples"].as_array().into_iter().flatten())
        .find(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][*k] == *v))
        .and_then(|s| s[2].as_f64())
}

/// The config with a `[metrics]` table holding `body`, placed before the first `[[camera]]`.
fn metrics_first(config_text: &str, body: &str) -> String {
    let (top, cams) = config_text
        .split_once("[[camera]]")
        .expect("a camera table");
    format!("{top}[metrics]\n{body}\n[[camera]]{cams}")
}

fn scrape(addr: SocketAddr) -> Resp {
    request(addr, "GET", "/metrics", &[], b"")
}

/// Publishes one trigger request (QoS 1) and waits for the broker's PUBACK.
async fn send_inspect(port: u16, topic: &str, payload: &str) {
    common::broker::publish_once(port, topic, payload.as_bytes(), false, None).await;
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listens_when_metrics_is_absent() {
    let broker = Broker::start(None).await;
    let d = Daemon::start(&config("nometrics", broker.port, &sim_camera("sim", 0.5)));
    tokio::task::spawn_blocking(move || {
        assert!(
            common::wait_until(Duration::from_secs(30), || d
                .log()
                .contains("anomalyclip-edge running")),
            "daemon did not start; log:\n{}",
            d.log()
        );
        let listening = listening_sockets(d.pid());
        assert!(
            listening.is_empty(),
            "the daemon listens on {listening:?} without [metrics]"
        );
        assert!(!d.log().contains("metrics listening"), "{}", d.log());
    })
    .await
    .expect("test thread");
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[cfg_attr(
    not(have_python),
    ignore = "needs the reference venv .venv/bin/python: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_the_official_parser_and_counters_move_as_frames_flow() {
    let broker = Broker::start(None).await;
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let text = metrics_first(
        &config("prom", broker.port, &sim_camera("sim", 0.5)),
        &format!("listen = \"{addr}\""),
    );
    let d = Daemon::start(&text);
    let d = tokio::task::spawn_blocking(move || {
        assert!(
            common::wait_until(Duration::from_secs(30), || d
                .log()
                .contains("anomalyclip-edge running")),
            "daemon did not start; log:\n{}",
            d.log()
        );
        // Bound before the daemon reports ready.
        assert!(
            TcpStream::connect(addr).is_ok(),
            "metrics not listening on {addr} once running; log:\n{}",
            d.log()
        );
        assert!(d.log().contains("metrics listening"), "{}", d.log());
        assert!(
            !d.log().contains("metrics endpoint listens beyond"),
            "a loopback bind warned: {}",
            d.log()
        );
        // Wait for a frame counted as scored (the first sync is one second after start).
        assert!(
            common::wait_until(Duration::from_secs(30), || {
                let r = scrape(addr);
                r.status == 200
                    && r.text()
                        .contains("anomalyclip_frames_captured_total{camera=\"sim\"}")
                    && r.text()
                        .contains("anomalyclip_frames_scored_total{camera=\"sim\"}")
            }),
            "no frames counted; last scrape:\n{}\nlog:\n{}",
            scrape(addr).text(),
            d.log()
        );
        d
    })
    .await
    .expect("test thread");

    // A triggered inspection on the continuous camera: one trigger → result latency.
    send_inspect(
        broker.port,
        "anomalyclip/prom/sim/inspect",
        r#"{"meas_id":"m-1"}"#,
    )
    .await;

    tokio::task::spawn_blocking(move || {
        let first = scrape(addr);
        let t_first = Instant::now();
        assert_eq!(first.status, 200, "{}", first.text());
        assert_eq!(
            first.header("content-type").as_deref(),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        let a = parse_with_python(&first.text());
        for (name, kind) in FAMILIES {
            assert!(
                first.text().contains(&format!("# TYPE {name} {kind}\n")),
                "family {name} ({kind}) not declared:\n{}",
                first.text()
            );
            let f = a
                .get(*name)
                .unwrap_or_else(|| panic!("family {name} missing; got {:?}", a.keys()));
            assert_eq!(f["type"], *kind, "{name}: {f}");
        }
        assert_eq!(a["anomalyclip_inference_seconds"]["unit"], "seconds");
        // Low cardinality: no label outside the documented set, on any sample.
        for (name, f) in &a {
            for s in f["samples"].as_array().expect("samples") {
                for k in s[1].as_object().expect("labels").keys() {
                    assert!(
                        LABELS.contains(&k.as_str()),
                        "{name}: label {k:?} is not one of {LABELS:?}: {s}"
                    );
                }
            }
        }
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            value(&a, "anomalyclip_build_info", &[("version", version)]),
            Some(1.0)
        );
        let cam = [("camera", "sim")];
        let frame = [("camera", "sim"), ("region", "(frame)")];
        // Known series exist before their first event.
        assert!(
            value(&a, "anomalyclip_alarms_raised_total", &frame).is_some(),
            "{}",
            first.text()
        );
        assert_eq!(value(&a, "anomalyclip_camera_up", &cam), Some(1.0));
        assert_eq!(value(&a, "anomalyclip_broker_connected", &[]), Some(1.0));
        assert_eq!(
            value(
                &a,
                "anomalyclip_threshold",
                &[("camera", "sim"), ("region", "(frame)")]
            ),
            Some(0.5)
        );
        assert!(
            value(&a, "anomalyclip_inference_seconds_count", &[]).unwrap_or(0.0) >= 1.0,
            "{}",
            first.text()
        );
        assert!(
            value(&a, "anomalyclip_capture_to_publish_seconds_count", &cam).unwrap_or(0.0) >= 1.0,
            "{}",
            first.text()
        );
        let verdicts: f64 = ["OK", "UNKNOWN", "NG"]
            .iter()
            .filter_map(|v| {
                value(
                    &a,
                    "anomalyclip_verdicts_total",
                    &[("camera", "sim"), ("region", "(frame)"), ("verdict", v)],
                )
            })
            .sum();
        assert!(verdicts >= 1.0, "no verdict counted: {}", first.text());
        assert!(
            value(
                &a,
                "anomalyclip_frames_dropped_total",
                &[("camera", "sim"), ("cause", "overload")]
            )
            .is_some(),
            "{}",
            first.text()
        );

        // The trigger's answer arrives within a frame or two.
        assert!(
            common::wait_until(Duration::from_secs(10), || {
                let p = parse_with_python(&scrape(addr).text());
                value(&p, "anomalyclip_trigger_to_result_seconds_count", &cam).unwrap_or(0.0) >= 1.0
            }),
            "no trigger → result latency recorded: {}\nlog:\n{}",
            scrape(addr).text(),
            d.log()
        );

        // A second scrape a second and more later: the frame counters moved (10 fps camera).
        std::thread::sleep(Duration::from_millis(1500).saturating_sub(t_first.elapsed()));
        let b = parse_with_python(&scrape(addr).text());
        for name in [
            "anomalyclip_frames_captured_total",
            "anomalyclip_frames_scored_total",
        ] {
            let (x, y) = (value(&a, name, &cam), value(&b, name, &cam));
            assert!(
                matches!((x, y), (Some(x), Some(y)) if y > x),
                "{name} did not grow between scrapes 1.5 s apart: {x:?} → {y:?}"
            );
        }

        // Nothing else is served.
        for (method, target) in [
            ("GET", "/"),
            ("GET", "/metrics/x"),
            ("GET", "/api/stats"),
            ("POST", "/metrics"),
        ] {
            let r = request(addr, method, target, &[], b"");
            assert_eq!(r.status, 404, "{method} {target}: {}", r.text());
        }
    })
    .await
    .expect("test thread");
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_is_a_start_up_error_naming_metrics_listen() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let text = metrics_first(
        &config("taken", 1, &sim_camera("sim", 0.5)),
        &format!("listen = \"{addr}\""),
    );
    let mut d = Daemon::start(&text);
    let status = d.wait_exit().await;
    assert!(!status.success(), "log:\n{}", d.log());
    assert!(
        d.log().contains(&format!("metrics.listen {addr}")),
        "the error does not name metrics.listen: {}",
        d.log()
    );
    drop(taken);
}

#[test]
fn a_bad_metrics_listen_is_one_check_config_line_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let text = format!(
        "node_id = \"n1\"\nstate_dir = {:?}\n[model]\npackage = {:?}\n[mqtt]\nhost = \"localhost\"\n\
         [metrics]\nlisten = \"localhost:9464\"\n\
         [[camera]]\nname = \"cam\"\nuri = \"/dev/video0\"\n",
        state.display().to_string(),
        tiny_model().display().to_string(),
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &text).expect("write");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("check-config");
    let all =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{all}");
    // One problem line (`file:line: path: message`), then the count.
    let file = path.display().to_string();
    let lines: Vec<&str> = all
        .lines()
        .filter(|l| l.starts_with(&format!("{file}:")))
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "expected one problem line and the count: {all}"
    );
    assert!(lines[1].ends_with(": 1 problem(s)"), "{all}");
    assert!(
        lines[0].ends_with(
            "config.toml:8: metrics.listen: \"localhost:9464\" is not an address \
             (expected IP:port, e.g. \"127.0.0.1:9464\")"
        ),
        "{all}"
    );

    // The same file with a good address (and the default) passes.
    for good in ["listen = \"0.0.0.0:9464\"", ""] {
        let fixed = text.replace("listen = \"localhost:9464\"", good);
        std::fs::write(&path, &fixed).expect("write");
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .output()
            .expect("check-config");
        assert!(
            out.status.success(),
            "{good:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[cfg_attr(
    not(have_ort),
    ignore = "needs the ONNX Runtime library: run scripts/setup"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_bind_is_allowed_with_a_warning() {
    let broker = Broker::start(None).await;
    let port = free_port();
    let text = metrics_first(
        &config("lanmetrics", broker.port, &sim_camera("sim", 0.5)),
        &format!("listen = \"0.0.0.0:{port}\""),
    );
    let d = Daemon::start(&text);
    tokio::task::spawn_blocking(move || {
        assert!(
            common::wait_until(Duration::from_secs(30), || d
                .log()
                .contains("anomalyclip-edge running")),
            "daemon did not start; log:\n{}",
            d.log()
        );
        assert!(
            d.log()
                .contains("metrics endpoint listens beyond this machine"),
            "no warning for 0.0.0.0: {}",
            d.log()
        );
        // Scraped over loopback only (tests send nothing to other addresses).
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let r = scrape(addr);
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().ends_with("# EOF\n"), "{}", r.text());
    })
    .await
    .expect("test thread");
}
