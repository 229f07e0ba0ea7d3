//! Carrying out commands (`[commands]`) in the daemon's control loop: lasting ones through the
//! overrides file and a reload, alarm acknowledgements on the running regions, calibration
//! captures through the live view.
//!
//! Input: a [`Request`] read by [`crate::commands::parse`] (from `<prefix>/cmd`) or translated
//! from a Sparkplug DCMD. Output: the [`Ack`] to publish on `<prefix>/cmd/ack`; every command is
//! logged with its source and outcome.
//!
//! Order of a lasting command: the config file is read and checked as a reload would (a file
//! that does not load refuses the command, nothing written); the new overrides are checked
//! against it; the overrides file is written (atomically, in the state directory); the reload
//! applies them; the acknowledgement says `ok: true` only after that.
//!
//! Failure modes: every refusal is `ok: false` with one line; nothing here panics or stops the
//! daemon.

use std::path::Path;

use tracing::{info, warn};

use super::cameras::Cameras;
use super::{Shared, lock};
use crate::alarm::AckOutcome;
use crate::commands::{Ack, Command, Overrides, Request};
use crate::config::{self, Config};
use crate::mqtt::PublisherHandle;

/// Reads the overrides of the state directory. A corrupt file is moved aside
/// (`overrides.v1.json.corrupt`) and logged: the config file's values apply.
pub(super) fn load_overrides(state_dir: &Path) -> Overrides {
    match Overrides::load(state_dir) {
        Ok(o) => o,
        Err(e) => {
            let path = Overrides::path(state_dir);
            let aside = path.with_extension("json.corrupt");
            let moved = std::fs::rename(&path, &aside).is_ok();
            warn!(
                error = %e,
                moved_to = %if moved { aside.display().to_string() } else { "(not moved)".into() },
                "commands' overrides unreadable: the config file's values apply"
            );
            Overrides::default()
        }
    }
}

/// What the control loop lends a command.
pub(super) struct Env<'a> {
    pub config_path: &'a Path,
    pub cameras: &'a mut Cameras,
    pub current: &'a Config,
    pub overrides: &'a mut Overrides,
    pub shared: &'a Shared,
    pub publisher: &'a PublisherHandle,
    pub live: Option<&'a crate::live::LiveHub>,
}

/// What a command needs from the control loop after it ran.
pub(super) enum After {
    Nothing,
    /// The overrides changed: reload (the acknowledgement waits for it).
    Reload,
}

/// Carries out `req` as far as it can without the reload; `Err` is the refusal.
pub(super) fn execute(req: &Request, env: &mut Env<'_>) -> Result<(String, After), String> {
    let allowed = env
        .current
        .commands
        .as_ref()
        .is_some_and(|c| c.allow.iter().any(|a| a == req.command.name()));
    if !allowed {
        return Err(format!(
            "{} is not allowed here ([commands] allow)",
            req.command.name()
        ));
    }
    match &req.command {
        Command::AckAlarm { camera, region } => {
            ack_alarm(env, camera, region.as_deref()).map(|d| (d, After::Nothing))
        }
        Command::StartCalibration {
            camera,
            region,
            frames,
            rate,
            unknown_rate,
            min_interval_ms,
        } => {
            let Some(live) = env.live else {
                return Err(
                    "start_calibration needs the live view ([http]): the proposal is reviewed and accepted on /calibrate/<camera>".into(),
                );
            };
            let region = running_region(env, camera, region.as_deref())?;
            let req = crate::live::capture::StartRequest {
                region: region.clone(),
                frames: *frames,
                rate: *rate,
                unknown_rate: *unknown_rate,
                min_interval_ms: min_interval_ms.unwrap_or(200),
            };
            live.captures().start(camera, &req)?;
            Ok((
                format!(
                    "calibration capture of {frames} frames started for camera {camera}{}: review and accept it on /calibrate/{camera}",
                    if region.is_empty() {
                        String::new()
                    } else {
                        format!(", region {region}")
                    }
                ),
                After::Nothing,
            ))
        }
        lasting => {
            let file = config::load_config(env.config_path).map_err(|e| {
                format!(
                    "the config file does not load now, nothing changed: {}",
                    e.to_string().lines().next().unwrap_or_default()
                )
            })?;
            let Some((next, detail)) = env.overrides.with(lasting, &file)? else {
                return Err("not a lasting command".into());
            };
            next.save(&env.current.state_dir)
                .map_err(|e| format!("cannot write the overrides, nothing changed: {e}"))?;
            *env.overrides = next;
            Ok((detail, After::Reload))
        }
    }
}

/// The region name (`""` for the implicit one) of a running camera, or why not.
fn running_region(env: &Env<'_>, camera: &str, region: Option<&str>) -> Result<String, String> {
    let Some(r) = env.cameras.running.iter().find(|r| r.cfg.name == camera) else {
        return Err(not_running(env, camera));
    };
    let named = r.cfg.has_named_regions();
    match region {
        None if named => Err(format!(
            "camera {camera} has named regions: say which (region)"
        )),
        None => Ok(String::new()),
        Some(name) if r.cfg.regions.iter().any(|g| g.level() == Some(name)) => Ok(name.to_owned()),
        Some(name) => Err(format!("camera {camera} has no region {name:?}")),
    }
}

fn not_running(env: &Env<'_>, camera: &str) -> String {
    if env.cameras.disabled.iter().any(|d| d == camera) {
        format!("camera {camera} is disabled")
    } else {
        format!("unknown camera {camera:?}")
    }
}

/// Acknowledges the alarm of one region, or of every region of the camera (`region: None` on
/// a camera with named regions). A held latched alarm clears now (published like any clear).
fn ack_alarm(env: &mut Env<'_>, camera: &str, region: Option<&str>) -> Result<String, String> {
    let Some(r) = env.cameras.running.iter().find(|r| r.cfg.name == camera) else {
        return Err(not_running(env, camera));
    };
    if let Some(name) = region
        && !r.cfg.regions.iter().any(|g| g.level() == Some(name))
    {
        return Err(format!("camera {camera} has no region {name:?}"));
    }
    let mut st = lock(&r.handle.state);
    let mut cleared = Vec::new();
    let mut pending = Vec::new();
    for u in st
        .units
        .iter_mut()
        .filter(|u| region.is_none() || u.cfg.level() == region)
    {
        let label = u.cfg.name.clone().unwrap_or_else(|| "whole frame".into());
        match u.debouncer.acknowledge() {
            AckOutcome::NotRaised => {}
            AckOutcome::Pending => pending.push(label),
            AckOutcome::Cleared => {
                info!(
                    camera,
                    region = u.cfg.name.as_deref().unwrap_or(""),
                    "alarm acknowledged: cleared"
                );
                let frame = u.last.unwrap_or((0, super::unix_ms(), 0.0));
                super::worker::alarm_transition(env.shared, env.publisher, camera, u, false, frame);
                cleared.push(label);
            }
        }
    }
    if cleared.is_empty() && pending.is_empty() {
        return Ok(format!("camera {camera}: no alarm raised"));
    }
    let mut parts = Vec::new();
    if !cleared.is_empty() {
        parts.push(format!("cleared: {}", cleared.join(", ")));
    }
    if !pending.is_empty() {
        parts.push(format!(
            "acknowledged, still anomalous (clears after {} normal frames): {}",
            st.units
                .first()
                .map_or(0, |u| u.debouncer.config().clear_count),
            pending.join(", ")
        ));
    }
    Ok(format!("camera {camera}: {}", parts.join("; ")))
}

/// Logs a command's outcome and builds its acknowledgement.
pub(super) fn ack(req: &Request, source: &'static str, outcome: Result<String, String>) -> Ack {
    match outcome {
        Ok(detail) => {
            info!(
                source,
                id = req.id.as_deref().unwrap_or(""),
                cmd = req.command.name(),
                camera = req.command.camera().unwrap_or(""),
                detail,
                "command carried out"
            );
            Ack::done(req, source, detail)
        }
        Err(why) => {
            warn!(
                source,
                id = req.id.as_deref().unwrap_or(""),
                cmd = req.command.name(),
                camera = req.command.camera().unwrap_or(""),
                why,
                "command refused"
            );
            Ack::refused(req, source, why)
        }
    }
}
