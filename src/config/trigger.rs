//! `[trigger]`: how triggered-inspection requests (`<prefix>/<camera>/inspect`) are served.
//!
//! Input: the optional `[trigger]` table as written. Output: a [`TriggerConfig`] (defaults
//! when the table is absent). Failure modes: a value out of range is a problem at its key.

use std::time::Duration;

use serde::Deserialize;

use crate::config::problems::{Ctx, S, in_range};

/// `[trigger]`, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerConfig {
    /// `settle_ms`: the inspected frame is the first captured at or after the request's
    /// arrival plus this (0 to 10 000 ms, default 0).
    pub settle: Duration,
    /// `timeout_ms`: a request without `deadline_ms` is answered `TIMEOUT` after this
    /// (1 to 600 000 ms, default 2000); a request's own `deadline_ms` is capped at the maximum.
    pub timeout: Duration,
    /// `repeat_window_s`: a repeated `meas_id` on the same camera within this window gets the
    /// first result again (same `result_id`) instead of a new inspection (0 to 86 400 s,
    /// default 600; 0 = every request is inspected).
    pub repeat_window: Duration,
    /// `repeat_max`: at most this many results are remembered for repeats (0 to 100 000,
    /// default 1000; the oldest is forgotten first).
    pub repeat_max: usize,
    /// `max_pending`: requests waiting for a frame, per camera (1 to 1000, default 16); a
    /// request beyond it is answered `ERROR` with reason `busy`.
    pub max_pending: usize,
}

/// Largest `timeout_ms` / `deadline_ms`.
pub const MAX_TRIGGER_TIMEOUT_MS: u64 = 600_000;

impl Default for TriggerConfig {
    fn default() -> Self {
        Self {
            settle: Duration::ZERO,
            timeout: Duration::from_millis(2000),
            repeat_window: Duration::from_secs(600),
            repeat_max: 1000,
            max_pending: 16,
        }
    }
}

/// `[trigger]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrigger {
    settle_ms: S<u64>,
    timeout_ms: S<u64>,
    repeat_window_s: S<u64>,
    repeat_max: S<u64>,
    max_pending: S<u64>,
}

/// Checks `[trigger]`; out-of-range values are reported and the default kept.
pub(crate) fn resolve_trigger(ctx: &mut Ctx<'_>, raw: Option<&RawTrigger>) -> TriggerConfig {
    let mut t = TriggerConfig::default();
    let Some(r) = raw else {
        return t;
    };
    if let Some(v) = &r.settle_ms
        && in_range(ctx, v, "trigger.settle_ms", 0, 10_000)
    {
        t.settle = Duration::from_millis(*v.get_ref());
    }
    if let Some(v) = &r.timeout_ms
        && in_range(ctx, v, "trigger.timeout_ms", 1, MAX_TRIGGER_TIMEOUT_MS)
    {
        t.timeout = Duration::from_millis(*v.get_ref());
    }
    if let Some(v) = &r.repeat_window_s
        && in_range(ctx, v, "trigger.repeat_window_s", 0, 86_400)
    {
        t.repeat_window = Duration::from_secs(*v.get_ref());
    }
    if let Some(v) = &r.repeat_max
        && in_range(ctx, v, "trigger.repeat_max", 0, 100_000)
    {
        t.repeat_max = *v.get_ref() as usize;
    }
    if let Some(v) = &r.max_pending
        && in_range(ctx, v, "trigger.max_pending", 1, 1000)
    {
        t.max_pending = *v.get_ref() as usize;
    }
    t
}
