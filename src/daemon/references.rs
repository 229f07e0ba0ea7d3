//! Few-shot banks of regions: where a region's bank is (the state directory's
//! `reference/<camera>/<region or _frame>.bank`, or the configured file), its region key, and
//! loading it for the running model ([`load`]) — at daemon start, on SIGHUP, in `calibrate`
//! and in `check-config` ([`check`]).
//!
//! Input: a region's [`RegionConfig`] (its `reference` key and canonical geometry), the bank
//! fingerprint the running package expects ([`Fingerprint::for_package`] with an empty region)
//! and the `max_bank_mb` bound. Output: the prepared [`Reference`] and its identity (recorded in
//! calibration fingerprints), or the reason it cannot be used: missing, unreadable, corrupt,
//! over the bound, or built for another model, layer set, input size or region. The daemon
//! turns that reason into UNKNOWN verdicts (`uncalibrated: reference: <reason>`), never into
//! zero-shot scoring.

use std::path::{Path, PathBuf};

use crate::calibration;
use crate::camera::config::{ReferenceSource, RegionConfig};
use crate::config::{Config, Problem};
use crate::package::{HashCheck, ModelPackage};
use crate::reference::{self, Fingerprint, Reference};
use crate::region::Units;

/// Folder of the banks under the state directory.
pub const REFERENCE_DIR: &str = "reference";
/// File stem of the implicit whole-frame region's bank.
pub const FRAME_STEM: &str = "_frame";

/// The bank `reference --config` writes for a camera's region (`None`: the implicit
/// whole-frame region): `<state_dir>/reference/<camera>/<region or _frame>.bank`. Camera and
/// region names are topic levels (checked by the config), so they are plain file names.
pub fn bank_path(state_dir: &Path, camera: &str, region: Option<&str>) -> PathBuf {
    state_dir
        .join(REFERENCE_DIR)
        .join(camera)
        .join(format!("{}.bank", region.unwrap_or(FRAME_STEM)))
}

/// The bank file a region is configured with, `None` without `reference`.
pub fn configured_path(state_dir: &Path, camera: &str, r: &RegionConfig) -> Option<PathBuf> {
    Some(match &r.reference.as_ref()?.source {
        ReferenceSource::StateDir => bank_path(state_dir, camera, r.name.as_deref()),
        ReferenceSource::File(p) => p.clone(),
    })
}

/// The canonical geometry of a region: its rectangle as calibration fingerprints write it and
/// the SHA-256 of its ignore polygons (`<rect>|<ignore sha256>`).
pub fn geometry(r: &RegionConfig) -> String {
    let rect = match r.shape.units {
        Units::Fraction => calibration::rect_frac_text(r.shape.rect),
        Units::Pixel => calibration::rect_px_text(r.shape.rect.map(|v| v as u32)),
    };
    format!("{rect}|{}", calibration::ignore_sha256(&r.shape.ignore))
}

/// The region key a bank of region `r` is built for: [`reference::WHOLE_FRAME`] for the
/// implicit whole-frame region (so that a bank of `reference --model --images --out` serves it),
/// else [`reference::region_key`] of its name and [`geometry`].
pub fn region_key(r: &RegionConfig) -> String {
    match &r.name {
        None => reference::WHOLE_FRAME.to_owned(),
        Some(name) => reference::region_key(name, &geometry(r)),
    }
}

/// A region's bank, ready to match frames, and its identity ([`reference::identity`]).
pub struct Loaded {
    pub reference: Reference,
    pub id: String,
    pub path: PathBuf,
}

/// Loads the bank of region `r` of `camera` for a package whose banks have fingerprint
/// `expected` (any region; the region's key is set here). `None` when the region has no
/// `reference`; `Err` with the reason (naming the file) when it cannot be used.
pub fn load(
    state_dir: &Path,
    camera: &str,
    r: &RegionConfig,
    expected: &Fingerprint,
    max_bank_mb: u64,
) -> Option<Result<Loaded, String>> {
    let path = configured_path(state_dir, camera, r)?;
    Some(load_path(&path, r, expected, max_bank_mb))
}

fn load_path(
    path: &Path,
    r: &RegionConfig,
    expected: &Fingerprint,
    max_bank_mb: u64,
) -> Result<Loaded, String> {
    if !path.exists() {
        let how = match r.name.as_deref() {
            Some(n) => format!("--region {n}"),
            None => "(whole frame)".to_owned(),
        };
        return Err(format!(
            "no bank file {} (build it with anomalyclip-edge reference --config ... {how})",
            path.display()
        ));
    }
    let mut expected = expected.clone();
    expected.region = region_key(r);
    let (bank, id) = reference::Bank::load_identified(path, max_bank_mb, &expected)
        .map_err(|e| e.to_string())?;
    Ok(Loaded {
        reference: Reference::new(bank),
        id,
        path: path.to_owned(),
    })
}

/// What `check-config` adds for the few-shot banks of a config that is otherwise good: each
/// region with `reference` whose bank is missing, unreadable, corrupt, over `max_bank_mb` or
/// built for another model or region, as a problem at the `reference` key's line naming the
/// camera and region. `origin` names the config file.
pub fn check(cfg: &Config, origin: &str) -> Vec<Problem> {
    let wanted = cfg
        .cameras
        .iter()
        .any(|c| c.regions.iter().any(|r| r.reference.is_some()));
    if !wanted {
        return Vec::new();
    }
    let mut problems = Vec::new();
    // The config check has hashed every file already.
    let expected = match ModelPackage::load(&cfg.model.package, HashCheck::None) {
        Ok(pkg) => Fingerprint::for_package(&pkg, "", 0),
        Err(e) => {
            problems.push(Problem {
                file: origin.to_owned(),
                line: None,
                path: "model.package".into(),
                message: e.to_string(),
            });
            return problems;
        }
    };
    for c in &cfg.cameras {
        for r in &c.regions {
            let (Some(rc), Some(Err(why))) = (
                &r.reference,
                load(&cfg.state_dir, &c.name, r, &expected, cfg.model.max_bank_mb),
            ) else {
                continue;
            };
            let unit = match &r.name {
                Some(n) => format!("camera {:?} region {n:?}", c.name),
                None => format!("camera {:?} (whole frame)", c.name),
            };
            problems.push(Problem {
                file: origin.to_owned(),
                line: Some(rc.line),
                path: rc.path.clone(),
                message: format!("{unit}: {why}"),
            });
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::RegionShape;

    fn region(name: Option<&str>, rect: [f64; 4]) -> RegionConfig {
        RegionConfig {
            name: name.map(str::to_owned),
            shape: RegionShape {
                units: Units::Fraction,
                rect,
                ignore: Vec::new(),
            },
            statistic: Default::default(),
            threshold: 0.5,
            t1: None,
            calibrated: false,
            reference: None,
        }
    }

    #[test]
    fn bank_paths_and_keys_follow_the_region_and_its_geometry() {
        let dir = Path::new("/s");
        assert_eq!(
            bank_path(dir, "cam", None),
            Path::new("/s/reference/cam/_frame.bank")
        );
        assert_eq!(
            bank_path(dir, "cam", Some("lid")),
            Path::new("/s/reference/cam/lid.bank")
        );
        let a = region(Some("lid"), [0.0, 0.0, 0.5, 0.5]);
        let b = region(Some("lid"), [0.0, 0.0, 0.5, 0.6]);
        assert_eq!(region_key(&a), region_key(&a.clone()));
        assert_ne!(region_key(&a), region_key(&b), "another rect, another key");
        let mut c = a.clone();
        c.shape.ignore = vec![vec![[0.1, 0.1], [0.2, 0.1], [0.2, 0.2]]];
        assert_ne!(region_key(&a), region_key(&c), "another mask, another key");
        assert!(region_key(&a).starts_with("lid:"));
        assert_eq!(
            region_key(&region(None, [0.0, 0.0, 1.0, 1.0])),
            reference::WHOLE_FRAME
        );
        assert!(configured_path(dir, "cam", &a).is_none());
    }

    #[test]
    fn a_missing_bank_is_an_error_naming_the_file_and_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = region(Some("lid"), [0.0, 0.0, 0.5, 0.5]);
        r.reference = Some(crate::camera::config::ReferenceConfig {
            source: ReferenceSource::StateDir,
            line: 3,
            path: "camera[0].region[0].reference".into(),
        });
        let Some(Err(why)) = load(dir.path(), "cam", &r, &Fingerprint::default(), 256) else {
            panic!("a missing bank must be refused");
        };
        assert!(why.contains("reference/cam/lid.bank"), "{why}");
        assert!(why.contains("--region lid"), "{why}");
    }

    #[test]
    fn the_config_default_bound_is_the_reference_modules() {
        assert_eq!(
            crate::config::default_max_bank_mb(),
            reference::DEFAULT_MAX_BANK_MB
        );
    }
}
