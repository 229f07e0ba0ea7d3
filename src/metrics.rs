//! The Prometheus endpoint (`[metrics]`): the daemon's counters, histograms and gauges in the
//! OpenMetrics text format at `GET /metrics`, encoded by the official `prometheus-client` crate.
//!
//! Input: events from the inference worker and the trigger stage, as they happen (a frame
//! scored, a region's verdict, an alarm raised, an inference batch's time, a frame's capture →
//! publish latency, a triggered inspection's trigger → result latency), and once a second a
//! [`Snapshot`] of the totals the daemon already keeps for its `stats` report (camera and
//! publisher counters, camera states, thresholds, queue depths): [`Metrics::sync`] turns the
//! totals into counter increments and sets the gauges. Output: the exposition of every metric
//! (listed in `docs/metrics.md`), served over HTTP on the daemon's tokio runtime by [`serve`]:
//! `GET /metrics` (content type [`CONTENT_TYPE`]) and 404 for every other method or path.
//!
//! Cardinality: labels are only `camera`, `region`, `cause` and `verdict`, whose values come
//! from the config (camera and region names) or small fixed sets; never a frame number, a
//! `meas_id` or a part id. A camera or region removed by a reload leaves the gauges at the next
//! sync; its counters stay (cumulative) until the daemon restarts.
//!
//! Counter rule: a source total that goes down (a camera restarted by a reload counts its
//! frames from 0 again) is a reset of the source, never a decrease of the exported counter: the
//! increment is the new total.
//!
//! Failure modes: a port that cannot be bound is a start-up error of the daemon (naming
//! `metrics.listen`); an encoding failure (none is expected: the output is a `String`) answers
//! 500 and is logged. Nothing here blocks the worker beyond a short lock per update.

pub mod config;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tracing::{info, warn};

pub use config::MetricsConfig;

/// The content type of the exposition (OpenMetrics 1.0 text, as `prometheus-client` encodes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The prefix of every metric name.
pub const PREFIX: &str = "anomalyclip";

/// The `region` label of a camera's implicit whole-frame region (as in the `stats` report; a
/// configured region name cannot contain parentheses).
pub const FRAME_REGION: &str = "(frame)";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("encoding the metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CameraLabels {
    camera: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegionLabels {
    camera: String,
    region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    camera: String,
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    camera: String,
    region: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Latency buckets in seconds: 1 ms to about 16 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// The values of the `verdict` label (as `decision::Verdict::as_str` spells them).
const VERDICTS: &[&str] = &["OK", "UNKNOWN", "NG"];

/// The causes of `frames_dropped_total`.
pub mod cause {
    /// A newer frame overwrote one the worker had not taken yet (inference slower than the
    /// camera).
    pub const OVERLOAD: &str = "overload";
    /// Skipped by the camera's `max_fps` cap.
    pub const RATE_CAP: &str = "rate_cap";
    /// Decoded before the first keyframe of a connection or flagged corrupt by the decoder.
    pub const CORRUPT: &str = "corrupt";
    /// Its inference failed (engine error or non-finite outputs).
    pub const INFERENCE_ERROR: &str = "inference_error";
}

/// One camera's totals and state, as the daemon keeps them (a [`Snapshot`] part).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CameraSnapshot {
    pub name: String,
    /// The running camera instance (a reload that restarts the camera makes a new one, whose
    /// counters start at 0).
    pub instance: usize,
    /// Online (frames arrive) or not.
    pub up: bool,
    /// Samples pulled from the camera (captured).
    pub frames_in: u64,
    /// Frames overwritten before the worker took them.
    pub dropped_overload: u64,
    /// Samples skipped by the `max_fps` cap.
    pub skipped_rate: u64,
    /// Frames discarded as corrupt / before the first keyframe.
    pub skipped_corrupt: u64,
    /// Frames whose inference failed (kept across camera restarts).
    pub inference_errors: u64,
    /// Each region (its `region` label) and its NG threshold (T2), `None` when it has none.
    pub thresholds: Vec<(String, Option<f32>)>,
}

/// The publisher's state (a [`Snapshot`] part).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokerSnapshot {
    pub connected: bool,
    /// Successful connections after the first one (a process total).
    pub reconnects: u64,
    /// Alarms waiting in the disk queue.
    pub queued_alarms: u64,
    /// Inspection results waiting in the disk queue.
    pub queued_inspections: u64,
}

/// What [`Metrics::sync`] reads once a second.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub cameras: Vec<CameraSnapshot>,
    pub broker: BrokerSnapshot,
}

/// The totals seen at the last sync, to turn totals into increments.
#[derive(Debug, Default)]
struct Seen {
    cameras: HashMap<String, CameraSnapshot>,
    reconnects: u64,
    thresholds: HashSet<RegionLabels>,
    up: HashSet<CameraLabels>,
}

/// The increment of a counter whose source total went from `last` to `now` (a total that went
/// down was reset: everything it counts now is new).
fn increment(last: u64, now: u64) -> u64 {
    if now >= last { now - last } else { now }
}

/// Every metric of the daemon and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    frames_captured: Family<CameraLabels, Counter>,
    frames_scored: Family<CameraLabels, Counter>,
    frames_dropped: Family<DropLabels, Counter>,
    verdicts: Family<VerdictLabels, Counter>,
    alarms_raised: Family<RegionLabels, Counter>,
    broker_reconnects: Counter,
    inference: Histogram,
    capture_to_publish: Histograms<CameraLabels>,
    trigger_to_result: Histograms<CameraLabels>,
    threshold: Family<RegionLabels, FloatGauge>,
    camera_up: Family<CameraLabels, Gauge>,
    broker_connected: Gauge,
    alarm_queue: Gauge,
    inspection_queue: Gauge,
    seen: Mutex<Seen>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered, at zero; `build_info` carries the crate's version.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let m = Self {
            registry: Registry::default(),
            frames_captured: Family::default(),
            frames_scored: Family::default(),
            frames_dropped: Family::default(),
            verdicts: Family::default(),
            alarms_raised: Family::default(),
            broker_reconnects: Counter::default(),
            inference: seconds_histogram(),
            capture_to_publish: Family::new_with_constructor(seconds_histogram),
            trigger_to_result: Family::new_with_constructor(seconds_histogram),
            threshold: Family::default(),
            camera_up: Family::default(),
            broker_connected: Gauge::default(),
            alarm_queue: Gauge::default(),
            inspection_queue: Gauge::default(),
            seen: Mutex::new(Seen::default()),
        };
        registry.register(
            "build",
            "The daemon's version",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            }),
        );
        registry.register(
            "frames_captured",
            "Frames pulled from the camera (before the max_fps cap)",
            m.frames_captured.clone(),
        );
        registry.register(
            "frames_scored",
            "Frames scored by the model (at least one region)",
            m.frames_scored.clone(),
        );
        registry.register(
            "frames_dropped",
            "Frames not scored, by cause: overload, rate_cap, corrupt, inference_error",
            m.frames_dropped.clone(),
        );
        registry.register(
            "verdicts",
            "Region decisions by verdict (OK, UNKNOWN, NG)",
            m.verdicts.clone(),
        );
        registry.register(
            "alarms_raised",
            "Alarm transitions to active (after debouncing)",
            m.alarms_raised.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Successful MQTT connections after the first one",
            m.broker_reconnects.clone(),
        );
        registry.register_with_unit(
            "inference",
            "Time of one inference batch (encoder and head)",
            Unit::Seconds,
            m.inference.clone(),
        );
        registry.register_with_unit(
            "capture_to_publish",
            "Latency from a frame's capture to its result being handed to the publisher",
            Unit::Seconds,
            m.capture_to_publish.clone(),
        );
        registry.register_with_unit(
            "trigger_to_result",
            "Latency from a trigger request's arrival to its scored inspection result",
            Unit::Seconds,
            m.trigger_to_result.clone(),
        );
        registry.register(
            "threshold",
            "A region's NG threshold (T2) now in use",
            m.threshold.clone(),
        );
        registry.register(
            "camera_up",
            "1 while the camera is online (frames arrive), else 0",
            m.camera_up.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while the MQTT broker connection is up, else 0",
            m.broker_connected.clone(),
        );
        registry.register(
            "alarm_queue_depth",
            "Alarms waiting in the disk queue (sent but unacknowledged included)",
            m.alarm_queue.clone(),
        );
        registry.register(
            "inspection_queue_depth",
            "Inspection results waiting in the disk queue (sent but unacknowledged included)",
            m.inspection_queue.clone(),
        );
        Self { registry, ..m }
    }

    /// A frame of `camera` was scored.
    pub fn frame_scored(&self, camera: &str) {
        self.frames_scored
            .get_or_create(&CameraLabels {
                camera: camera.to_owned(),
            })
            .inc();
    }

    /// A region of `camera` was decided (`region`: `None` for the whole frame).
    pub fn verdict(&self, camera: &str, region: Option<&str>, verdict: &str) {
        self.verdicts
            .get_or_create(&VerdictLabels {
                camera: camera.to_owned(),
                region: region.unwrap_or(FRAME_REGION).to_owned(),
                verdict: verdict.to_owned(),
            })
            .inc();
    }

    /// A region's alarm became active.
    pub fn alarm_raised(&self, camera: &str, region: Option<&str>) {
        self.alarms_raised
            .get_or_create(&RegionLabels {
                camera: camera.to_owned(),
                region: region.unwrap_or(FRAME_REGION).to_owned(),
            })
            .inc();
    }

    /// One inference batch took `d`.
    pub fn observe_inference(&self, d: Duration) {
        self.inference.observe(d.as_secs_f64());
    }

    /// A frame of `camera` reached the publisher `d` after its capture.
    pub fn observe_capture_to_publish(&self, camera: &str, d: Duration) {
        self.capture_to_publish
            .get_or_create(&CameraLabels {
                camera: camera.to_owned(),
            })
            .observe(d.as_secs_f64());
    }

    /// A triggered inspection of `camera` was answered with a scored result `d` after the
    /// request arrived.
    pub fn observe_trigger_to_result(&self, camera: &str, d: Duration) {
        self.trigger_to_result
            .get_or_create(&CameraLabels {
                camera: camera.to_owned(),
            })
            .observe(d.as_secs_f64());
    }

    /// Moves the counters by what the totals grew since the last sync and sets the gauges.
    pub fn sync(&self, s: &Snapshot) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let mut thresholds = HashSet::new();
        let mut up = HashSet::new();
        for c in &s.cameras {
            let fresh = CameraSnapshot {
                name: c.name.clone(),
                instance: c.instance,
                ..Default::default()
            };
            let last = seen.cameras.entry(c.name.clone()).or_insert(fresh);
            // A new camera instance counts its frames from 0 (the inference errors are the
            // camera's, kept across instances).
            if last.instance != c.instance {
                *last = CameraSnapshot {
                    instance: c.instance,
                    inference_errors: last.inference_errors,
                    ..Default::default()
                };
            }
            let camera = CameraLabels {
                camera: c.name.clone(),
            };
            self.frames_captured
                .get_or_create(&camera)
                .inc_by(increment(last.frames_in, c.frames_in));
            for (cause, was, now) in [
                (cause::OVERLOAD, last.dropped_overload, c.dropped_overload),
                (cause::RATE_CAP, last.skipped_rate, c.skipped_rate),
                (cause::CORRUPT, last.skipped_corrupt, c.skipped_corrupt),
                (
                    cause::INFERENCE_ERROR,
                    last.inference_errors,
                    c.inference_errors,
                ),
            ] {
                self.frames_dropped
                    .get_or_create(&DropLabels {
                        camera: c.name.clone(),
                        cause: cause.to_owned(),
                    })
                    .inc_by(increment(was, now));
            }
            self.camera_up.get_or_create(&camera).set(i64::from(c.up));
            // Series known from the config exist at 0 before their first event (a query's
            // `rate()` then sees the first alarm, and the families are always declared).
            drop(self.frames_scored.get_or_create(&camera));
            drop(self.trigger_to_result.get_or_create(&camera));
            up.insert(camera);
            for (region, t) in &c.thresholds {
                let labels = RegionLabels {
                    camera: c.name.clone(),
                    region: region.clone(),
                };
                drop(self.alarms_raised.get_or_create(&labels));
                for verdict in VERDICTS {
                    drop(self.verdicts.get_or_create(&VerdictLabels {
                        camera: c.name.clone(),
                        region: region.clone(),
                        verdict: (*verdict).to_owned(),
                    }));
                }
                match t {
                    Some(t) => {
                        self.threshold.get_or_create(&labels).set(f64::from(*t));
                        thresholds.insert(labels);
                    }
                    None => {
                        self.threshold.remove(&labels);
                    }
                }
            }
            seen.cameras.insert(c.name.clone(), c.clone());
        }
        // Cameras and regions gone (a reload): their gauges go; their counters stay.
        for gone in seen.thresholds.difference(&thresholds) {
            self.threshold.remove(gone);
        }
        for gone in seen.up.difference(&up) {
            self.camera_up.remove(gone);
        }
        seen.cameras
            .retain(|name, _| s.cameras.iter().any(|c| &c.name == name));
        seen.thresholds = thresholds;
        seen.up = up;

        let b = &s.broker;
        self.broker_reconnects
            .inc_by(increment(seen.reconnects, b.reconnects));
        seen.reconnects = b.reconnects;
        self.broker_connected.set(i64::from(b.connected));
        self.alarm_queue
            .set(i64::try_from(b.queued_alarms).unwrap_or(i64::MAX));
        self.inspection_queue
            .set(i64::try_from(b.queued_inspections).unwrap_or(i64::MAX));
    }

    /// The exposition of every metric (OpenMetrics text, ending with `# EOF`).
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            warn!(error = %e, "metrics scrape failed");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

async fn not_found() -> StatusCode {
    StatusCode::NOT_FOUND
}

/// The router: `GET /metrics` (and the HEAD axum derives from it), 404 for everything else.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape).fallback(not_found))
        .fallback(not_found)
        .with_state(metrics)
}

/// Binds `listen` (an error when the port is taken) and serves [`router`] until `shutdown` is
/// cancelled. Returns the bound address (`listen` with port 0 gets a free one).
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        warn!(
            listen = %local,
            "metrics endpoint listens beyond this machine (the metrics carry no secrets; \
             restrict access with a firewall if needed)"
        );
    }
    info!(url = %format!("http://{local}/metrics"), "metrics listening");
    let app = router(metrics);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
        {
            warn!(error = %e, "metrics server ended");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn camera(name: &str, instance: usize, frames_in: u64) -> CameraSnapshot {
        CameraSnapshot {
            name: name.into(),
            instance,
            up: true,
            frames_in,
            thresholds: vec![(FRAME_REGION.into(), Some(0.5))],
            ..Default::default()
        }
    }

    fn sample(text: &str, line_start: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
    }

    #[test]
    fn totals_become_increments_and_a_reset_source_never_decreases_the_counter() {
        let m = Metrics::new();
        let snap = |cams: Vec<CameraSnapshot>| Snapshot {
            cameras: cams,
            broker: BrokerSnapshot::default(),
        };
        m.sync(&snap(vec![camera("a", 0, 10)]));
        m.sync(&snap(vec![camera("a", 0, 25)]));
        let key = "anomalyclip_frames_captured_total{camera=\"a\"}";
        assert_eq!(sample(&m.encode().unwrap(), key), Some(25.0));
        // The camera was restarted (new instance): its 5 frames are new.
        m.sync(&snap(vec![camera("a", 1, 5)]));
        assert_eq!(sample(&m.encode().unwrap(), key), Some(30.0));
        // Same instance, total went down (should not happen): still counted as a reset.
        m.sync(&snap(vec![camera("a", 1, 2)]));
        assert_eq!(sample(&m.encode().unwrap(), key), Some(32.0));
    }

    #[test]
    fn removed_cameras_lose_their_gauges_and_keep_their_counters() {
        let m = Metrics::new();
        m.sync(&Snapshot {
            cameras: vec![camera("a", 0, 3), camera("b", 0, 4)],
            broker: BrokerSnapshot {
                connected: true,
                reconnects: 2,
                queued_alarms: 7,
                queued_inspections: 1,
            },
        });
        let text = m.encode().unwrap();
        assert!(
            text.contains("anomalyclip_camera_up{camera=\"b\"} 1"),
            "{text}"
        );
        // Known series exist at 0 before their first event.
        for series in [
            "anomalyclip_alarms_raised_total{camera=\"b\",region=\"(frame)\"} 0",
            "anomalyclip_verdicts_total{camera=\"b\",region=\"(frame)\",verdict=\"NG\"} 0",
            "anomalyclip_frames_scored_total{camera=\"b\"} 0",
            "anomalyclip_trigger_to_result_seconds_count{camera=\"b\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing: {text}");
        }
        assert!(
            text.contains("anomalyclip_threshold{camera=\"b\",region=\"(frame)\"} 0.5"),
            "{text}"
        );
        assert_eq!(sample(&text, "anomalyclip_alarm_queue_depth "), Some(7.0));
        assert_eq!(
            sample(&text, "anomalyclip_broker_reconnects_total "),
            Some(2.0)
        );
        m.sync(&Snapshot {
            cameras: vec![camera("a", 0, 3)],
            broker: BrokerSnapshot::default(),
        });
        let text = m.encode().unwrap();
        assert!(!text.contains("camera_up{camera=\"b\"}"), "{text}");
        assert!(!text.contains("threshold{camera=\"b\""), "{text}");
        assert!(
            text.contains("anomalyclip_frames_captured_total{camera=\"b\"} 4"),
            "{text}"
        );
        assert_eq!(sample(&text, "anomalyclip_broker_connected "), Some(0.0));
    }

    #[test]
    fn the_exposition_is_openmetrics_with_build_info_and_an_eof() {
        let m = Metrics::new();
        m.verdict("a", Some("left"), "NG");
        m.observe_inference(Duration::from_millis(3));
        let text = m.encode().unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(
                "anomalyclip_build_info{{version=\"{version}\"}} 1"
            )),
            "{text}"
        );
        assert!(
            text.contains(
                "anomalyclip_verdicts_total{camera=\"a\",region=\"left\",verdict=\"NG\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE anomalyclip_inference_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("anomalyclip_inference_seconds_count 1"),
            "{text}"
        );
    }
}
