//! The run-time state of each region of a camera ([`Unit`]): its decision rule (hand-set,
//! calibrated, or uncalibrated with a reason), debouncer, mask gate, verdict counters and drift
//! window, and the crop it takes from each frame.
//!
//! Input: the camera's resolved [`RegionConfig`]s, the [`Validity`] of the running model (what a
//! calibration must have been made for), frames of any size. Output: per frame and region the
//! crop to score ([`Unit::crop`]), then the decision on the scored crop ([`Unit::decide`]).
//! Failure modes: a region that does not fit the frame (the camera's resolution changed) is
//! reported by [`Unit::crop`] as an error for that frame, logged once per geometry, and counted
//! — the daemon keeps running and the other regions are scored; a calibration that is missing,
//! unreadable or made for something else makes the region [`Rule::Uncalibrated`] (every frame
//! UNKNOWN, `uncalibrated: <reason>` in its calibration message and stats). A region with a
//! few-shot `reference` loads its bank here ([`super::references`]); a bank that is missing,
//! corrupt or built for another model or region makes the region UNKNOWN as well
//! (`uncalibrated: reference: <reason>`, logged once per load), never zero-shot.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::alarm::Debouncer;
use crate::calibration;
use crate::camera::config::{MaskConfig, RegionConfig};
use crate::decision::{Decision, Rule};
use crate::payload::MaskGate;
use crate::region::{self, PixelRect, RegionError};

/// A region's crop of a frame and the map pixels it ignores.
pub(super) type Crop = (PixelRect, Option<Arc<[bool]>>);
/// A frame's width and height and the map's edge.
type Geometry = (u32, u32, usize);

/// What a calibration must match to be applied: the running model and engine.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Validity {
    pub state_dir: PathBuf,
    pub model_sha256: String,
    pub text_sha256: String,
    pub backend: String,
    pub precision: String,
    pub input_size: u32,
    /// What a few-shot bank must have been built for (its `region` and `k` left empty).
    pub bank: crate::reference::Fingerprint,
    /// `[model] max_bank_mb`.
    pub max_bank_mb: u64,
}

/// How many recent values a region keeps for drift.
pub(super) const DRIFT_WINDOW: usize = calibration::DRIFT_WINDOW;
/// Fewest recent values for a drift index (its no-drift 99th percentile is about 0.14 at 200
/// values against 1000 calibration frames; docs/calibration.md).
pub(super) const DRIFT_MIN: usize = 200;

/// One region of one camera, as the worker scores it.
pub(super) struct Unit {
    pub(super) cfg: RegionConfig,
    /// `camera` for the implicit region, `camera/region` otherwise: the topic levels under the
    /// prefix and the key of the alarm state file.
    pub(super) key: String,
    pub(super) rule: Rule,
    pub(super) debouncer: Debouncer,
    pub(super) gate: MaskGate,
    /// The crop and ignore mask for the last frame geometry `(width, height, map size)`.
    geometry: Option<(Geometry, Result<Crop, RegionError>)>,
    /// Frames decided OK, UNKNOWN, NG.
    pub(super) verdicts: [u64; 3],
    /// Frames whose crop did not fit the frame.
    pub(super) crop_errors: u64,
    /// Recent statistic values (for drift).
    pub(super) recent: VecDeque<f32>,
    pub(super) drift: bool,
    /// The last drift index (population stability index), when computed.
    pub(super) psi: Option<f64>,
    /// The calibration's deciles (empty without a calibration).
    deciles: Vec<f32>,
    /// What the calibration file says about itself (sample size, rates, when), for the
    /// retained `calibration` message; `Null` without one.
    pub(super) details: serde_json::Value,
    /// The region's few-shot bank (with its scratch buffers), when it has one that loaded.
    pub(super) reference: Option<Arc<Mutex<crate::reference::Reference>>>,
    /// That bank's identity (`""` without one): part of a calibration's fingerprint.
    pub(super) bank_id: String,
    /// The last frame fed to the debouncer: `seq`, capture time (Unix ms), score; for the
    /// clear an acknowledgement publishes.
    pub(super) last: Option<(u64, u64, f32)>,
}

/// The unit key of a region of `camera`.
pub(super) fn unit_key(camera: &str, region: Option<&str>) -> String {
    match region {
        Some(r) => format!("{camera}/{r}"),
        None => camera.to_owned(),
    }
}

impl Unit {
    pub(super) fn new(
        camera: &str,
        cfg: &RegionConfig,
        debouncer: Debouncer,
        mask: &MaskConfig,
        validity: &Validity,
    ) -> Self {
        let key = unit_key(camera, cfg.level());
        let (reference, bank_id, applied) = resolve(camera, &key, cfg, validity);
        Self {
            reference,
            bank_id,
            key,
            rule: applied.rule,
            details: applied.details,
            deciles: applied.deciles,
            cfg: cfg.clone(),
            debouncer,
            gate: MaskGate::new(mask.only_on_anomaly, mask.min_interval),
            geometry: None,
            verdicts: [0; 3],
            crop_errors: 0,
            recent: VecDeque::with_capacity(DRIFT_WINDOW),
            drift: false,
            psi: None,
            last: None,
        }
    }

    /// Applies a reloaded configuration of the same region (debouncer and counters kept).
    pub(super) fn reconfigure(&mut self, camera: &str, cfg: &RegionConfig, validity: &Validity) {
        if cfg.shape != self.cfg.shape {
            self.geometry = None;
        }
        self.cfg = cfg.clone();
        let (reference, bank_id, applied) = resolve(camera, &self.key, cfg, validity);
        self.reference = reference;
        self.bank_id = bank_id;
        if applied.deciles != self.deciles || applied.rule != self.rule {
            // Another calibration (or none): its drift starts again.
            self.recent.clear();
            self.drift = false;
            self.psi = None;
        }
        self.rule = applied.rule;
        self.details = applied.details;
        self.deciles = applied.deciles;
    }

    /// Re-computes the drift index of the recent values against the calibration's deciles
    /// (at least [`DRIFT_MIN`] values); logs once when the region starts drifting.
    pub(super) fn update_drift(&mut self) {
        if self.deciles.is_empty() || self.recent.len() < DRIFT_MIN {
            return;
        }
        let recent: Vec<f32> = self.recent.iter().copied().collect();
        let Ok(psi) = calibration::psi(&self.deciles, &recent) else {
            return;
        };
        self.psi = Some(psi);
        let drift = psi > calibration::PSI_DRIFT;
        if drift && !self.drift {
            warn!(
                region = %self.key,
                psi,
                limit = calibration::PSI_DRIFT,
                "scores have drifted from the region's calibration (population stability index over the limit): check the camera, the lighting and the parts, then calibrate again"
            );
        }
        self.drift = drift;
    }

    /// The crop of a `width × height` frame this region scores and, for a `size × size` map,
    /// the map pixels to ignore.
    pub(super) fn crop(
        &mut self,
        width: u32,
        height: u32,
        size: usize,
    ) -> Result<Crop, RegionError> {
        let key = (width, height, size);
        if self.geometry.as_ref().is_none_or(|(k, _)| *k != key) {
            let shape = &self.cfg.shape;
            let g = shape.pixel_rect(width, height).map(|r| {
                let mask = region::ignore_mask(shape, r, width, height, size).map(Arc::from);
                (r, mask)
            });
            if let Err(e) = &g {
                warn!(region = %self.key, error = %e, "region does not fit the camera's frames: not scored until it does");
            }
            self.geometry = Some((key, g));
        }
        match &self.geometry {
            Some((_, Ok((r, m)))) => Ok((*r, m.clone())),
            Some((_, Err(e))) => Err(e.clone()),
            None => unreachable!("set above"),
        }
    }

    /// Decides on one scored crop and counts the verdict; records the value for drift.
    pub(super) fn decide(&mut self, global: f32, map_max: f32) -> Decision {
        let value = self.cfg.statistic.value(global, map_max);
        let d = self.rule.decide(value);
        self.verdicts[d.verdict as usize] += 1;
        if value.is_finite() {
            if self.recent.len() == DRIFT_WINDOW {
                self.recent.pop_front();
            }
            self.recent.push_back(value);
        }
        d
    }

    /// The retained `calibration` message of the region: what it decides with.
    pub(super) fn calibration_message(&self, camera: &str) -> Vec<u8> {
        let (state, reason) = match &self.rule {
            Rule::Manual { .. } => ("manual", None),
            Rule::Calibrated { .. } => ("calibrated", None),
            Rule::Uncalibrated { reason } => ("uncalibrated", Some(reason.as_str())),
        };
        let msg = serde_json::json!({
            "v": crate::payload::SCHEMA_VERSION,
            "camera": camera,
            "region": self.cfg.name,
            "state": state,
            "status": self.calibration_status(),
            "reason": reason,
            "id": self.rule.cal_id(),
            "statistic": self.cfg.statistic.as_str(),
            "t1": self.rule.t1(),
            "t2": self.rule.t2(),
            "details": self.details,
        });
        serde_json::to_vec(&msg).unwrap_or_default()
    }

    /// The region's counters and decision state for `stats`.
    pub(super) fn stats(&self) -> crate::payload::RegionStats {
        crate::payload::RegionStats {
            ok: self.verdicts[0],
            unknown: self.verdicts[1],
            ng: self.verdicts[2],
            crop_errors: self.crop_errors,
            calibration: self.calibration_status(),
            drift: self.drift,
            psi: self.psi,
        }
    }

    /// The region's calibration status: `manual`, `calibrated <id>` or `uncalibrated: <why>`.
    pub(super) fn calibration_status(&self) -> String {
        match &self.rule {
            Rule::Manual { .. } => "manual".into(),
            Rule::Calibrated { id, .. } => format!("calibrated {id}"),
            Rule::Uncalibrated { reason } => format!("uncalibrated: {reason}"),
        }
    }
}

/// The map with the ignored pixels set to 0, its maximum and the share of the other pixels at
/// or above `pixel_threshold` (see [`region::mask_map`]).
pub(super) fn masked_stats(
    map: &mut [f32],
    ignore: Option<&[bool]>,
    pixel_threshold: f32,
) -> (f32, f32) {
    region::mask_map(map, ignore.unwrap_or(&[]), pixel_threshold)
}

/// The bank and the rule of a region: without a usable bank (when it has `reference`) the
/// region is uncalibrated with the bank's reason (logged here, once per load); else the rule
/// of [`resolve_rule`] with the bank's identity.
fn resolve(
    camera: &str,
    key: &str,
    cfg: &RegionConfig,
    validity: &Validity,
) -> (
    Option<Arc<Mutex<crate::reference::Reference>>>,
    String,
    super::calibrated::Applied,
) {
    let loaded = super::references::load(
        &validity.state_dir,
        camera,
        cfg,
        &validity.bank,
        validity.max_bank_mb,
    );
    match loaded {
        None => (None, String::new(), resolve_rule(camera, cfg, validity, "")),
        Some(Err(why)) => {
            warn!(region = %key, reason = %why, "few-shot reference bank unusable: the region's verdicts are UNKNOWN until it is fixed (then reload)");
            (
                None,
                String::new(),
                super::calibrated::Applied {
                    rule: Rule::Uncalibrated {
                        reason: format!("reference: {why}"),
                    },
                    details: serde_json::Value::Null,
                    deciles: Vec::new(),
                },
            )
        }
        Some(Ok(l)) => {
            let fp = l.reference.bank().fingerprint();
            info!(region = %key, bank = %l.path.display(), id = %l.id, k = fp.k, bytes = l.reference.bank().feature_bytes(), "few-shot reference bank loaded");
            let applied = resolve_rule(camera, cfg, validity, &l.id);
            (Some(Arc::new(Mutex::new(l.reference))), l.id, applied)
        }
    }
}

/// The rule of a region: hand-set, or its calibration when the fingerprint matches (made with
/// the bank of identity `reference`, `""` for none).
fn resolve_rule(
    camera: &str,
    cfg: &RegionConfig,
    validity: &Validity,
    reference: &str,
) -> super::calibrated::Applied {
    if !cfg.calibrated {
        return super::calibrated::Applied {
            rule: Rule::Manual {
                t1: cfg.t1,
                t2: cfg.threshold,
            },
            details: serde_json::Value::Null,
            deciles: Vec::new(),
        };
    }
    super::calibrated::rule(camera, cfg, validity, reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_pixels_leave_the_maximum_and_the_area() {
        let mut map = vec![0.9, 0.1, 0.6, 0.2];
        let ignore = [true, false, false, false];
        let (max, area) = masked_stats(&mut map, Some(&ignore), 0.5);
        assert_eq!(max, 0.6);
        assert!((area - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(map[0], 0.0);
        let mut all = vec![0.9, 0.8];
        assert_eq!(masked_stats(&mut all, Some(&[true, true]), 0.5), (0.0, 0.0));
        let mut plain = vec![0.9, 0.1];
        assert_eq!(masked_stats(&mut plain, None, 0.5), (0.9, 0.5));
    }
}
