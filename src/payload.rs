//! MQTT payloads: the versioned, PLC-sized wire contract.
//!
//! Input: plain values from the pipeline ([`FrameResult`], [`Alarm`], [`CameraStatus`],
//! [`Stats`], mask pixels rendered by [`crate::head::render_mask`]).
//! Output: the bytes published on each topic:
//! - `result`: flat JSON, one level, numbers/booleans/short strings, always ≤ [`MAX_RESULT_BYTES`]
//!   (string fields are sanitised to printable ASCII and cut to [`MAX_STRING_BYTES`]; numbers are
//!   rounded; a non-finite number becomes `-1`), keys `v camera seq ts_ms score anomaly threshold
//!   map_max area latency_ms model`.
//! - `alarm`: flat JSON `v camera active seq ts_ms score replayed`.
//! - camera `status`: `online`, `reconnecting`, `offline` or `error: <reason>` (reason ≤ 200 bytes).
//! - `mask`: an 8-bit grayscale PNG with `tEXt` chunks `camera`, `seq`, `ts_ms`.
//! - `stats`: JSON (nested; not meant for PLCs).
//!
//! `v` is the payload schema version, [`SCHEMA_VERSION`]. Failure modes: only PNG encoding can
//! fail ([`PayloadError`]); JSON encoding of these types can not fail.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

mod inspection;
pub use inspection::{Inspection, InspectionVerdict, MAX_INSPECTION_BYTES};

/// Payload schema version, the `v` field of every JSON payload.
pub const SCHEMA_VERSION: u32 = 1;
/// Upper bound of a `result` payload (CODESYS JSON and MQTT client limits, with margin).
pub const MAX_RESULT_BYTES: usize = 512;
/// Upper bound of any string field in `result`/`alarm` payloads after sanitising.
pub const MAX_STRING_BYTES: usize = 64;
/// Upper bound of the reason in `error: <reason>` camera statuses.
pub const MAX_REASON_BYTES: usize = 200;

/// Longest accepted node id / camera name (a topic level; also a PLC string).
pub const MAX_NAME_LEN: usize = 64;

/// Whether `s` is a valid node id / camera name: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Errors building a payload.
#[derive(Debug, Error)]
pub enum PayloadError {
    #[error("mask has {got} pixels, expected {width}x{height}")]
    MaskSize { width: u32, height: u32, got: usize },
    #[error("png encoding failed: {0}")]
    Png(#[from] png::EncodingError),
}

/// Keeps printable ASCII except `"` and `\` (replaced by `_`, like any other byte), cut to `max`
/// bytes. PLC JSON parsers (CODESYS, TwinCAT) handle short ASCII strings best, and a sanitised
/// string needs no JSON escaping, so its encoded size is its length plus the quotes.
pub fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect()
}

/// Rounds to 4 decimals; a non-finite value becomes -1 (documented sentinel: "invalid").
fn r4(x: f32) -> f64 {
    if x.is_finite() {
        (f64::from(x) * 1e4).round() / 1e4
    } else {
        -1.0
    }
}

/// Rounds to 1 decimal; a non-finite value becomes -1.
fn r1(x: f32) -> f64 {
    if x.is_finite() {
        (f64::from(x) * 10.0).round() / 10.0
    } else {
        -1.0
    }
}

/// One scored frame, as the pipeline knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameResult {
    /// Camera name (the topic level).
    pub camera: String,
    /// Frame sequence number of this camera, increasing from 0 at daemon start.
    pub seq: u64,
    /// Capture time, Unix epoch milliseconds.
    pub ts_ms: u64,
    /// Image-level anomaly score in [0, 1].
    pub score: f32,
    /// `score >= threshold` for this frame (not debounced; see the `alarm` topic for that).
    pub anomaly: bool,
    /// Score threshold in use.
    pub threshold: f32,
    /// Maximum of the pixel anomaly map.
    pub map_max: f32,
    /// Fraction of map pixels at or above the pixel threshold, in [0, 1].
    pub area: f32,
    /// Capture → publish latency in milliseconds.
    pub latency_ms: f32,
    /// Model name (from the package manifest).
    pub model: String,
    /// The region's name; `None` for a camera's implicit whole-frame region.
    pub region: Option<String>,
    /// `OK`, `UNKNOWN` or `NG` (the region's decision on this frame).
    pub verdict: &'static str,
    /// `sigmoid(logit(value) − logit(T2))`: 0.5 at the NG threshold; NaN (sent as -1) when the
    /// region has no valid threshold.
    pub score_norm: f32,
    /// The calibration id, `manual` (hand-set thresholds) or empty (uncalibrated).
    pub cal: String,
}

#[derive(Serialize)]
struct ResultWire {
    v: u32,
    camera: String,
    seq: u64,
    ts_ms: u64,
    score: f64,
    anomaly: bool,
    threshold: f64,
    map_max: f64,
    area: f64,
    latency_ms: f64,
    model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    verdict: &'static str,
    score_norm: f64,
    cal: String,
}

/// Longest model name in a `result` (the manifest allows 64; the rest of the payload needs
/// the room).
const MAX_RESULT_MODEL_BYTES: usize = 32;
/// Longest calibration id in a `result`.
const MAX_CAL_BYTES: usize = 16;
/// Latencies are capped at this many milliseconds on the wire (about 11.6 days).
const MAX_LATENCY_MS: f32 = 1e9;

impl FrameResult {
    /// The `result` payload: flat JSON, guaranteed ≤ [`MAX_RESULT_BYTES`].
    ///
    /// Worst case: ~160 bytes of keys and punctuation, two strings of 64 (camera, region), the
    /// model cut to 32, the calibration id to 16, two u64 of 20 digits, six numbers of ≤ 24
    /// characters, `false`, `UNKNOWN`: ≈ 500 bytes (checked by a test).
    pub fn to_json(&self) -> Vec<u8> {
        let wire = ResultWire {
            v: SCHEMA_VERSION,
            camera: sanitize(&self.camera, MAX_STRING_BYTES),
            seq: self.seq,
            ts_ms: self.ts_ms,
            score: r4(self.score),
            anomaly: self.anomaly,
            threshold: r4(self.threshold),
            map_max: r4(self.map_max),
            area: r4(self.area),
            latency_ms: r1(self.latency_ms.min(MAX_LATENCY_MS)),
            model: sanitize(&self.model, MAX_RESULT_MODEL_BYTES),
            region: self
                .region
                .as_deref()
                .map(|r| sanitize(r, MAX_STRING_BYTES)),
            verdict: self.verdict,
            score_norm: r4(self.score_norm),
            cal: sanitize(&self.cal, MAX_CAL_BYTES),
        };
        // Serialising a struct of plain fields into a Vec can not fail.
        serde_json::to_vec(&wire).unwrap_or_default()
    }
}

/// One debounced alarm transition. Also the record stored in the on-disk alarm queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alarm {
    /// Camera name (the topic level).
    pub camera: String,
    /// Alarm state after the transition.
    pub active: bool,
    /// Sequence number of the frame that caused the transition.
    pub seq: u64,
    /// Capture time of that frame, Unix epoch milliseconds.
    pub ts_ms: u64,
    /// Score of that frame.
    pub score: f32,
    /// The region; `None` for the camera's implicit whole-frame region (and in records queued
    /// before regions existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

#[derive(Serialize)]
struct AlarmWire {
    v: u32,
    camera: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    active: bool,
    seq: u64,
    ts_ms: u64,
    score: f64,
    replayed: bool,
}

impl Alarm {
    /// The topic levels of the alarm's region under the prefix: `camera` or `camera/region`.
    pub fn unit(&self) -> String {
        match &self.region {
            Some(r) => format!("{}/{r}", self.camera),
            None => self.camera.clone(),
        }
    }

    /// The `alarm` payload. `replayed` is true when the message is sent late: it was queued while
    /// the broker was unreachable or had not acknowledged it, or was restored from the disk queue.
    pub fn to_json(&self, replayed: bool) -> Vec<u8> {
        let wire = AlarmWire {
            v: SCHEMA_VERSION,
            camera: sanitize(&self.camera, MAX_STRING_BYTES),
            region: self
                .region
                .as_deref()
                .map(|r| sanitize(r, MAX_STRING_BYTES)),
            active: self.active,
            seq: self.seq,
            ts_ms: self.ts_ms,
            score: r4(self.score),
            replayed,
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }
}

/// Health of one camera, published retained on `<prefix>/<camera>/status`: the one wire status
/// type (the camera stage's internal [`crate::camera::CameraState`] maps to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CameraStatus {
    /// Frames are arriving (published before the first result of each connection).
    Online,
    /// The source failed or has not delivered its first good frame yet; the daemon keeps
    /// retrying (with the camera's `[camera.retry]` backoff), however long it takes.
    Reconnecting,
    /// The daemon has stopped trying: it is stopping, or a reload removed the camera (then the
    /// retained topics are cleared right after). Never published while it retries.
    Offline,
    /// Switched off by a command (`disable_camera`): not captured, not scored, until
    /// `enable_camera` or `clear_overrides`. Its retained alarm and results stay as they were.
    Disabled,
    /// A fault that needs a human, with a one-line reason: a configuration fault (not retried
    /// until a reload changes the camera) or a missing decoder (retried every `max_ms`).
    Error(String),
}

impl CameraStatus {
    /// The payload text: `online`, `reconnecting`, `offline`, `disabled` or `error: <reason>`.
    pub fn payload(&self) -> String {
        match self {
            CameraStatus::Online => "online".to_owned(),
            CameraStatus::Reconnecting => "reconnecting".to_owned(),
            CameraStatus::Offline => "offline".to_owned(),
            CameraStatus::Disabled => "disabled".to_owned(),
            CameraStatus::Error(reason) => {
                format!("error: {}", sanitize(reason, MAX_REASON_BYTES))
            }
        }
    }
}

/// Per-camera counters for the `stats` topic (filled by the pipeline).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CameraStats {
    /// Frames per second delivered by the source over the last interval (before `max_fps`).
    pub fps_in: f64,
    /// Frames per second scored, of those counted in `fps_in` for the same interval: a frame
    /// counts in the interval it was received in, if it was scored before the report (one still
    /// in flight at the report is not counted). So `fps_scored <= fps_in` always.
    pub fps_scored: f64,
    /// Frames received since start.
    pub frames_in: u64,
    /// Frames scored since start.
    pub scored: u64,
    /// Frames overwritten in the camera's one-frame slot before the inference worker took them
    /// (the worker is slower than the camera), since the camera (re)started.
    pub dropped_overload: u64,
    /// Frames skipped by the camera's `max_fps` cap, since the camera (re)started.
    pub skipped_rate: u64,
    /// Decoded frames discarded because they came before the first keyframe of a connection
    /// or were flagged corrupt by the decoder, since the camera (re)started.
    pub skipped_corrupt: u64,
    /// Frames of this camera in a batch whose inference failed (not scored), since start.
    pub inference_errors: u64,
    /// Reconnection attempts of the camera (each retry after a failure), since it (re)started.
    pub reconnects: u64,
    /// Capture → publish latency, median over the last interval, ms.
    pub latency_p50_ms: f64,
    /// Capture → publish latency, 99th percentile over the last interval, ms.
    pub latency_p99_ms: f64,
    /// Current source status text (as on the camera status topic).
    pub status: String,
    /// Per region (the implicit whole-frame region is `(frame)`).
    pub regions: BTreeMap<String, RegionStats>,
}

/// Per-region counters and decision state for the `stats` topic.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RegionStats {
    /// Verdicts since the camera started: OK, UNKNOWN, NG.
    pub ok: u64,
    pub unknown: u64,
    pub ng: u64,
    /// Frames whose region did not fit the frame (the camera's resolution changed).
    pub crop_errors: u64,
    /// `manual`, `calibrated <id>` or `uncalibrated: <reason>`.
    pub calibration: String,
    /// The recent scores have drifted from the calibration's (population stability index over
    /// the limit); false without a calibration.
    pub drift: bool,
    /// The population stability index of the recent scores against the calibration, when
    /// there are enough of both.
    pub psi: Option<f64>,
}

/// Publisher counters, as written into `stats` (the publisher fills them in).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MqttStats {
    /// Connected to the broker now.
    pub connected: bool,
    /// Messages published (QoS 0: written; QoS 1/2: acknowledged).
    pub published: u64,
    /// Successful connections after the first one.
    pub reconnects: u64,
    /// Results not published (broker unreachable or backpressure).
    pub dropped_results: u64,
    /// Masks not published (broker unreachable, backpressure, too large).
    pub dropped_masks: u64,
    /// Alarms waiting in the disk queue (sent but unacknowledged included).
    pub queued_alarms: u64,
    /// Alarms discarded because the disk queue was full.
    pub dropped_alarms: u64,
    /// Disk queue write failures (alarms then kept in memory only).
    pub queue_errors: u64,
}

/// The `stats` payload.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// Wall clock of this report, Unix epoch milliseconds.
    pub ts_ms: u64,
    /// Inference engine in use (e.g. `tensorrt`, `cuda`, `cpu`).
    pub engine: String,
    /// Per camera, by name.
    pub cameras: BTreeMap<String, CameraStats>,
    /// Publisher counters; overwritten by the publisher when it sends the report.
    pub mqtt: MqttStats,
}

#[derive(Serialize)]
struct StatsWire<'a> {
    v: u32,
    #[serde(flatten)]
    stats: &'a Stats,
}

impl Stats {
    /// The `stats` payload (JSON with a `v` field).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&StatsWire {
            v: SCHEMA_VERSION,
            stats: self,
        })
        .unwrap_or_default()
    }
}

/// What a mask pixel means (`[camera.mask] kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskKind {
    /// 8-bit anomaly map: pixel = round(255 × clamp(map, 0, 1)).
    GrayMap,
    /// 0 or 255: 255 where the map value is at or above the pixel threshold.
    Binary,
    /// 8-bit map anchored to the pixel threshold `t`: 0..=127 for values below `t` (linear from
    /// 0), 128..=255 from `t` to 1, so mid-grey is the threshold on every frame and region
    /// whatever its level (never a per-frame min–max scaling, which makes normal frames glow).
    ThresholdMap,
}

/// Encodes an 8-bit grayscale `width × height` image as PNG with `tEXt` chunks `camera`, `seq`
/// and `ts_ms`, so a subscriber can match the mask to its `result`/`alarm`.
pub fn mask_png(
    camera: &str,
    seq: u64,
    ts_ms: u64,
    width: u32,
    height: u32,
    pixels: &[u8],
) -> Result<Vec<u8>, PayloadError> {
    if pixels.len() as u64 != u64::from(width) * u64::from(height) {
        return Err(PayloadError::MaskSize {
            width,
            height,
            got: pixels.len(),
        });
    }
    let mut buf = Vec::with_capacity(pixels.len() / 4 + 256);
    {
        let mut enc = png::Encoder::new(&mut buf, width, height);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        enc.add_text_chunk("camera".to_owned(), sanitize(camera, MAX_STRING_BYTES))?;
        enc.add_text_chunk("seq".to_owned(), seq.to_string())?;
        enc.add_text_chunk("ts_ms".to_owned(), ts_ms.to_string())?;
        let mut w = enc.write_header()?;
        w.write_image_data(pixels)?;
        w.finish()?;
    }
    Ok(buf)
}

/// Rate limit for masks of one camera (`[camera.mask]`: `only_on_anomaly`, `min_interval_ms`).
#[derive(Debug, Clone)]
pub struct MaskGate {
    only_on_anomaly: bool,
    min_interval: Duration,
    last: Option<Instant>,
}

impl MaskGate {
    /// A gate that lets a mask through when the frame is anomalous (or always, if
    /// `only_on_anomaly` is false) and at least `min_interval` passed since the last one.
    pub fn new(only_on_anomaly: bool, min_interval: Duration) -> Self {
        Self {
            only_on_anomaly,
            min_interval,
            last: None,
        }
    }

    /// Decides for one frame; records the time when it admits.
    pub fn admit(&mut self, anomaly: bool, now: Instant) -> bool {
        if self.only_on_anomaly && !anomaly {
            return false;
        }
        if let Some(last) = self.last
            && now.saturating_duration_since(last) < self.min_interval
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worst_result() -> FrameResult {
        FrameResult {
            camera: "c".repeat(64),
            seq: u64::MAX,
            ts_ms: u64::MAX,
            score: -1.234_567_9e-30,
            anomaly: false,
            threshold: f32::MAX,
            map_max: f32::MIN,
            area: f32::NAN,
            latency_ms: f32::MAX,
            model: "a-very-long-model-name/\"quoted\"\\ünïcødé\u{7}".repeat(20),
            region: Some("r".repeat(64)),
            verdict: "UNKNOWN",
            score_norm: -f32::MAX,
            cal: "x".repeat(100),
        }
    }

    #[test]
    fn result_is_flat_json_within_512_bytes_even_in_the_worst_case() {
        let bytes = worst_result().to_json();
        assert!(bytes.len() <= MAX_RESULT_BYTES, "{} bytes", bytes.len());
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("valid json");
        let obj = v.as_object().expect("object");
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        for k in [
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
            "region",
            "verdict",
            "score_norm",
            "cal",
        ] {
            assert!(keys.contains(&k), "missing {k}");
        }
        assert_eq!(obj.len(), 15);
        for (k, val) in obj {
            assert!(
                !val.is_object() && !val.is_array() && !val.is_null(),
                "{k} not flat"
            );
            if let Some(s) = val.as_str() {
                assert!(s.len() <= MAX_STRING_BYTES && s.is_ascii(), "{k}");
            }
        }
        assert_eq!(obj["v"], 1);
        assert_eq!(obj["area"], -1.0);
    }

    #[test]
    fn result_numbers_are_rounded() {
        let r = FrameResult {
            camera: "cam".into(),
            seq: 7,
            ts_ms: 1_700_000_000_000,
            score: 0.123_456,
            anomaly: false,
            threshold: 0.5,
            map_max: 0.987_66,
            area: 0.01,
            latency_ms: 12.345,
            model: "m".into(),
            region: None,
            verdict: "OK",
            score_norm: 0.2,
            cal: "manual".into(),
        };
        let s = String::from_utf8(r.to_json()).expect("utf8");
        assert!(s.contains("\"score\":0.1235"), "{s}");
        assert!(s.contains("\"latency_ms\":12.3"), "{s}");
        assert!(s.contains("\"map_max\":0.9877"), "{s}");
        assert!(
            !s.contains("region"),
            "the implicit region has no region key: {s}"
        );
        assert!(s.contains("\"verdict\":\"OK\""), "{s}");
    }

    #[test]
    fn alarm_payload_fields() {
        let a = Alarm {
            camera: "press-1".into(),
            active: true,
            seq: 42,
            ts_ms: 1000,
            score: 0.9,
            region: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&a.to_json(true)).expect("json");
        assert_eq!(v["v"], 1);
        assert_eq!(v["camera"], "press-1");
        assert_eq!(v["active"], true);
        assert_eq!(v["seq"], 42);
        assert_eq!(v["ts_ms"], 1000);
        assert_eq!(v["score"], 0.9);
        assert_eq!(v["replayed"], true);
        assert_eq!(v.as_object().map(|o| o.len()), Some(7));
        let r = Alarm {
            region: Some("left".into()),
            ..a
        };
        let v: serde_json::Value = serde_json::from_slice(&r.to_json(false)).expect("json");
        assert_eq!(v["region"], "left");
        assert_eq!(r.unit(), "press-1/left");
    }

    #[test]
    fn camera_status_texts() {
        assert_eq!(CameraStatus::Online.payload(), "online");
        assert_eq!(CameraStatus::Reconnecting.payload(), "reconnecting");
        assert_eq!(CameraStatus::Offline.payload(), "offline");
        let long = CameraStatus::Error("x\ny".repeat(200)).payload();
        assert!(long.starts_with("error: x_y"));
        assert_eq!(long.len(), "error: ".len() + MAX_REASON_BYTES);
    }

    #[test]
    fn mask_png_roundtrip_with_text_chunks() {
        let pixels: Vec<u8> = (0..16 * 8).map(|i| i as u8).collect();
        let png_bytes = mask_png("cam", 5, 123, 16, 8, &pixels).expect("encode");
        let dec = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let mut reader = dec.read_info().expect("header");
        let info = reader.info();
        assert_eq!((info.width, info.height), (16, 8));
        assert_eq!(info.color_type, png::ColorType::Grayscale);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        let texts: BTreeMap<String, String> = info
            .uncompressed_latin1_text
            .iter()
            .map(|t| (t.keyword.clone(), t.text.clone()))
            .collect();
        assert_eq!(texts.get("camera").map(String::as_str), Some("cam"));
        assert_eq!(texts.get("seq").map(String::as_str), Some("5"));
        assert_eq!(texts.get("ts_ms").map(String::as_str), Some("123"));
        let mut out = vec![0; reader.output_buffer_size().unwrap_or(0)];
        reader.next_frame(&mut out).expect("frame");
        assert_eq!(out, pixels);
        assert!(mask_png("cam", 0, 0, 4, 4, &[0; 15]).is_err());
    }

    #[test]
    fn mask_gate_rate_limits() {
        let t0 = Instant::now();
        let mut g = MaskGate::new(true, Duration::from_millis(100));
        assert!(!g.admit(false, t0));
        assert!(g.admit(true, t0));
        assert!(!g.admit(true, t0 + Duration::from_millis(50)));
        assert!(g.admit(true, t0 + Duration::from_millis(100)));
        let mut all = MaskGate::new(false, Duration::ZERO);
        assert!(all.admit(false, t0));
        assert!(all.admit(false, t0));
    }

    #[test]
    fn stats_json_has_version_and_cameras() {
        let mut s = Stats {
            uptime_s: 3,
            engine: "cpu".into(),
            ..Stats::default()
        };
        s.cameras.insert("cam".into(), CameraStats::default());
        let v: serde_json::Value = serde_json::from_slice(&s.to_json()).expect("json");
        assert_eq!(v["v"], 1);
        assert_eq!(v["uptime_s"], 3);
        assert!(v["cameras"]["cam"].is_object());
        assert!(v["mqtt"]["queued_alarms"].is_number());
    }
}
