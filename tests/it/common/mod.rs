//! Helpers shared by the integration tests.

#![allow(dead_code)] // Each test binary uses a different part of the helpers.

pub mod broker;
pub mod cdp;
pub mod daemon;
pub mod fx;
pub mod golden;
pub mod mjpeg;
pub mod rtsp;

#[allow(unused_imports)] // Not every test binary uses the fixture helpers.
pub use fx::*;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anomalyclip_edge::camera::{CameraState, StatusCallback, StatusEvent};

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Records every status event of the cameras it is given to.
#[derive(Clone, Default)]
pub struct StatusLog(Arc<Mutex<Vec<StatusEvent>>>);

impl StatusLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// A callback that appends to this log.
    pub fn callback(&self) -> StatusCallback {
        let log = self.clone();
        Arc::new(move |event: &StatusEvent| {
            log.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(event.clone());
        })
    }

    /// The statuses reported for camera `index`, in order.
    pub fn of(&self, index: usize) -> Vec<CameraState> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|e| e.camera == index)
            .map(|e| e.status.clone())
            .collect()
    }

    /// Short names (`online`, `error`…) of camera `index`'s statuses, in order.
    pub fn names(&self, index: usize) -> Vec<&'static str> {
        self.of(index).iter().map(CameraState::as_str).collect()
    }

    /// Waits until camera `index` has reported a status matching `pred`.
    pub fn wait_for(
        &self,
        index: usize,
        timeout: Duration,
        pred: impl Fn(&CameraState) -> bool,
    ) -> bool {
        wait_until(timeout, || self.of(index).iter().any(&pred))
    }

    /// Waits until camera `index` has reported `count` statuses matching `pred`.
    pub fn wait_for_nth(
        &self,
        index: usize,
        count: usize,
        timeout: Duration,
        pred: impl Fn(&CameraState) -> bool,
    ) -> bool {
        wait_until(timeout, || {
            self.of(index).iter().filter(|s| pred(s)).count() >= count
        })
    }
}

/// Logs to the test output when `RUST_LOG` is set (`RUST_LOG=info cargo test -- --nocapture`).
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// The venv's Python (`scripts/setup`: numpy, protobuf, prometheus_client, …), or
/// `ANOMALYCLIP_PYTHON`.
pub fn venv_python() -> std::path::PathBuf {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.is_file() {
        return venv;
    }
    std::env::var_os("ANOMALYCLIP_PYTHON")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .expect("no .venv/bin/python and ANOMALYCLIP_PYTHON unset (run scripts/setup)")
}
