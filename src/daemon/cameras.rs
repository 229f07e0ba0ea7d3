//! The set of running cameras: starting them, and applying a reloaded configuration as a plan.
//!
//! Input: `[[camera]]` entries. Output: [`Running`] cameras whose [`CamHandle`]s the worker
//! reads (published into [`Shared::cams`] after every change), and camera statuses on MQTT.
//!
//! A reload is computed first as a pure [`plan`] (tested below) — keep (apply thresholds, alarm
//! and mask settings in place), restart (new source, rate cap or retry backoff: the alarm state
//! and `seq` numbering carry over to the new instance), start, stop — then carried out.
//!
//! Failure modes: a camera that cannot start is reported `error: <reason>` and the others run;
//! a camera that does not stop within its deadline is logged and left behind.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use tracing::{error, info, warn};

use super::health::{notify, status_line};
use super::{CamHandle, CamState, Running, Shared, lock};
use crate::camera::{self, Camera, FrameNotify};
use crate::config::{self, CameraConfig, Config};
use crate::mqtt::PublisherHandle;
use crate::payload;

/// One step of a reload, by camera name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// Same source, rate cap and backoff: settings applied in place.
    Keep(String),
    /// Source, rate cap or backoff changed: stop, then start a new instance with the old state.
    Restart(String),
    /// Not in the new file: stop, publish `offline` once, clear its retained topics, forget it.
    Stop(String),
    /// New in the file.
    Start(String),
}

/// What a reload from `old` to `new` does to each camera: the running cameras in their order
/// (keep, restart or stop), then the new ones in the file's order.
pub(super) fn plan(old: &[CameraConfig], new: &[CameraConfig]) -> Vec<Step> {
    let mut steps = Vec::new();
    for o in old {
        steps.push(match new.iter().find(|c| c.name == o.name) {
            // Named regions need full-resolution frames, the implicit one scaled frames: the
            // camera's pipeline changes with that, so it restarts.
            Some(c)
                if c.source == o.source
                    && c.max_fps == o.max_fps
                    && c.retry == o.retry
                    && c.has_named_regions() == o.has_named_regions() =>
            {
                Step::Keep(o.name.clone())
            }
            Some(_) => Step::Restart(o.name.clone()),
            None => Step::Stop(o.name.clone()),
        });
    }
    for c in new {
        if !old.iter().any(|o| o.name == c.name) {
            steps.push(Step::Start(c.name.clone()));
        }
    }
    steps
}

/// The running cameras and what starting one needs.
pub(super) struct Cameras {
    pub(super) running: Vec<Running>,
    size: usize,
    next_index: usize,
    notify_frames: Arc<FrameNotify>,
    publisher: PublisherHandle,
    shared: Arc<Shared>,
    /// Cameras disabled by a command ([`crate::commands::Overrides`]): not running, status
    /// `disabled`, retained topics kept.
    pub(super) disabled: Vec<String>,
}

impl Cameras {
    /// No cameras yet; frames are scaled to `size × size`.
    pub(super) fn new(
        size: usize,
        notify_frames: Arc<FrameNotify>,
        publisher: PublisherHandle,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            running: Vec::new(),
            size,
            next_index: 0,
            notify_frames,
            publisher,
            shared,
            disabled: Vec::new(),
        }
    }

    /// Starts every camera of `cfg` (a failing one is reported and skipped) and publishes the
    /// handles to the worker.
    pub(super) fn start_all(&mut self, cfg: &[CameraConfig], disabled: &[String]) {
        for c in cfg {
            self.start_or_report(c, None);
        }
        self.disabled = disabled.to_vec();
        for name in disabled {
            self.publish_disabled(name);
        }
        self.publish_handles();
    }

    /// A camera disabled by a command: `disabled` (retained), a dead Sparkplug device.
    fn publish_disabled(&self, name: &str) {
        info!(camera = %name, "camera disabled by a command (enable_camera or clear_overrides enables it)");
        self.publisher
            .camera_status(name, payload::CameraStatus::Disabled);
        if let Some(s) = &self.shared.sparkplug {
            s.status(name, "disabled", true);
        }
    }

    /// Takes every running camera (for the stop path).
    pub(super) fn take_all(&mut self) -> Vec<Running> {
        std::mem::take(&mut self.running)
    }

    fn start_or_report(
        &mut self,
        c: &CameraConfig,
        carried: Option<(Arc<Mutex<CamState>>, CameraConfig)>,
    ) {
        match self.start(c, carried) {
            Ok(r) => self.running.push(r),
            Err(e) => {
                error!(camera = %c.name, error = %e, "camera could not start");
                if let Some(s) = &self.shared.sparkplug {
                    s.status(&c.name, &format!("error: {e}"), true);
                }
                self.publisher
                    .camera_status(&c.name, payload::CameraStatus::Error(e.to_string()));
            }
        }
    }

    /// Starts camera `c` as a new instance. `carried`: the state and config of the instance it
    /// replaces (reload with a new source or rate cap), so alarm state and numbering carry on.
    fn start(
        &mut self,
        c: &CameraConfig,
        carried: Option<(Arc<Mutex<CamState>>, CameraConfig)>,
    ) -> Result<Running, camera::CameraError> {
        let index = self.next_index;
        self.next_index += 1;
        let cb: camera::StatusCallback = {
            let publisher = self.publisher.clone();
            let shared = self.shared.clone();
            Arc::new(move |ev: &camera::StatusEvent| {
                lock(&shared.statuses).insert(ev.name.to_string(), ev.status.clone());
                if let Some(s) = &shared.sparkplug {
                    let dead = matches!(
                        ev.status,
                        camera::CameraState::Error {
                            retrying: false,
                            ..
                        }
                    );
                    s.status(&ev.name, &ev.status.to_string(), dead);
                }
                let Some(st) = ev.status.wire() else {
                    return;
                };
                info!(camera = %ev.name, status = %ev.status, "camera status");
                publisher.camera_status(&ev.name, st);
            })
        };
        let camera = Camera::spawn(
            index,
            c.settings(self.size as u32),
            self.notify_frames.clone(),
            cb,
        )?;
        let state = match carried {
            Some((state, old)) => {
                {
                    let mut st = lock(&state);
                    let removed = st.apply(&old, c, &self.shared.validity);
                    st.restarted(index);
                    self.forget_regions(&removed);
                }
                state
            }
            None => Arc::new(Mutex::new(CamState::new(
                c,
                index,
                &|key| self.shared.alarm_states.is_raised(key),
                &self.shared.validity,
            ))),
        };
        self.publish_calibrations(&c.name, &state);
        let handle = CamHandle {
            index,
            name: Arc::from(c.name.as_str()),
            slot: camera.slot().clone(),
            state,
        };
        Ok(Running {
            cfg: c.clone(),
            camera,
            handle,
        })
    }

    /// Publishes (retained) what each region of a camera decides with.
    fn publish_calibrations(&self, camera: &str, state: &Mutex<CamState>) {
        let st = lock(state);
        for u in &st.units {
            self.publisher
                .retained(&u.key, "calibration", u.calibration_message(camera));
        }
    }

    /// Regions removed by a reload: their retained topics are cleared and their alarm state
    /// forgotten.
    fn forget_regions(&self, keys: &[String]) {
        for key in keys {
            info!(region = %key, "reload: region removed");
            self.publisher.forget_camera(key);
            self.shared.alarm_states.forget(key);
        }
    }

    fn publish_handles(&self) {
        let handles: Vec<CamHandle> = self.running.iter().map(|r| r.handle.clone()).collect();
        *self
            .shared
            .cams
            .write()
            .unwrap_or_else(PoisonError::into_inner) = handles;
    }

    /// Carries out a reload plan against `new`'s cameras.
    fn apply_plan(&mut self, steps: &[Step], new: &[CameraConfig]) {
        let by_name = |name: &str| new.iter().find(|c| c.name == name);
        let mut old: HashMap<String, Running> = self
            .running
            .drain(..)
            .map(|r| (r.cfg.name.clone(), r))
            .collect();
        let mut carried: HashMap<String, (Arc<Mutex<CamState>>, CameraConfig)> = HashMap::new();
        let mut keep = Vec::new();
        for step in steps {
            match step {
                Step::Keep(name) => {
                    let (Some(r), Some(c)) = (old.remove(name), by_name(name)) else {
                        continue;
                    };
                    let removed = lock(&r.handle.state).apply(&r.cfg, c, &self.shared.validity);
                    self.forget_regions(&removed);
                    self.publish_calibrations(&c.name, &r.handle.state);
                    keep.push(Running {
                        cfg: c.clone(),
                        ..r
                    });
                }
                Step::Restart(name) | Step::Stop(name) => {
                    let Some(r) = old.remove(name) else { continue };
                    info!(camera = %name, "reload: stopping camera");
                    let removed = matches!(step, Step::Stop(_));
                    if removed {
                        // Frames of it still in the worker are dropped, not published.
                        lock(&r.handle.state).index = usize::MAX;
                    }
                    if let Err(e) = r.camera.stop() {
                        warn!(camera = %name, error = %e, "camera did not stop cleanly");
                    }
                    lock(&self.shared.statuses).remove(name);
                    if removed && self.disabled.contains(name) {
                        // Disabled, not removed: its retained topics and alarm state stay.
                        self.publish_disabled(name);
                    } else if removed {
                        // Stopped for good: `offline`, then its retained status and alarm are
                        // cleared and the publisher forgets it.
                        self.publisher
                            .camera_status(name, payload::CameraStatus::Offline);
                        self.publisher.forget_camera(name);
                        self.shared.alarm_states.forget(name);
                        for region in r.cfg.regions.iter().filter_map(|g| g.level()) {
                            self.publisher.forget_camera(&format!("{name}/{region}"));
                        }
                    } else {
                        carried.insert(name.clone(), (r.handle.state.clone(), r.cfg.clone()));
                    }
                }
                Step::Start(_) => {}
            }
        }
        self.running = keep;
        // Restarted and new cameras start in the file's order.
        for c in new {
            let restart = steps.contains(&Step::Restart(c.name.clone()));
            let start = steps.contains(&Step::Start(c.name.clone()));
            if restart || start {
                info!(camera = %c.name, "reload: starting camera");
                let old = carried.remove(&c.name);
                self.start_or_report(c, old);
            }
        }
        self.publish_handles();
    }

    /// SIGHUP: re-read and validate the config; apply camera settings in place, restart
    /// cameras whose source, rate cap or retry backoff changed (their alarm state and `seq`
    /// numbering carry over), start added ones, stop removed ones; keep the MQTT session. (The
    /// caller applies a changed stats interval.) An invalid file is rejected and the running
    /// config stays.
    pub(super) fn reload(
        &mut self,
        path: &Path,
        overrides: &crate::commands::Overrides,
        current: &mut Config,
    ) -> Result<(), String> {
        let now = sd_notify::NotifyState::monotonic_usec_now();
        match &now {
            Ok(m) => notify(&[sd_notify::NotifyState::Reloading, m.clone()]),
            Err(_) => notify(&[sd_notify::NotifyState::Reloading]),
        }
        let outcome = match config::load_config(path) {
            Err(e) => {
                for line in e.to_string().lines() {
                    error!("reload rejected: {line}");
                }
                error!("reload rejected: keeping the running configuration");
                Err(e.to_string().lines().next().unwrap_or_default().to_owned())
            }
            Ok(mut new) => {
                let applied = overrides.apply(&mut new);
                for note in &applied.notes {
                    info!("override: {note}");
                }
                self.disabled = applied.disabled;
                for (what, changed) in [
                    ("node_id", new.node_id != current.node_id),
                    ("state_dir", new.state_dir != current.state_dir),
                    ("[mqtt]", new.mqtt != current.mqtt),
                    ("[model]", new.model != current.model),
                    ("[engine]", new.engine != current.engine),
                    ("[commands]", new.commands != current.commands),
                ] {
                    if changed {
                        warn!("reload: {what} changed; it takes effect at the next restart");
                    }
                }
                let old: Vec<CameraConfig> = self.running.iter().map(|r| r.cfg.clone()).collect();
                let steps = plan(&old, &new.cameras);
                self.apply_plan(&steps, &new.cameras);
                let mut applied = new;
                applied.node_id = current.node_id.clone();
                applied.state_dir = current.state_dir.clone();
                applied.mqtt = current.mqtt.clone();
                applied.model = current.model.clone();
                applied.engine = current.engine.clone();
                applied.commands = current.commands.clone();
                *current = applied;
                info!(cameras = self.running.len(), "configuration reloaded");
                Ok(())
            }
        };
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status_line(&self.shared, &self.publisher)),
        ]);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::camera::Source;
    use crate::config::{FsChecks, parse_config};

    fn cams(text: &str) -> Vec<CameraConfig> {
        let doc =
            format!("node_id = \"n\"\n[model]\npackage = \"p\"\n[mqtt]\nhost = \"h\"\n{text}");
        parse_config(&doc, "test.toml", FsChecks::Disabled)
            .unwrap_or_else(|e| panic!("{e}"))
            .cameras
    }

    const A: &str = "[[camera]]\nname = \"a\"\nuri = \"rtsp://cam-a/s\"\n";
    const B: &str = "[[camera]]\nname = \"b\"\nuri = \"rtsp://cam-b/s\"\n";

    #[test]
    fn unchanged_cameras_are_kept_and_threshold_changes_apply_in_place() {
        let old = cams(&format!("{A}{B}"));
        let new = cams(&format!("{A}threshold = 0.7\n{B}"));
        assert_eq!(
            plan(&old, &new),
            [Step::Keep("a".into()), Step::Keep("b".into())]
        );
    }

    #[test]
    fn a_new_source_rate_cap_or_backoff_restarts_the_camera() {
        let old = cams(&format!("{A}{B}"));
        for changed in [
            "[[camera]]\nname = \"a\"\nuri = \"rtsp://other/s\"\n".to_string(),
            format!("{A}max_fps = 2.0\n"),
            format!("{A}[camera.retry]\ninitial_ms = 200\n"),
        ] {
            let new = cams(&format!("{changed}{B}"));
            assert_eq!(
                plan(&old, &new),
                [Step::Restart("a".into()), Step::Keep("b".into())],
                "{changed}"
            );
        }
    }

    #[test]
    fn removed_cameras_stop_and_added_ones_start_in_file_order() {
        let old = cams(&format!("{A}{B}"));
        let c = "[[camera]]\nname = \"c\"\nuri = \"rtsp://cam-c/s\"\n";
        let d = "[[camera]]\nname = \"d\"\npipeline = \"videotestsrc ! appsink name=sink\"\n";
        let new = cams(&format!("{d}{B}{c}"));
        assert!(matches!(new[0].source, Source::Pipeline(_)));
        assert_eq!(
            plan(&old, &new),
            [
                Step::Stop("a".into()),
                Step::Keep("b".into()),
                Step::Start("d".into()),
                Step::Start("c".into()),
            ]
        );
        assert_eq!(
            plan(&old, &[]),
            [Step::Stop("a".into()), Step::Stop("b".into())]
        );
        assert_eq!(
            plan(&[], &old),
            [Step::Start("a".into()), Step::Start("b".into())]
        );
    }
}
