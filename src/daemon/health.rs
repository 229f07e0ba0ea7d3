//! The daemon's health: the `stats` report, the metrics snapshot, the systemd notifications
//! (readiness, status line) and the watchdog's progress rule.
//!
//! Input: the shared counters of the worker and the cameras, the publisher's counters. Output:
//! [`Stats`] payloads, [`metrics::Snapshot`]s, `sd_notify` messages. Nothing here fails: a
//! notification that cannot be sent is logged.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::warn;

use super::{Running, Shared, lock, unix_ms};
use crate::camera::CameraState;
use crate::metrics;
use crate::mqtt::PublisherHandle;
use crate::payload::{CameraStats, Stats};

/// Sends an sd_notify message if running under systemd; never fails the caller.
pub(super) fn notify(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(e) = sd_notify::notify(states)
    {
        warn!(error = %e, "sd_notify failed");
    }
}

/// The stats timer: its first tick one period from now; a disabled report (`None`) never ticks.
pub(super) fn stats_timer(every: Option<Duration>) -> tokio::time::Interval {
    let every = every.unwrap_or(Duration::from_secs(3600 * 24 * 365));
    tokio::time::interval_at(tokio::time::Instant::now() + every, every)
}

fn percentile(sorted: &[f32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)])
}

pub(super) fn build_stats(
    shared: &Shared,
    running: &[Running],
    engine: &str,
    window: Duration,
) -> Stats {
    let secs = window.as_secs_f64().max(1e-3);
    let mut cameras = std::collections::BTreeMap::new();
    for r in running {
        // The state lock first, then the camera's counters: every frame scored so far was
        // pulled before `frames_in` is read, so its ordinal is below it and the frames scored in
        // the window are a subset of those received in it (`fps_scored <= fps_in`).
        let mut st = lock(&r.handle.state);
        let cs = r.camera.stats();
        let mut lat = std::mem::take(&mut st.latencies_ms);
        lat.sort_by(f32::total_cmp);
        let window_start = st.frames_in_at_last_stats.min(cs.frames_in);
        let in_now = cs.frames_in - window_start;
        let scored_now = st.scored_in_window.min(in_now);
        st.frames_in_at_last_stats = cs.frames_in;
        st.scored_in_window = 0;
        let status = match cs.status.wire() {
            Some(s) => s.payload(),
            None => cs.status.as_str().to_owned(),
        };
        cameras.insert(
            r.cfg.name.clone(),
            CameraStats {
                fps_in: in_now as f64 / secs,
                fps_scored: scored_now as f64 / secs,
                frames_in: cs.frames_in,
                scored: st.scored,
                dropped_overload: cs.dropped,
                skipped_rate: cs.skipped_rate,
                skipped_corrupt: cs.skipped_corrupt,
                inference_errors: st.inference_errors,
                reconnects: cs.reconnects,
                latency_p50_ms: percentile(&lat, 0.5),
                latency_p99_ms: percentile(&lat, 0.99),
                status,
                regions: st
                    .units
                    .iter_mut()
                    .map(|u| {
                        u.update_drift();
                        let name = u.cfg.name.clone().unwrap_or_else(|| "(frame)".into());
                        (name, u.stats())
                    })
                    .collect(),
            },
        );
    }
    Stats {
        uptime_s: shared.started.elapsed().as_secs(),
        ts_ms: unix_ms(),
        engine: engine.to_string(),
        cameras,
        mqtt: Default::default(),
    }
}

/// The totals and states the metrics follow ([`metrics::Metrics::sync`]): the same counters as
/// [`build_stats`], read without touching its window.
pub(super) fn metrics_snapshot(
    running: &[Running],
    publisher: &PublisherHandle,
) -> metrics::Snapshot {
    let cameras = running
        .iter()
        .map(|r| {
            let st = lock(&r.handle.state);
            let cs = r.camera.stats();
            metrics::CameraSnapshot {
                name: r.cfg.name.clone(),
                instance: r.handle.index,
                up: cs.status == CameraState::Online,
                frames_in: cs.frames_in,
                dropped_overload: cs.dropped,
                skipped_rate: cs.skipped_rate,
                skipped_corrupt: cs.skipped_corrupt,
                inference_errors: st.inference_errors,
                thresholds: st
                    .units
                    .iter()
                    .map(|u| {
                        let region = u
                            .cfg
                            .name
                            .clone()
                            .unwrap_or_else(|| metrics::FRAME_REGION.into());
                        (region, u.rule.t2())
                    })
                    .collect(),
            }
        })
        .collect();
    let c = publisher.counters();
    metrics::Snapshot {
        cameras,
        broker: metrics::BrokerSnapshot {
            connected: c.connected,
            reconnects: c.reconnects,
            queued_alarms: c.queued_alarms,
            queued_inspections: publisher.inspection_counters().0,
        },
    }
}

/// Progress rule of the watchdog: the worker goes round its loop; if any camera is online, a
/// batch was scored within the interval; if the broker is connected and frames are scored, the
/// publisher got messages through. A broker or camera outage is reported, not restarted.
pub(super) fn making_progress(
    shared: &Shared,
    publisher: &PublisherHandle,
    interval: Duration,
) -> bool {
    let now = shared.now_ms();
    let win = interval.as_millis() as u64;
    let worker_alive = now.saturating_sub(shared.heartbeat_ms.load(Ordering::Relaxed)) <= win;
    if !worker_alive {
        return false;
    }
    let any_online = lock(&shared.statuses)
        .values()
        .any(|s| *s == CameraState::Online);
    if !any_online {
        return true;
    }
    let scored_recently = now.saturating_sub(shared.scored_ms.load(Ordering::Relaxed)) <= win;
    if !scored_recently {
        return false;
    }
    if publisher.is_connected() {
        let ok = publisher
            .last_progress()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age <= interval);
        return ok;
    }
    true
}

pub(super) fn status_line(shared: &Shared, publisher: &PublisherHandle) -> String {
    let statuses = lock(&shared.statuses);
    let online = statuses
        .values()
        .filter(|s| **s == CameraState::Online)
        .count();
    let c = publisher.counters();
    format!(
        "cameras online {online}/{}; broker {}; alarms queued {}; results dropped {}",
        statuses.len(),
        if c.connected {
            "connected"
        } else {
            "reconnecting"
        },
        c.queued_alarms,
        c.dropped_results
    )
}
