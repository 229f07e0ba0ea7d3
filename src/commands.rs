//! Commands from SCADA (`[commands]`, off by default): the request wire, its validation, the
//! acknowledgement wire, and the overrides file the lasting commands write.
//!
//! Input: a request on `<prefix>/cmd` (JSON, at most [`MAX_COMMAND_BYTES`]) or a Sparkplug
//! DCMD translated into the same [`Command`]. Output: a [`Request`] or a [`Rejected`] with one
//! line saying what is wrong; an [`Ack`] the daemon publishes on `<prefix>/cmd/ack` for every
//! request it could read.
//!
//! Lasting commands (`set_thresholds`, `enable_camera`, `disable_camera`, `clear_overrides`)
//! change [`Overrides`]: a small JSON file in the state directory
//! (`<state_dir>/overrides.v1.json`, written atomically), applied over the config file at start
//! and at every reload ([`Overrides::apply`], each applied override logged). The config file is
//! never written: nothing a command does writes outside the state directory, and
//! `clear_overrides` returns to what the file says. `ack_alarm` and `start_calibration` act on
//! the running daemon only.
//!
//! Failure modes: a payload that is not a JSON object, too large, with an unknown `cmd`, a
//! missing or mistyped field or an out-of-range value is [`Rejected`] (answered `ok: false`
//! when it has a usable `id`, or with no `id`); an override that no longer fits the config file
//! (camera or region gone, region now calibrated) is kept, not applied, and logged at each
//! load; an unreadable or corrupt overrides file is logged and ignored (the config file's
//! values apply).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{CameraConfig, Config};
use crate::statedir;

pub mod config;

/// Largest command payload read; larger ones are answered `ok: false`.
pub const MAX_COMMAND_BYTES: usize = 4096;
/// Longest `id` echoed in the acknowledgement (printable ASCII).
pub const MAX_ID_LEN: usize = 64;
/// The overrides file in the state directory.
pub const OVERRIDES_FILE: &str = "overrides.v1.json";

/// A command, validated as far as it can be without the running configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// T2 (and optionally T1) of a hand-set region; `region: None` is the camera's implicit
    /// whole-frame region.
    SetThresholds {
        camera: String,
        region: Option<String>,
        t2: f32,
        t1: Option<f32>,
        /// Keep the T1 in force (when it is at most the new T2) instead of `t1`: a Sparkplug
        /// write of the `threshold` metric sets T2 only.
        keep_t1: bool,
    },
    /// Enable (`true`) or disable (`false`) a camera.
    SetEnabled { camera: String, enabled: bool },
    /// Drop the overrides of one camera, or of all.
    ClearOverrides { camera: Option<String> },
    /// Acknowledge the alarm of a region.
    AckAlarm {
        camera: String,
        region: Option<String>,
    },
    /// Start a calibration capture of a region (reviewed and accepted on the live view).
    StartCalibration {
        camera: String,
        region: Option<String>,
        frames: usize,
        rate: f64,
        unknown_rate: Option<f64>,
        min_interval_ms: Option<u64>,
    },
}

impl Command {
    /// The `cmd` name.
    pub fn name(&self) -> &'static str {
        match self {
            Command::SetThresholds { .. } => "set_thresholds",
            Command::SetEnabled { enabled: true, .. } => "enable_camera",
            Command::SetEnabled { enabled: false, .. } => "disable_camera",
            Command::ClearOverrides { .. } => "clear_overrides",
            Command::AckAlarm { .. } => "ack_alarm",
            Command::StartCalibration { .. } => "start_calibration",
        }
    }

    /// The camera the command is for (`None`: all of them).
    pub fn camera(&self) -> Option<&str> {
        match self {
            Command::SetThresholds { camera, .. }
            | Command::SetEnabled { camera, .. }
            | Command::AckAlarm { camera, .. }
            | Command::StartCalibration { camera, .. } => Some(camera),
            Command::ClearOverrides { camera } => camera.as_deref(),
        }
    }
}

/// A request: its `id` (echoed in the acknowledgement) and the command.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<String>,
    pub command: Command,
}

/// A request that cannot be carried out, with what is known of it for the acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub id: Option<String>,
    pub cmd: Option<String>,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    #[serde(default)]
    id: Option<String>,
    cmd: String,
    #[serde(default)]
    camera: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    t2: Option<f64>,
    #[serde(default)]
    t1: Option<f64>,
    #[serde(default)]
    frames: Option<usize>,
    #[serde(default)]
    rate: Option<f64>,
    #[serde(default)]
    unknown_rate: Option<f64>,
    #[serde(default)]
    min_interval_ms: Option<u64>,
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// The `id` of a payload that did not parse, if it has a valid one (so the rejection can be
/// correlated).
fn salvage_id(payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    v.get("id")?
        .as_str()
        .filter(|s| valid_id(s))
        .map(str::to_owned)
}

fn threshold(v: f64, key: &str) -> Result<f32, String> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(v as f32)
    } else {
        Err(format!("{key} must be a number in [0, 1], got {v}"))
    }
}

/// The acknowledgement of a request refused because too many commands wait (the publisher
/// answers it without handing it on).
pub fn busy(payload: &[u8]) -> Ack {
    let id = if payload.len() <= MAX_COMMAND_BYTES {
        salvage_id(payload)
    } else {
        None
    };
    Ack::rejected(
        &Rejected {
            id,
            cmd: None,
            reason: "busy: too many commands waiting, retry later".into(),
        },
        "mqtt",
    )
}

/// Reads a request. Every problem is one line naming the field and what was expected.
pub fn parse(payload: &[u8]) -> Result<Request, Rejected> {
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(Rejected {
            id: None,
            cmd: None,
            reason: format!(
                "request of {} bytes exceeds {MAX_COMMAND_BYTES}",
                payload.len()
            ),
        });
    }
    let wire: Wire = serde_json::from_slice(payload).map_err(|e| Rejected {
        id: salvage_id(payload),
        cmd: None,
        reason: format!("not a command: {e}"),
    })?;
    let id = match wire.id {
        Some(id) if !valid_id(&id) => {
            return Err(Rejected {
                id: None,
                cmd: Some(wire.cmd),
                reason: format!("id must be 1 to {MAX_ID_LEN} printable ASCII characters"),
            });
        }
        id => id,
    };
    let reject = |reason: String| Rejected {
        id: id.clone(),
        cmd: Some(wire.cmd.clone()),
        reason,
    };
    let camera = || match &wire.camera {
        Some(c) if crate::payload::is_valid_name(c) => Ok(c.clone()),
        Some(c) => Err(reject(format!(
            "camera {c:?} is not a camera name (1 to 64 of A-Z a-z 0-9 _ -)"
        ))),
        None => Err(reject("camera is required".into())),
    };
    let region = || match &wire.region {
        Some(r) if r.is_empty() => Ok(None),
        Some(r) if crate::payload::is_valid_name(r) => Ok(Some(r.clone())),
        Some(r) => Err(reject(format!(
            "region {r:?} is not a region name (1 to 64 of A-Z a-z 0-9 _ -)"
        ))),
        None => Ok(None),
    };
    let unexpected = |keys: &[(&str, bool)]| -> Result<(), Rejected> {
        match keys.iter().find(|(_, present)| *present) {
            Some((k, _)) => Err(reject(format!("{k} is not a field of {}", wire.cmd))),
            None => Ok(()),
        }
    };
    let calibration_keys = [
        ("frames", wire.frames.is_some()),
        ("rate", wire.rate.is_some()),
        ("unknown_rate", wire.unknown_rate.is_some()),
        ("min_interval_ms", wire.min_interval_ms.is_some()),
    ];
    let threshold_keys = [("t2", wire.t2.is_some()), ("t1", wire.t1.is_some())];
    let command = match wire.cmd.as_str() {
        "set_thresholds" => {
            unexpected(&calibration_keys)?;
            let t2 = match wire.t2 {
                Some(v) => threshold(v, "t2").map_err(reject)?,
                None => return Err(reject("t2 is required".into())),
            };
            let t1 = match wire.t1 {
                Some(v) => Some(threshold(v, "t1").map_err(reject)?),
                None => None,
            };
            if let Some(t1) = t1.filter(|t1| *t1 > t2) {
                return Err(reject(format!(
                    "t1 ({t1}) is above t2 ({t2}): UNKNOWN starts at t1 <= t2"
                )));
            }
            Command::SetThresholds {
                camera: camera()?,
                region: region()?,
                t2,
                t1,
                keep_t1: false,
            }
        }
        "enable_camera" | "disable_camera" => {
            unexpected(&calibration_keys)?;
            unexpected(&threshold_keys)?;
            unexpected(&[("region", wire.region.is_some())])?;
            Command::SetEnabled {
                camera: camera()?,
                enabled: wire.cmd == "enable_camera",
            }
        }
        "clear_overrides" => {
            unexpected(&calibration_keys)?;
            unexpected(&threshold_keys)?;
            unexpected(&[("region", wire.region.is_some())])?;
            Command::ClearOverrides {
                camera: match wire.camera {
                    Some(_) => Some(camera()?),
                    None => None,
                },
            }
        }
        "ack_alarm" => {
            unexpected(&calibration_keys)?;
            unexpected(&threshold_keys)?;
            Command::AckAlarm {
                camera: camera()?,
                region: region()?,
            }
        }
        "start_calibration" => {
            unexpected(&threshold_keys)?;
            let frames = wire
                .frames
                .ok_or_else(|| reject("frames is required".into()))?;
            let rate = wire.rate.ok_or_else(|| reject("rate is required".into()))?;
            Command::StartCalibration {
                camera: camera()?,
                region: region()?,
                frames,
                rate,
                unknown_rate: wire.unknown_rate,
                min_interval_ms: wire.min_interval_ms,
            }
        }
        other => {
            return Err(reject(format!(
                "unknown cmd {other:?} (expected one of {})",
                config::COMMANDS.join(", ")
            )));
        }
    };
    Ok(Request { id, command })
}

/// The acknowledgement of one request, on `<prefix>/cmd/ack` (QoS 1, not retained).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ack {
    pub v: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub camera: Option<String>,
    pub ok: bool,
    /// What was done (`ok: true`) or why not (`ok: false`), one line.
    pub detail: String,
    /// Where the command came from: `mqtt` or `sparkplug`.
    pub source: &'static str,
    pub ts_ms: u64,
}

impl Ack {
    /// A carried-out command.
    pub fn done(req: &Request, source: &'static str, detail: impl Into<String>) -> Self {
        Self {
            v: 1,
            id: req.id.clone(),
            cmd: Some(req.command.name().to_owned()),
            camera: req.command.camera().map(str::to_owned),
            ok: true,
            detail: detail.into(),
            source,
            ts_ms: unix_ms(),
        }
    }

    /// A valid request that was not carried out.
    pub fn refused(req: &Request, source: &'static str, why: impl Into<String>) -> Self {
        Self {
            ok: false,
            ..Self::done(req, source, why)
        }
    }

    /// A request that could not be read.
    pub fn rejected(r: &Rejected, source: &'static str) -> Self {
        Self {
            v: 1,
            id: r.id.clone(),
            cmd: r.cmd.clone().filter(|c| valid_id(c)),
            camera: None,
            ok: false,
            detail: r.reason.clone(),
            source,
            ts_ms: unix_ms(),
        }
    }

    /// The JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// T2 and T1 set by a command for one region.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub t2: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t1: Option<f32>,
}

/// What commands changed for one camera.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CameraOverride {
    /// `Some(false)`: disabled by a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// By region name; `""` is the camera's implicit whole-frame region.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub thresholds: BTreeMap<String, Thresholds>,
}

impl CameraOverride {
    fn is_empty(&self) -> bool {
        self.enabled.is_none() && self.thresholds.is_empty()
    }
}

/// The lasting changes commands made, kept in the state directory and applied over the config
/// file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    #[serde(default)]
    pub cameras: BTreeMap<String, CameraOverride>,
}

/// What [`Overrides::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Cameras disabled by a command (removed from the running configuration).
    pub disabled: Vec<String>,
    /// One line per override: applied, or why not.
    pub notes: Vec<String>,
}

/// Why the overrides could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct OverridesError {
    pub path: PathBuf,
    pub what: String,
}

fn region_label(region: &str) -> String {
    if region.is_empty() {
        "the whole frame".to_owned()
    } else {
        format!("region {region}")
    }
}

/// Finds the region `region` (`""`: the implicit one) of `cam`, or says why not.
fn find_region<'a>(
    cam: &'a mut CameraConfig,
    region: &str,
) -> Result<&'a mut crate::config::RegionConfig, String> {
    let named = cam.has_named_regions();
    let camera = cam.name.clone();
    if region.is_empty() && named {
        return Err(format!(
            "camera {camera} has named regions: say which (region)"
        ));
    }
    cam.regions
        .iter_mut()
        .find(|r| r.name.as_deref().unwrap_or("") == region)
        .ok_or_else(|| format!("camera {camera} has no region {region:?}"))
}

impl Overrides {
    /// The file in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(OVERRIDES_FILE)
    }

    /// Reads the overrides of `state_dir`; a missing file is none.
    pub fn load(state_dir: &Path) -> Result<Self, OverridesError> {
        let path = Self::path(state_dir);
        let err = |what: String| OverridesError {
            path: path.clone(),
            what,
        };
        match statedir::read_file(&path) {
            Ok(None) => Ok(Self::default()),
            Ok(Some(bytes)) => serde_json::from_slice(&bytes)
                .map_err(|e| err(format!("not an overrides file: {e}"))),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Writes the file atomically (temporary file, fsync, rename); an empty set removes it.
    pub fn save(&self, state_dir: &Path) -> Result<(), OverridesError> {
        let path = Self::path(state_dir);
        let res = if self.cameras.is_empty() {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            serde_json::to_vec_pretty(self)
                .map_err(std::io::Error::other)
                .and_then(|b| statedir::replace_file(&path, &b))
        };
        res.map_err(|e| OverridesError {
            path,
            what: e.to_string(),
        })
    }

    /// Whether there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.cameras.is_empty()
    }

    /// Applies the overrides to a configuration read from the file: thresholds set in place,
    /// disabled cameras removed. Overrides that do not fit are left out with a note.
    pub fn apply(&self, cfg: &mut Config) -> Applied {
        let mut out = Applied::default();
        for (name, ov) in &self.cameras {
            let Some(cam) = cfg.cameras.iter_mut().find(|c| c.name == *name) else {
                out.notes.push(format!(
                    "override for camera {name} not applied: the config has no such camera"
                ));
                continue;
            };
            for (region, t) in &ov.thresholds {
                let label = region_label(region);
                let in_range = |v: f32| v.is_finite() && (0.0..=1.0).contains(&v);
                if !in_range(t.t2) || t.t1.is_some_and(|t1| !in_range(t1) || t1 > t.t2) {
                    out.notes.push(format!(
                        "thresholds override for camera {name}, {label} not applied: t2 {} / t1 {:?} outside 0 <= t1 <= t2 <= 1",
                        t.t2, t.t1
                    ));
                    continue;
                }
                match find_region(cam, region) {
                    Ok(r) if r.calibrated => out.notes.push(format!(
                        "thresholds override for camera {name}, {label} not applied: it decides with its calibration"
                    )),
                    Ok(r) => {
                        r.threshold = t.t2;
                        r.t1 = t.t1;
                        if region.is_empty() {
                            cam.threshold = t.t2;
                        }
                        out.notes.push(format!(
                            "camera {name}, {label}: T2 {} and T1 {} set by a command",
                            t.t2,
                            t.t1.map_or("none".to_owned(), |v| v.to_string())
                        ));
                    }
                    Err(why) => out.notes.push(format!(
                        "thresholds override for camera {name}, {label} not applied: {why}"
                    )),
                }
            }
            if ov.enabled == Some(false) {
                out.disabled.push(name.clone());
                out.notes
                    .push(format!("camera {name} disabled by a command"));
            }
        }
        cfg.cameras.retain(|c| !out.disabled.contains(&c.name));
        out
    }

    /// The overrides after a lasting command, checked against the configuration read from the
    /// file (`file`, before overrides): `Err` says why the command is refused. `Ok` carries a
    /// one-line description of the change. Commands that are not lasting return `Ok(None)`.
    pub fn with(&self, command: &Command, file: &Config) -> Result<Option<(Self, String)>, String> {
        let mut next = self.clone();
        let known = |camera: &str| -> Result<CameraConfig, String> {
            file.cameras
                .iter()
                .find(|c| c.name == camera)
                .cloned()
                .ok_or_else(|| format!("unknown camera {camera:?}"))
        };
        let detail = match command {
            Command::SetThresholds {
                camera,
                region,
                t2,
                t1,
                keep_t1,
            } => {
                let mut cam = known(camera)?;
                let key = region.clone().unwrap_or_default();
                let r = find_region(&mut cam, &key)?;
                let t1 = if *keep_t1 {
                    self.cameras
                        .get(camera)
                        .and_then(|o| o.thresholds.get(&key))
                        .map_or(r.t1, |o| o.t1)
                        .filter(|t1| t1 <= t2)
                } else {
                    *t1
                };
                let t1 = &t1;
                if r.calibrated {
                    return Err(format!(
                        "camera {camera}, {} decides with its calibration (calibration = true): recalibrate it, or hand-set its thresholds in the config file",
                        region_label(&key)
                    ));
                }
                next.cameras
                    .entry(camera.clone())
                    .or_default()
                    .thresholds
                    .insert(key.clone(), Thresholds { t2: *t2, t1: *t1 });
                format!(
                    "camera {camera}, {}: T2 {t2}, T1 {}",
                    region_label(&key),
                    t1.map_or("none".to_owned(), |v| v.to_string())
                )
            }
            Command::SetEnabled { camera, enabled } => {
                known(camera)?;
                let e = next.cameras.entry(camera.clone()).or_default();
                e.enabled = (!enabled).then_some(false);
                if e.is_empty() {
                    next.cameras.remove(camera);
                }
                format!(
                    "camera {camera} {}",
                    if *enabled { "enabled" } else { "disabled" }
                )
            }
            Command::ClearOverrides { camera: Some(c) } => {
                if next.cameras.remove(c).is_none() {
                    return Ok(Some((next, format!("camera {c} had no overrides"))));
                }
                format!("overrides of camera {c} cleared: the config file applies")
            }
            Command::ClearOverrides { camera: None } => {
                let n = next.cameras.len();
                next.cameras.clear();
                format!("overrides of {n} camera(s) cleared: the config file applies")
            }
            Command::AckAlarm { .. } | Command::StartCalibration { .. } => return Ok(None),
        };
        Ok(Some((next, detail)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FsChecks, parse_config};

    fn cfg(extra: &str) -> Config {
        let doc = format!(
            "node_id = \"n\"\n[model]\npackage = \"p\"\n[mqtt]\nhost = \"h\"\n\
             [[camera]]\nname = \"a\"\nuri = \"rtsp://cam-a/s\"\n\
             [[camera]]\nname = \"b\"\nuri = \"rtsp://cam-b/s\"\n\
             [[camera.region]]\nname = \"left\"\nrect = [0.0, 0.0, 0.5, 1.0]\n{extra}"
        );
        parse_config(&doc, "test.toml", FsChecks::Disabled).unwrap_or_else(|e| panic!("{e}"))
    }

    fn reason(payload: &str) -> String {
        parse(payload.as_bytes()).expect_err(payload).reason
    }

    #[test]
    fn requests_parse_into_commands() {
        let r = parse(br#"{"id":"c1","cmd":"set_thresholds","camera":"a","t2":0.7,"t1":0.5}"#)
            .expect("valid");
        assert_eq!(r.id.as_deref(), Some("c1"));
        assert_eq!(
            r.command,
            Command::SetThresholds {
                camera: "a".into(),
                region: None,
                t2: 0.7,
                t1: Some(0.5),
                keep_t1: false,
            }
        );
        let r = parse(br#"{"cmd":"disable_camera","camera":"a"}"#).expect("valid");
        assert_eq!(r.command.name(), "disable_camera");
        let r = parse(br#"{"cmd":"clear_overrides"}"#).expect("valid");
        assert_eq!(r.command, Command::ClearOverrides { camera: None });
        let r = parse(br#"{"cmd":"ack_alarm","camera":"b","region":"left"}"#).expect("valid");
        assert_eq!(r.command.camera(), Some("b"));
        let r = parse(
            br#"{"cmd":"start_calibration","camera":"b","region":"left","frames":200,"rate":0.01}"#,
        )
        .expect("valid");
        assert_eq!(r.command.name(), "start_calibration");
    }

    #[test]
    fn bad_requests_name_the_field_and_keep_the_id() {
        assert!(
            reason("[1,2]").starts_with("not a command"),
            "{}",
            reason("[1,2]")
        );
        assert!(reason(r#"{"cmd":"reboot"}"#).contains("unknown cmd \"reboot\""));
        assert!(reason(r#"{"cmd":"set_thresholds","camera":"a"}"#).contains("t2 is required"));
        assert!(
            reason(r#"{"cmd":"set_thresholds","camera":"a","t2":1.5}"#)
                .contains("t2 must be a number in [0, 1], got 1.5")
        );
        assert!(
            reason(r#"{"cmd":"set_thresholds","camera":"a","t2":0.5,"t1":0.6}"#)
                .contains("t1 (0.6) is above t2 (0.5)")
        );
        assert!(reason(r#"{"cmd":"set_thresholds","t2":0.5}"#).contains("camera is required"));
        assert!(reason(r#"{"cmd":"ack_alarm","camera":"a/b"}"#).contains("not a camera name"));
        assert!(
            reason(r#"{"cmd":"disable_camera","camera":"a","t2":0.5}"#)
                .contains("t2 is not a field of disable_camera")
        );
        assert!(reason(r#"{"cmd":"ack_alarm","camera":"a","colour":1}"#).contains("colour"));
        assert!(
            reason(r#"{"cmd":"set_thresholds","camera":"a","t2":"high"}"#)
                .contains("not a command")
        );
        let big = format!(r#"{{"cmd":"ack_alarm","camera":"{}"}}"#, "a".repeat(5000));
        assert!(reason(&big).contains("exceeds 4096"));
        // The id survives a bad field, so the PLC can correlate the refusal.
        let r = parse(br#"{"id":"c9","cmd":"set_thresholds","camera":"a","t2":"x"}"#)
            .expect_err("bad t2");
        assert_eq!(r.id.as_deref(), Some("c9"));
        let ack = Ack::rejected(&r, "mqtt");
        let v: serde_json::Value = serde_json::from_slice(&ack.to_json()).expect("json");
        assert_eq!(v["ok"], false);
        assert_eq!(v["id"], "c9");
        let long_id = format!(r#"{{"id":"{}","cmd":"clear_overrides"}}"#, "x".repeat(65));
        assert!(reason(&long_id).contains("id must be 1 to 64"));
    }

    #[test]
    fn lasting_commands_change_the_overrides_and_apply_over_the_file() {
        let file = cfg("");
        let ov = Overrides::default();
        let set = |ov: &Overrides, c: Command| ov.with(&c, &file).map(|o| o.map(|(o, _)| o));
        let ov = set(
            &ov,
            Command::SetThresholds {
                camera: "a".into(),
                region: None,
                t2: 0.8,
                t1: Some(0.6),
                keep_t1: false,
            },
        )
        .expect("ok")
        .expect("lasting");
        let ov = set(
            &ov,
            Command::SetThresholds {
                camera: "b".into(),
                region: Some("left".into()),
                t2: 0.9,
                t1: None,
                keep_t1: false,
            },
        )
        .expect("ok")
        .expect("lasting");
        let ov = set(
            &ov,
            Command::SetEnabled {
                camera: "b".into(),
                enabled: false,
            },
        )
        .expect("ok")
        .expect("lasting");
        // A Sparkplug write of T2 keeps the T1 in force while it is at most the new T2.
        let keep = |t2: f32| Command::SetThresholds {
            camera: "a".into(),
            region: None,
            t2,
            t1: None,
            keep_t1: true,
        };
        let kept = set(&ov, keep(0.7)).expect("ok").expect("lasting");
        assert_eq!(
            kept.cameras["a"].thresholds[""],
            Thresholds {
                t2: 0.7,
                t1: Some(0.6)
            }
        );
        let dropped = set(&ov, keep(0.5)).expect("ok").expect("lasting");
        assert_eq!(
            dropped.cameras["a"].thresholds[""],
            Thresholds { t2: 0.5, t1: None }
        );
        let mut run = file.clone();
        let applied = ov.apply(&mut run);
        assert_eq!(applied.disabled, ["b"]);
        assert_eq!(run.cameras.len(), 1);
        assert_eq!(run.cameras[0].regions[0].threshold, 0.8);
        assert_eq!(run.cameras[0].regions[0].t1, Some(0.6));
        assert_eq!(run.cameras[0].threshold, 0.8);
        // Enabling again keeps b's thresholds; clearing returns to the file.
        let ov = set(
            &ov,
            Command::SetEnabled {
                camera: "b".into(),
                enabled: true,
            },
        )
        .expect("ok")
        .expect("lasting");
        let mut run = file.clone();
        ov.apply(&mut run);
        assert_eq!(run.cameras.len(), 2);
        assert_eq!(run.cameras[1].regions[0].threshold, 0.9);
        let ov = set(&ov, Command::ClearOverrides { camera: None })
            .expect("ok")
            .expect("lasting");
        assert!(ov.is_empty());
        // Not lasting.
        assert_eq!(
            set(
                &ov,
                Command::AckAlarm {
                    camera: "a".into(),
                    region: None
                }
            ),
            Ok(None)
        );
    }

    #[test]
    fn commands_that_do_not_fit_the_file_are_refused() {
        let file = cfg("");
        let ov = Overrides::default();
        let why = |c: Command| ov.with(&c, &file).expect_err("refused");
        let t = |camera: &str, region: Option<&str>| Command::SetThresholds {
            camera: camera.into(),
            region: region.map(Into::into),
            t2: 0.5,
            t1: None,
            keep_t1: false,
        };
        assert_eq!(why(t("zz", None)), "unknown camera \"zz\"");
        assert!(why(t("b", None)).contains("has named regions"));
        assert!(why(t("b", Some("right"))).contains("no region \"right\""));
        assert!(why(t("a", Some("left"))).contains("no region \"left\""));
        let file = cfg("calibration = true\n");
        let why = ov
            .with(&t("b", Some("left")), &file)
            .expect_err("calibrated");
        assert!(why.contains("decides with its calibration"), "{why}");
    }

    #[test]
    fn the_file_round_trips_and_an_empty_set_removes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ov = Overrides::default();
        assert_eq!(Overrides::load(dir.path()).expect("missing"), ov);
        ov.cameras.insert(
            "a".into(),
            CameraOverride {
                enabled: Some(false),
                thresholds: BTreeMap::from([("".into(), Thresholds { t2: 0.5, t1: None })]),
            },
        );
        ov.save(dir.path()).expect("save");
        assert_eq!(Overrides::load(dir.path()).expect("load"), ov);
        Overrides::default().save(dir.path()).expect("save empty");
        assert!(!Overrides::path(dir.path()).exists());
        std::fs::write(Overrides::path(dir.path()), b"{\"cams\":1}").expect("write");
        let e = Overrides::load(dir.path()).expect_err("corrupt");
        assert!(
            e.to_string()
                .contains("overrides.v1.json: not an overrides file"),
            "{e}"
        );
    }

    #[test]
    fn overrides_that_no_longer_fit_are_noted_not_applied() {
        let mut ov = Overrides::default();
        ov.cameras.insert(
            "gone".into(),
            CameraOverride {
                enabled: Some(false),
                ..Default::default()
            },
        );
        ov.cameras.insert(
            "b".into(),
            CameraOverride {
                enabled: None,
                thresholds: BTreeMap::from([("left".into(), Thresholds { t2: 0.5, t1: None })]),
            },
        );
        ov.cameras.insert(
            "a".into(),
            CameraOverride {
                enabled: None,
                thresholds: BTreeMap::from([("".into(), Thresholds { t2: 5.0, t1: None })]),
            },
        );
        let mut run = cfg("calibration = true\n");
        let applied = ov.apply(&mut run);
        assert_eq!(
            run.cameras[0].threshold, 0.5,
            "an edited file's 5.0 is not applied"
        );
        assert!(
            applied
                .notes
                .iter()
                .any(|n| n.contains("outside 0 <= t1 <= t2 <= 1")),
            "{:?}",
            applied.notes
        );
        assert!(applied.disabled.is_empty());
        assert_eq!(run.cameras.len(), 2);
        assert!(
            applied
                .notes
                .iter()
                .any(|n| n.contains("camera gone not applied")),
            "{:?}",
            applied.notes
        );
        assert!(
            applied
                .notes
                .iter()
                .any(|n| n.contains("decides with its calibration"))
        );
    }
}
