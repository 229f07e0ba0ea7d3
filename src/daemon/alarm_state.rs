//! The last alarm state of each camera region (key `camera` or `camera/region`), kept in the state directory
//! (`<state_dir>/alarm-state.v1.json`, written atomically at every transition), so that an alarm
//! raised before a restart (its retained `active: true` still on the broker) is cleared by the
//! new process's first normal frames instead of staying raised for good.
//!
//! Failure modes: a missing file is an empty state; an unreadable or corrupt one is logged and
//! every alarm starts clear; a failed write is logged (a restart would then forget the state).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{info, warn};

use super::lock;
use crate::config::CameraConfig;
use crate::statedir;

/// File in the state directory holding the last alarm state of each camera (JSON object,
/// camera name → raised).
pub const ALARM_STATE_FILE: &str = "alarm-state.v1.json";

/// The last alarm state of each camera, as the subscribers were told it, kept on disk.
pub(super) struct AlarmStates {
    path: PathBuf,
    raised: Mutex<std::collections::BTreeMap<String, bool>>,
}

impl AlarmStates {
    /// Reads the file in `dir`; missing is empty, unreadable or corrupt is logged and empty.
    /// Only the cameras in `cameras` are kept.
    pub(super) fn load(dir: &Path, cameras: &[CameraConfig]) -> Self {
        let path = dir.join(ALARM_STATE_FILE);
        let mut raised: std::collections::BTreeMap<String, bool> =
            match statedir::read_file(&path) {
                Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                    warn!(path = %path.display(), error = %e, "alarm state file unreadable: every alarm starts clear");
                    Default::default()
                }),
                Ok(None) => Default::default(),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "alarm state file unreadable: every alarm starts clear");
                    Default::default()
                }
            };
        // Keys are region keys: `camera` (the implicit region) or `camera/region`.
        raised.retain(|key, _| {
            cameras.iter().any(|c| {
                c.regions
                    .iter()
                    .any(|r| super::regions::unit_key(&c.name, r.level()) == *key)
            })
        });
        for (camera, _) in raised.iter().filter(|(_, r)| **r) {
            info!(
                camera,
                "alarm raised before the restart: it clears on normal frames"
            );
        }
        Self {
            path,
            raised: Mutex::new(raised),
        }
    }

    pub(super) fn is_raised(&self, camera: &str) -> bool {
        lock(&self.raised).get(camera).copied().unwrap_or(false)
    }

    /// Records a transition and rewrites the file ([`statedir::replace_file`]: temporary file,
    /// fsync, rename; never through a symlink).
    pub(super) fn set(&self, camera: &str, raised: bool) {
        let mut map = lock(&self.raised);
        map.insert(camera.to_owned(), raised);
        self.write(&map);
    }

    /// Forgets a camera removed by a reload, with its regions (their retained alarms are
    /// cleared on the broker), or one region (`camera/region`).
    pub(super) fn forget(&self, key: &str) {
        let mut map = lock(&self.raised);
        let before = map.len();
        let prefix = format!("{key}/");
        map.retain(|k, _| k != key && !k.starts_with(&prefix));
        if map.len() != before {
            self.write(&map);
        }
    }

    fn write(&self, map: &std::collections::BTreeMap<String, bool>) {
        let res = serde_json::to_vec(map)
            .map_err(std::io::Error::other)
            .and_then(|bytes| statedir::replace_file(&self.path, &bytes));
        if let Err(e) = res {
            warn!(path = %self.path.display(), error = %e, "cannot record the alarm state: a restart now would forget it");
        }
    }
}
