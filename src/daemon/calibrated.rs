//! Applies calibration files to regions: loads a region's calibration from the state directory
//! and accepts it only when its fingerprint matches the running model, engine and region.
//!
//! Input: the region's config and the running model's [`Validity`]. Output: a
//! [`Rule::Calibrated`] (with what the file says about itself, and its deciles for drift) or a
//! [`Rule::Uncalibrated`] naming why (no file, unreadable, made for another model / engine /
//! region / statistic). Never a fallback to another threshold.

use crate::calibration::{self, Fingerprint};
use crate::camera::config::RegionConfig;
use crate::decision::Rule;
use crate::region::Units;

use super::regions::Validity;

/// What a calibration of region `r` must have been made for, on the running model, with the
/// region's few-shot bank of identity `reference` (`""` for none; see
/// [`crate::reference::identity`]).
pub fn fingerprint(validity: &Validity, r: &RegionConfig, reference: &str) -> Fingerprint {
    let rect = if r.name.is_none() && r.shape.is_full() {
        calibration::RECT_FULL.to_owned()
    } else {
        match r.shape.units {
            Units::Fraction => calibration::rect_frac_text(r.shape.rect),
            // Whole pixels (checked by the config).
            Units::Pixel => calibration::rect_px_text(r.shape.rect.map(|v| v as u32)),
        }
    };
    Fingerprint {
        model_sha256: validity.model_sha256.clone(),
        text_sha256: validity.text_sha256.clone(),
        backend: validity.backend.clone(),
        precision: validity.precision.clone(),
        input_size: validity.input_size,
        rect,
        ignore_sha256: calibration::ignore_sha256(&r.shape.ignore),
        statistic: r.statistic.as_str().to_owned(),
        reference: reference.to_owned(),
    }
}

/// A region's calibrated rule, what its file says about itself, and its deciles (for drift).
pub(super) struct Applied {
    pub(super) rule: Rule,
    pub(super) details: serde_json::Value,
    pub(super) deciles: Vec<f32>,
}

/// The rule of a region configured with `calibration = true`, scored with the bank of
/// identity `reference` (`""` for none).
pub(super) fn rule(
    camera: &str,
    cfg: &RegionConfig,
    validity: &Validity,
    reference: &str,
) -> Applied {
    let region = cfg.name.as_deref().unwrap_or("");
    let uncalibrated = |reason: String| Applied {
        rule: Rule::Uncalibrated { reason },
        details: serde_json::Value::Null,
        deciles: Vec::new(),
    };
    let cal = match calibration::load(&validity.state_dir, camera, region) {
        Ok(Some(c)) => c,
        Ok(None) => {
            return uncalibrated(
                "no calibration file (run anomalyclip-edge calibrate for this region)".into(),
            );
        }
        Err(e) => return uncalibrated(e.to_string()),
    };
    if let Some(why) = cal
        .fingerprint
        .mismatch(&fingerprint(validity, cfg, reference))
    {
        return uncalibrated(format!("calibration {} no longer applies: {why}", cal.id));
    }
    Applied {
        details: serde_json::json!({
            "n": cal.stats.n,
            "created_unix_ms": cal.created_unix_ms,
            "source": cal.source,
            "target_rate": cal.target_rate,
            "unknown_rate": cal.unknown_rate,
            "min_supported_rate": cal.min_supported_rate,
            "alarm_rate": cal.alarm_rate,
        }),
        deciles: cal.stats.deciles.clone(),
        rule: Rule::Calibrated {
            t1: cal.t1,
            t2: cal.t2,
            id: cal.id,
        },
    }
}
