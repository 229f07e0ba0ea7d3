//! The `inspection` payload: the one answer to a triggered-inspection request
//! (`<prefix>/<camera>/inspect` → `<prefix>/<camera>/inspection`, see `docs/plc.md`).
//!
//! Input: an [`Inspection`] built by the trigger stage (`crate::daemon`'s trigger module).
//! Output: flat JSON, one level, keys `v camera meas_id part_id result_id verdict reason score
//! threshold trigger_ts_ms frame_ts_ms done_ts_ms latency_ms replayed`; keys whose value is
//! absent (`part_id`, `reason`, `score`, `threshold`, `frame_ts_ms`) are left out. Strings are
//! sanitised like every other string of the contract ([`super::sanitize`]); a non-finite number
//! becomes `-1`. Also the record stored in the on-disk inspection queue, so it must round-trip
//! through serde (it does: non-finite scores are stored as `null`).
//!
//! Size: with a 7-character camera, an 8-character meas_id, no part_id and a 15-character
//! result id a scored answer is about 235 bytes (fits a 254-character PLC `STRING`); a
//! 10-character part_id brings it to about 263. Each id character adds one byte, and the
//! largest possible payload (64-byte camera, meas_id, part_id, region and reason) is under
//! [`MAX_INSPECTION_BYTES`].

use serde::{Deserialize, Serialize};

use super::{MAX_STRING_BYTES, SCHEMA_VERSION, r1, r4, sanitize};

/// Upper bound of an `inspection` payload.
pub const MAX_INSPECTION_BYTES: usize = 768;

/// The verdict of one inspection request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum InspectionVerdict {
    /// Scored below the threshold.
    Ok,
    /// Scored at or above the threshold.
    Ng,
    /// Scored, but the score is not usable for a decision (non-finite, or between T1 and T2
    /// once regions with two thresholds exist).
    Unknown,
    /// No frame was scored before the request's deadline.
    Timeout,
    /// The request could not be served (`reason` says why).
    Error,
}

/// One inspection result (also the stored queue record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inspection {
    pub camera: String,
    pub meas_id: String,
    pub part_id: Option<String>,
    /// Unique per result: `<node>-<boot>-<n>`.
    pub result_id: String,
    pub verdict: InspectionVerdict,
    pub reason: Option<String>,
    /// The named region whose verdict is the answer's (the worst); `None` for the implicit
    /// whole-frame region.
    #[serde(default)]
    pub region: Option<String>,
    /// Image score of the inspected frame (`None` without a scored frame; NaN stored as null).
    pub score: Option<f32>,
    pub threshold: Option<f32>,
    /// When the request arrived, Unix ms.
    pub trigger_ts_ms: u64,
    /// Capture time of the inspected frame, Unix ms.
    pub frame_ts_ms: Option<u64>,
    /// When the result was decided, Unix ms.
    pub done_ts_ms: u64,
    /// Request arrival → result decided, milliseconds (monotonic clock).
    pub latency_ms: f32,
}

#[derive(Serialize)]
struct InspectionWire {
    v: u32,
    camera: String,
    meas_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    part_id: Option<String>,
    result_id: String,
    verdict: InspectionVerdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    threshold: Option<f64>,
    trigger_ts_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    frame_ts_ms: Option<u64>,
    done_ts_ms: u64,
    latency_ms: f64,
    replayed: bool,
}

impl Inspection {
    /// The `inspection` payload; `replayed` is true when it is re-sent from the disk queue
    /// after a reconnect or a restart.
    pub fn to_json(&self, replayed: bool) -> Vec<u8> {
        let s = |x: &str| sanitize(x, MAX_STRING_BYTES);
        let wire = InspectionWire {
            v: SCHEMA_VERSION,
            camera: s(&self.camera),
            meas_id: s(&self.meas_id),
            part_id: self.part_id.as_deref().map(s),
            result_id: s(&self.result_id),
            verdict: self.verdict,
            reason: self.reason.as_deref().map(s),
            region: self.region.as_deref().map(s),
            score: self.score.map(r4),
            threshold: self.threshold.map(r4),
            trigger_ts_ms: self.trigger_ts_ms,
            frame_ts_ms: self.frame_ts_ms,
            done_ts_ms: self.done_ts_ms,
            latency_ms: r1(self.latency_ms),
            replayed,
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Inspection {
        Inspection {
            camera: "line1".into(),
            meas_id: "M-00000001".into(),
            part_id: Some("P-00000001".into()),
            result_id: "n1-a1b2c3-17".into(),
            verdict: InspectionVerdict::Ng,
            reason: None,
            region: None,
            score: Some(0.812_345),
            threshold: Some(0.7),
            trigger_ts_ms: 1_765_080_000_000,
            frame_ts_ms: Some(1_765_080_000_012),
            done_ts_ms: 1_765_080_000_040,
            latency_ms: 40.26,
        }
    }

    #[test]
    fn a_typical_inspection_without_part_id_fits_a_plc_string_of_254_bytes() {
        let mut i = sample();
        i.camera = "press-1".into();
        i.meas_id = "M0000001".into();
        i.part_id = None;
        i.result_id = "st1-6935a1c0-17".into();
        let short = i.to_json(false);
        assert!(short.len() <= 254, "{} bytes", short.len());
        // With a 10-character part_id as well it no longer fits (documented in docs/plc.md).
        let j = sample().to_json(false);
        assert_eq!(j.len(), 263, "{}", String::from_utf8_lossy(&j));
        let v: serde_json::Value = serde_json::from_slice(&j).expect("json");
        assert_eq!(v["verdict"], "NG");
        assert_eq!(v["meas_id"], "M-00000001");
        assert!((v["score"].as_f64().expect("score") - 0.8123).abs() < 1e-6);
        assert_eq!(v["replayed"], false);
        assert!(v.get("reason").is_none());
    }

    #[test]
    fn the_largest_inspection_stays_under_the_bound_and_nan_is_minus_one() {
        let long = "x".repeat(500);
        let i = Inspection {
            camera: long.clone(),
            meas_id: long.clone(),
            part_id: Some(long.clone()),
            result_id: long.clone(),
            verdict: InspectionVerdict::Error,
            reason: Some(long.clone()),
            region: Some(long),
            score: Some(f32::NAN),
            threshold: Some(f32::INFINITY),
            trigger_ts_ms: u64::MAX,
            frame_ts_ms: Some(u64::MAX),
            done_ts_ms: u64::MAX,
            latency_ms: f32::MAX,
        };
        let j = i.to_json(true);
        assert!(j.len() <= MAX_INSPECTION_BYTES, "{}", j.len());
        let v: serde_json::Value = serde_json::from_slice(&j).expect("json");
        assert_eq!(v["score"].as_f64(), Some(-1.0));
        assert_eq!(v["verdict"], "ERROR");
    }

    #[test]
    fn a_stored_inspection_round_trips_with_a_nan_score() {
        let mut i = sample();
        i.score = Some(f32::NAN);
        let s = serde_json::to_vec(&i).expect("ser");
        let back: Inspection = serde_json::from_slice(&s).expect("de");
        // serde_json writes NaN as null; read back as None (no score).
        assert_eq!(back.score, None);
        assert_eq!(back.result_id, i.result_id);
    }
}
