//! The decision of one region on one frame: which statistic of the scored image is compared
//! ([`Statistic`]), against which thresholds ([`Rule`]: hand-set, calibrated, or none valid),
//! and the verdict ([`Verdict`]: OK / UNKNOWN / NG) with its HMI-friendly `score_norm` (a leaf).
//!
//! Input: the image score, the anomaly map's maximum outside the ignore polygons, and the rule
//! the daemon resolved for the region (from the config or a calibration whose fingerprint
//! matched). Output: [`Decision`]. There are no failure modes here: a region whose calibration
//! is missing or does not match is [`Rule::Uncalibrated`] and its every frame is `UNKNOWN` —
//! never a silent fallback to another threshold.
//!
//! Thresholds: a value at or above T2 is NG; at or above T1 (when set, T1 ≤ T2) UNKNOWN;
//! otherwise OK. `score_norm = sigmoid(logit(v) − logit(T2))`: 0.5 at T2, monotone, in (0, 1)
//! (values are clamped to [1e-6, 1 − 1e-6] before the logit), so an HMI bar has the same
//! meaning for every region whatever its threshold.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a region compares with its thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    /// The model's image score (AnomalyCLIP's global score, as published).
    #[default]
    Global,
    /// The maximum of the anomaly map outside the ignore polygons.
    MapMax,
    /// The mean of the two: `(global + map_max) / 2` (AnomalyCLIP's own test code adds the
    /// map maximum to the image score in the same spirit; the mean keeps it in [0, 1]).
    Blend,
}

impl Statistic {
    pub const NAMES: [&'static str; 3] = ["global", "map_max", "blend"];

    /// The statistic of one scored image. `map_max` must already exclude ignored pixels.
    pub fn value(self, global: f32, map_max: f32) -> f32 {
        match self {
            Statistic::Global => global,
            Statistic::MapMax => map_max,
            Statistic::Blend => 0.5 * (global + map_max),
        }
    }

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

impl fmt::Display for Statistic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Statistic {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "global" => Ok(Statistic::Global),
            "map_max" => Ok(Statistic::MapMax),
            "blend" => Ok(Statistic::Blend),
            other => Err(format!(
                "unknown statistic {other:?}; expected one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// The verdict of a region on a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "UNKNOWN")]
    Unknown,
    #[serde(rename = "NG")]
    Ng,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "OK",
            Verdict::Unknown => "UNKNOWN",
            Verdict::Ng => "NG",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The thresholds a region decides with.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// Hand-set in the config (`cal` is `"manual"` on the wire).
    Manual { t1: Option<f32>, t2: f32 },
    /// From a calibration file whose fingerprint matches (`cal` is its id).
    Calibrated { t1: f32, t2: f32, id: String },
    /// Calibration asked for but none applies: every frame is UNKNOWN; `reason` is published
    /// as `uncalibrated: <reason>`.
    Uncalibrated { reason: String },
}

/// One region's decision on one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// The statistic's value.
    pub value: f32,
    pub verdict: Verdict,
    /// `sigmoid(logit(value) − logit(T2))`; `None` when uncalibrated.
    pub score_norm: Option<f32>,
}

impl Rule {
    /// T2, the NG threshold, if the rule has one.
    pub fn t2(&self) -> Option<f32> {
        match self {
            Rule::Manual { t2, .. } | Rule::Calibrated { t2, .. } => Some(*t2),
            Rule::Uncalibrated { .. } => None,
        }
    }

    /// T1, the start of UNKNOWN, if the rule has one.
    pub fn t1(&self) -> Option<f32> {
        match self {
            Rule::Manual { t1, .. } => *t1,
            Rule::Calibrated { t1, .. } => Some(*t1),
            Rule::Uncalibrated { .. } => None,
        }
    }

    /// The `cal` field of results: the calibration id, `"manual"`, or `None` (uncalibrated).
    pub fn cal_id(&self) -> Option<&str> {
        match self {
            Rule::Manual { .. } => Some("manual"),
            Rule::Calibrated { id, .. } => Some(id),
            Rule::Uncalibrated { .. } => None,
        }
    }

    /// Decides on a statistic value. A non-finite value is UNKNOWN.
    pub fn decide(&self, value: f32) -> Decision {
        let Some(t2) = self.t2() else {
            return Decision {
                value,
                verdict: Verdict::Unknown,
                score_norm: None,
            };
        };
        let verdict = if !value.is_finite() {
            Verdict::Unknown
        } else if value >= t2 {
            Verdict::Ng
        } else if self.t1().is_some_and(|t1| value >= t1) {
            Verdict::Unknown
        } else {
            Verdict::Ok
        };
        Decision {
            value,
            verdict,
            score_norm: value.is_finite().then(|| score_norm(value, t2)),
        }
    }
}

/// `sigmoid(logit(v) − logit(t2))`, both clamped to [1e-6, 1 − 1e-6]: 0.5 at T2.
pub fn score_norm(value: f32, t2: f32) -> f32 {
    fn logit(p: f64) -> f64 {
        let p = p.clamp(1e-6, 1.0 - 1e-6);
        (p / (1.0 - p)).ln()
    }
    let d = logit(f64::from(value)) - logit(f64::from(t2));
    (1.0 / (1.0 + (-d).exp())) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t2_is_ng_at_or_above_and_t1_starts_unknown() {
        let r = Rule::Manual {
            t1: Some(0.6),
            t2: 0.8,
        };
        assert_eq!(r.decide(0.8).verdict, Verdict::Ng);
        assert_eq!(r.decide(0.79).verdict, Verdict::Unknown);
        assert_eq!(r.decide(0.6).verdict, Verdict::Unknown);
        assert_eq!(r.decide(0.59).verdict, Verdict::Ok);
        assert_eq!(r.decide(f32::NAN).verdict, Verdict::Unknown);
        let no_t1 = Rule::Manual { t1: None, t2: 0.8 };
        assert_eq!(no_t1.decide(0.7).verdict, Verdict::Ok);
    }

    #[test]
    fn an_uncalibrated_region_is_always_unknown_without_a_norm() {
        let r = Rule::Uncalibrated {
            reason: "model changed".into(),
        };
        for v in [0.0, 0.5, 1.0] {
            let d = r.decide(v);
            assert_eq!(d.verdict, Verdict::Unknown);
            assert_eq!(d.score_norm, None);
        }
        assert_eq!(r.cal_id(), None);
    }

    #[test]
    fn score_norm_is_one_half_at_t2_and_monotone() {
        assert!((score_norm(0.3, 0.3) - 0.5).abs() < 1e-6);
        assert!((score_norm(0.97, 0.97) - 0.5).abs() < 1e-6);
        let mut last = 0.0;
        for i in 0..=100 {
            let s = score_norm(i as f32 / 100.0, 0.42);
            assert!(s > last || i == 0 && s >= 0.0, "{i}: {s} after {last}");
            assert!((0.0..=1.0).contains(&s));
            last = s;
        }
        // Independent value: logit(0.9) - logit(0.5) = ln 9 → sigmoid = 0.9.
        assert!((score_norm(0.9, 0.5) - 0.9).abs() < 1e-6);
    }

    #[test]
    fn statistics_read_the_documented_values() {
        assert_eq!(Statistic::Global.value(0.2, 0.8), 0.2);
        assert_eq!(Statistic::MapMax.value(0.2, 0.8), 0.8);
        assert!((Statistic::Blend.value(0.2, 0.8) - 0.5).abs() < 1e-7);
        assert_eq!("map_max".parse::<Statistic>(), Ok(Statistic::MapMax));
        assert!("max".parse::<Statistic>().unwrap_err().contains("global"));
    }
}
