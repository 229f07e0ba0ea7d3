//! The per-camera supervisor thread: build, play, watch the bus and the watchdog, back off,
//! retry. Also the appsink callback (streaming thread) that turns samples into [`Frame`]s and
//! reports `Online` before the first frame of each attempt reaches the slot.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;

use super::pipeline::{self, Built, Plan};
use super::{
    CameraCounters, CameraError, CameraSettings, CameraState, Frame, LatestSlot, StatusCallback,
    StatusEvent,
};

/// How often the supervisor wakes to check the stop signal, first frame and watchdog.
const POLL: Duration = Duration::from_millis(50);

/// An attempt whose frames are all dropped by the keyframe gate fails after this many times
/// `no_frame_timeout` (30 s by default: longer than any GOP a camera should use).
const KEYFRAME_WAIT_FACTOR: u32 = 3;

/// State shared by the camera handle, the supervisor thread and the appsink callback.
pub(crate) struct Shared {
    pub index: usize,
    pub name: Arc<str>,
    pub slot: Arc<LatestSlot>,
    on_status: StatusCallback,
    status: Mutex<CameraState>,
    last_error: Mutex<Option<String>>,
    frames_in: AtomicU64,
    skipped_rate: AtomicU64,
    reconnects: AtomicU64,
    /// Buffers dropped by the keyframe gate (shared with the pad probes).
    skipped_corrupt: Arc<AtomicU64>,
    next_seq: AtomicU64,
    /// Reference for `last_frame_ns`.
    epoch: Instant,
    /// Nanoseconds after `epoch` plus one at which the last sample was pulled; 0: none yet.
    last_frame_ns: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub fn new(
        index: usize,
        name: Arc<str>,
        slot: Arc<LatestSlot>,
        on_status: StatusCallback,
    ) -> Self {
        Self {
            index,
            name,
            slot,
            on_status,
            status: Mutex::new(CameraState::Starting),
            last_error: Mutex::new(None),
            frames_in: AtomicU64::new(0),
            skipped_rate: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            skipped_corrupt: Arc::new(AtomicU64::new(0)),
            next_seq: AtomicU64::new(0),
            epoch: Instant::now(),
            last_frame_ns: AtomicU64::new(0),
        }
    }

    pub fn status(&self) -> CameraState {
        lock(&self.status).clone()
    }

    /// Stores the state and reports it, if it changed (`force`: report anyway, for the
    /// initial `Starting`). Called by the camera thread, and by the streaming thread for
    /// `Online` while the attempt runs (the camera thread reports nothing then, and stops the
    /// streaming thread before it reports again), so reports arrive in order.
    fn set_status(&self, status: CameraState) {
        self.update_status(status, false);
    }

    fn update_status(&self, status: CameraState, force: bool) {
        {
            let mut current = lock(&self.status);
            if *current == status && !force {
                return;
            }
            *current = status.clone();
        }
        tracing::info!(camera = %self.name, status = %status, "camera status");
        (self.on_status)(&StatusEvent {
            camera: self.index,
            name: Arc::clone(&self.name),
            status,
        });
    }

    fn set_last_error(&self, reason: &str) {
        *lock(&self.last_error) = Some(reason.to_owned());
    }

    fn frames_in(&self) -> u64 {
        self.frames_in.load(Ordering::Acquire)
    }

    /// Counts a pulled sample; returns its ordinal (the `frames_in` before it).
    fn mark_frame(&self, now: Instant) -> u64 {
        let ns = now.saturating_duration_since(self.epoch).as_nanos();
        let ns = u64::try_from(ns).unwrap_or(u64::MAX - 1) + 1;
        self.last_frame_ns.store(ns, Ordering::Release);
        self.frames_in.fetch_add(1, Ordering::AcqRel)
    }

    fn last_frame(&self) -> Option<Instant> {
        match self.last_frame_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(self.epoch + Duration::from_nanos(ns - 1)),
        }
    }

    pub fn stats(&self) -> CameraCounters {
        CameraCounters {
            status: self.status(),
            frames_in: self.frames_in(),
            skipped_rate: self.skipped_rate.load(Ordering::Relaxed),
            delivered: self.slot.delivered(),
            dropped: self.slot.dropped(),
            skipped_corrupt: self.skipped_corrupt.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            last_frame_age: self.last_frame().map(|t| t.elapsed()),
            last_error: lock(&self.last_error).clone(),
        }
    }

    /// A configuration fault: report it and end the camera (no retry).
    fn fail_config(&self, error: CameraError) {
        let reason = error.to_string();
        tracing::error!(camera = %self.name, %reason, "camera cannot start; not retrying");
        self.set_last_error(&reason);
        self.set_status(CameraState::Error {
            reason,
            retrying: false,
        });
    }
}

/// The camera thread's body. Never panics outward: a panic becomes an `Error` status.
pub(crate) fn run(shared: Arc<Shared>, settings: CameraSettings, stop: Receiver<()>) {
    let result = catch_unwind(AssertUnwindSafe(|| supervise(&shared, &settings, &stop)));
    if result.is_err() {
        tracing::error!(camera = %shared.name, "camera thread panicked");
        shared.set_status(CameraState::Error {
            reason: "internal error: the camera thread panicked".into(),
            retrying: false,
        });
    }
}

/// Why an attempt ended.
enum Outcome {
    Stopped,
    Failed(Failure),
}

struct Failure {
    reason: String,
    /// Needs a human: report `Error` and retry slowly.
    persistent: bool,
    /// How long the attempt had been online (delivering frames), if it got there.
    online_for: Option<Duration>,
}

/// Delay before the next attempt after `failed_attempts` consecutive failed attempts:
/// `backoff_initial × 2^(n−1)`, capped at `backoff_max` (`backoff_initial` for n ≤ 1).
pub(crate) fn backoff_delay(settings: &CameraSettings, failed_attempts: u32) -> Duration {
    let doublings = failed_attempts.saturating_sub(1).min(31);
    settings
        .backoff_initial
        .saturating_mul(1u32 << doublings)
        .min(settings.backoff_max)
}

fn supervise(shared: &Arc<Shared>, settings: &CameraSettings, stop: &Receiver<()>) {
    shared.update_status(CameraState::Starting, true);
    let plan = match pipeline::plan(settings) {
        Ok(plan) => plan,
        Err(e) => return shared.fail_config(e),
    };
    tracing::info!(camera = %shared.name, pipeline = %plan.display(), "camera starting");
    let mut failed_attempts: u32 = 0;
    let mut first = true;
    // The last failure logged at `warn`: a camera failing the same way every retry logs once.
    let mut last_logged: Option<(String, &'static str)> = None;
    loop {
        if !first {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let built = match pipeline::build(&plan) {
            Ok(built) => built,
            Err(e) => return shared.fail_config(e),
        };
        let failure = match run_attempt(shared, settings, &plan, built, stop) {
            Outcome::Stopped => return,
            Outcome::Failed(failure) => failure,
        };
        let stable = failure
            .online_for
            .is_some_and(|d| d >= settings.stable_after);
        failed_attempts = if stable {
            0
        } else {
            failed_attempts.saturating_add(1)
        };
        let (status, delay) = if failure.persistent {
            (
                CameraState::Error {
                    reason: failure.reason.clone(),
                    retrying: true,
                },
                settings.backoff_max,
            )
        } else {
            (
                CameraState::Reconnecting,
                backoff_delay(settings, failed_attempts),
            )
        };
        if failure.online_for.is_some() {
            last_logged = None;
        }
        let key = (failure.reason.clone(), status.as_str());
        if last_logged.as_ref() == Some(&key) {
            tracing::debug!(
                camera = %shared.name,
                reason = %failure.reason,
                failed_attempts,
                retry_in = ?delay,
                "camera pipeline failed again"
            );
        } else {
            tracing::warn!(
                camera = %shared.name,
                reason = %failure.reason,
                failed_attempts,
                retry_in = ?delay,
                "camera pipeline failed"
            );
            last_logged = Some(key);
        }
        shared.set_last_error(&failure.reason);
        shared.set_status(status);
        match stop.recv_timeout(delay) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Sets the pipeline to `Null` when dropped, on every exit path.
struct PipelineGuard(gst::Pipeline);

impl Drop for PipelineGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.set_state(gst::State::Null) {
            tracing::warn!(error = %e, "failed to set camera pipeline to Null");
        }
    }
}

/// `"<element factory>: <message> (<last debug line>)"`, one line, URIs redacted.
fn describe_error(
    src: Option<&gst::Object>,
    error: &gst::glib::Error,
    debug: Option<&str>,
) -> String {
    let origin = src.map(|s| {
        s.downcast_ref::<gst::Element>()
            .and_then(|e| e.factory())
            .map(|f| f.name().to_string())
            .unwrap_or_else(|| s.name().to_string())
    });
    let mut reason = match origin {
        Some(origin) => format!("{origin}: {}", pipeline::one_line(error.message())),
        None => pipeline::one_line(error.message()),
    };
    // The last debug line often names the cause ("Failed to connect.", "Missing decoder: …").
    if let Some(detail) = debug
        .and_then(|d| d.lines().last())
        .map(str::trim)
        .filter(|d| !d.is_empty() && d.len() <= 200)
    {
        reason.push_str(&format!(" ({detail})"));
    }
    pipeline::redact_text(&reason)
}

fn failed(reason: String, persistent: bool, online_since: Option<Instant>) -> Outcome {
    Outcome::Failed(Failure {
        reason,
        persistent,
        online_for: online_since.map(|t| t.elapsed()),
    })
}

fn run_attempt(
    shared: &Arc<Shared>,
    settings: &CameraSettings,
    plan: &Plan,
    built: Built,
    stop: &Receiver<()>,
) -> Outcome {
    let Built { pipeline, sink } = built;
    let pipeline = PipelineGuard(pipeline);
    pipeline::install_keyframe_gate(&pipeline.0, &shared.skipped_corrupt);
    let mut gate = RateCap::new(settings.max_fps);
    let cb_shared = Arc::clone(shared);
    // Set by the streaming thread when it reports `Online`, before the attempt's first frame.
    let online = AtomicBool::new(false);
    sink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| on_sample(sink, &cb_shared, &mut gate, &online))
            .build(),
    );
    let Some(bus) = pipeline.0.bus() else {
        return failed("the pipeline has no bus".into(), false, None);
    };
    let frames_before = shared.frames_in();
    let started = Instant::now();
    if let Err(e) = pipeline.0.set_state(gst::State::Playing) {
        // The element that refused usually posted the reason on the bus.
        let posted = bus.timed_pop_filtered(gst::ClockTime::ZERO, &[gst::MessageType::Error]);
        return match posted.as_ref().map(|m| m.view()) {
            Some(gst::MessageView::Error(err)) => failed(
                describe_error(err.src(), &err.error(), err.debug().as_deref()),
                pipeline::is_persistent(&err.error()),
                None,
            ),
            _ => failed(format!("the pipeline failed to start: {e}"), false, None),
        };
    }
    let mut online_since: Option<Instant> = None;
    let mut skipped_seen = shared.skipped_corrupt.load(Ordering::Relaxed);
    let mut gated_activity: Option<Instant> = None;
    loop {
        match stop.try_recv() {
            Err(TryRecvError::Empty) => {}
            Ok(()) | Err(TryRecvError::Disconnected) => return Outcome::Stopped,
        }
        if let Some(msg) = bus.timed_pop(gst::ClockTime::from_nseconds(POLL.as_nanos() as u64)) {
            match msg.view() {
                gst::MessageView::Error(err) => {
                    tracing::debug!(camera = %shared.name, debug = ?err.debug(), "bus error");
                    return failed(
                        describe_error(err.src(), &err.error(), err.debug().as_deref()),
                        pipeline::is_persistent(&err.error()),
                        online_since,
                    );
                }
                gst::MessageView::Eos(_) if plan.loops_at_eos() => {
                    let seek = pipeline
                        .0
                        .seek_simple(gst::SeekFlags::FLUSH, gst::ClockTime::ZERO);
                    if let Err(e) = seek {
                        return failed(
                            format!("end of file, and seeking back to the start failed: {e}"),
                            false,
                            online_since,
                        );
                    }
                    tracing::debug!(camera = %shared.name, "end of file; looping");
                }
                gst::MessageView::Eos(_) => {
                    return failed("end of stream".into(), false, online_since);
                }
                gst::MessageView::Warning(w) => {
                    tracing::debug!(
                        camera = %shared.name,
                        warning = %pipeline::one_line(w.error().message()),
                        "pipeline warning"
                    );
                }
                _ => {}
            }
        }
        let now = Instant::now();
        let has_frames = shared.frames_in() > frames_before;
        if has_frames && online_since.is_none() {
            // `Online` was reported by the streaming thread, before the first frame.
            online_since = Some(now);
        }
        // Before the first good frame, buffers dropped by the keyframe gate show the stream is
        // alive (a long GOP): they keep the attempt going, up to `KEYFRAME_WAIT_FACTOR` times
        // the watchdog timeout.
        if !has_frames {
            let skipped = shared.skipped_corrupt.load(Ordering::Relaxed);
            if skipped != skipped_seen {
                skipped_seen = skipped;
                gated_activity = Some(now);
            }
            let limit = settings
                .no_frame_timeout
                .saturating_mul(KEYFRAME_WAIT_FACTOR);
            if gated_activity.is_some() && now.saturating_duration_since(started) >= limit {
                return failed(
                    format!(
                        "no keyframe within {:.1} s: every frame arriving was decoded before a \
                         keyframe or corrupt",
                        limit.as_secs_f32()
                    ),
                    false,
                    None,
                );
            }
        }
        let last = match shared.last_frame() {
            Some(t) if has_frames => t.max(started),
            _ => gated_activity.unwrap_or(started),
        };
        if now.saturating_duration_since(last) >= settings.no_frame_timeout {
            let what = if has_frames {
                "no frame"
            } else {
                "no first frame"
            };
            // A stable text, so that repeated timeouts log once.
            return failed(
                format!(
                    "{what} within {:.1} s (watchdog)",
                    settings.no_frame_timeout.as_secs_f32()
                ),
                false,
                online_since,
            );
        }
    }
}

/// The `max_fps` gate: admits a frame when the next slot in a fixed schedule is due.
/// Long-run rate ≤ `max_fps`; a frame up to a quarter interval early is admitted, so
/// timing jitter of a source at an exact multiple of the cap does not skip extra frames.
pub(crate) struct RateCap {
    interval: Option<Duration>,
    next_due: Option<Instant>,
}

impl RateCap {
    pub fn new(max_fps: Option<f32>) -> Self {
        let interval = max_fps
            .filter(|f| f.is_finite() && *f > 0.0)
            .and_then(|f| Duration::try_from_secs_f64(1.0 / f64::from(f)).ok());
        Self {
            interval,
            next_due: None,
        }
    }

    pub fn admit(&mut self, now: Instant) -> bool {
        let Some(interval) = self.interval else {
            return true;
        };
        match self.next_due {
            Some(due) if now + interval / 4 < due => false,
            Some(due) => {
                let next = due + interval;
                // Fell behind (a slow source or a pause): restart the schedule from now.
                self.next_due = Some(if next <= now { now + interval } else { next });
                true
            }
            None => {
                self.next_due = Some(now + interval);
                true
            }
        }
    }
}

/// The appsink callback (streaming thread): count, gate, copy the RGB plane into a frame,
/// report `Online` on the attempt's first frame, put it in the slot. Never blocks, never
/// panics; failures are flow errors.
fn on_sample(
    sink: &gst_app::AppSink,
    shared: &Shared,
    gate: &mut RateCap,
    online: &AtomicBool,
) -> Result<gst::FlowSuccess, gst::FlowError> {
    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
    let now = Instant::now();
    let wall = SystemTime::now();
    let ordinal = shared.mark_frame(now);
    if !gate.admit(now) {
        shared.skipped_rate.fetch_add(1, Ordering::Relaxed);
        return Ok(gst::FlowSuccess::Ok);
    }
    let frame_error = |what: &str| {
        tracing::warn!(camera = %shared.name, "{what}");
    };
    let buffer = sample.buffer().ok_or_else(|| {
        frame_error("sample without a buffer");
        gst::FlowError::Error
    })?;
    let caps = sample.caps().ok_or_else(|| {
        frame_error("sample without caps");
        gst::FlowError::NotNegotiated
    })?;
    let info = gst_video::VideoInfo::from_caps(caps).map_err(|_| {
        frame_error("sample caps are not raw video");
        gst::FlowError::NotNegotiated
    })?;
    if info.format() != gst_video::VideoFormat::Rgb {
        frame_error("sample is not RGB");
        return Err(gst::FlowError::NotNegotiated);
    }
    let video =
        gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info).map_err(|_| {
            frame_error("cannot map the video frame");
            gst::FlowError::Error
        })?;
    let stride = video
        .plane_stride()
        .first()
        .and_then(|s| usize::try_from(*s).ok())
        .ok_or_else(|| {
            frame_error("negative or missing stride");
            gst::FlowError::Error
        })?;
    let data = video
        .plane_data(0)
        .map_err(|_| {
            frame_error("cannot read the RGB plane");
            gst::FlowError::Error
        })?
        .to_vec();
    let capture_unix_ms = wall
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let frame = Frame {
        camera: shared.index,
        camera_name: Arc::clone(&shared.name),
        seq: shared.next_seq.fetch_add(1, Ordering::Relaxed),
        ordinal,
        capture_unix_ms,
        captured_at: now,
        pts: buffer.pts().map(|t| Duration::from_nanos(t.nseconds())),
        width: video.width(),
        height: video.height(),
        stride,
        data,
    };
    if !online.swap(true, Ordering::Relaxed) {
        // Before the frame is visible to the consumer: `online` precedes the first result.
        shared.set_status(CameraState::Online);
    }
    shared.slot.put(frame);
    Ok(gst::FlowSuccess::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::camera::Source;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut s = CameraSettings::new("c", Source::Uri("rtsp://h/x".into()));
        s.backoff_initial = Duration::from_secs(1);
        s.backoff_max = Duration::from_secs(30);
        let delays: Vec<u64> = (0..8).map(|n| backoff_delay(&s, n).as_secs()).collect();
        assert_eq!(delays, vec![1, 1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff_delay(&s, u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn rate_cap_admits_every_third_frame_of_15_fps_at_5() {
        let mut cap = RateCap::new(Some(5.0));
        let t0 = Instant::now();
        // 15 fps for 3 s; every other frame 3 ms early (timing jitter).
        let admitted = (0..45u64)
            .filter(|i| {
                let early = Duration::from_millis(if i % 2 == 1 { 3 } else { 0 });
                cap.admit(t0 + Duration::from_micros(100_000 + i * 66_667) - early)
            })
            .count();
        assert_eq!(admitted, 15);
    }

    #[test]
    fn rate_cap_passes_slower_sources_and_none() {
        let mut cap = RateCap::new(Some(10.0));
        let t0 = Instant::now();
        assert!((0..10).all(|i| cap.admit(t0 + Duration::from_millis(i * 200))));
        let mut none = RateCap::new(None);
        assert!((0..10).all(|_| none.admit(t0)));
    }
}
