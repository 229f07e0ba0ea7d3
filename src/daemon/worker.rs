//! The inference worker (one thread, `ace-infer`): gather a batch of the latest frames across
//! cameras → score it (preprocess, engine, head) → publish each frame's result, alarm
//! transition and mask.
//!
//! Input: the cameras' latest-frame slots (one frame per camera; a newer frame overwrites an
//! unread one, counted by the camera as `dropped_overload`). Output: calls on the
//! [`PublisherHandle`], which never block (results and masks are latest-value data; alarms go
//! through the on-disk queue). Failure modes: a batch whose inference fails, or a frame whose
//! outputs are not finite, is counted per camera (`inference_errors`), logged at most every
//! 10 s, and nothing is published for it; the worker goes on with the next frames.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::{CamHandle, STALL_FILE_ENV, Shared, lock};
use crate::camera::{Frame, FrameNotify, LatestSlot};
use crate::mqtt::PublisherHandle;
use crate::payload::{self, Alarm, FrameResult};
use crate::scorer::{DEFAULT_PIXEL_THRESHOLD, Scored, Scorer};

/// How the worker batches.
pub(super) struct Batching {
    /// Largest batch formed across cameras.
    pub(super) max_batch: usize,
    /// Longest the first frame waits for frames of other cameras.
    pub(super) max_wait: Duration,
}

/// Runs until the daemon's stop flag is set.
pub(super) fn run(
    shared: Arc<Shared>,
    mut scorer: Scorer,
    notify_frames: Arc<FrameNotify>,
    publisher: PublisherHandle,
    batching: Batching,
    model_name: String,
) {
    // Test hook, read once: while this file exists the worker stalls (a hung engine).
    let stall_file = std::env::var_os(STALL_FILE_ENV).map(PathBuf::from);
    let mut input: Vec<f32> = Vec::new();
    let mut errors = ErrorLog::default();
    while !shared.stop.load(Ordering::SeqCst) {
        if let Some(f) = &stall_file {
            while f.exists() && !shared.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        shared
            .heartbeat_ms
            .store(shared.now_ms(), Ordering::Relaxed);
        let handles: Vec<CamHandle> = shared
            .cams
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if handles.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let mut frames = gather_batch(&handles, &notify_frames, &batching);
        // Triggered cameras: only frames a waiting request will take are scored.
        frames.retain(|f| shared.trigger.wanted(&f.camera_name, f));
        for chunk in frames.chunks(batching.max_batch.max(1)) {
            let Some(results) = score_chunk(&mut scorer, chunk, &handles, &mut input, &mut errors)
            else {
                continue;
            };
            shared.scored_ms.store(shared.now_ms(), Ordering::Relaxed);
            for (f, (r, pixel_threshold)) in chunk.iter().zip(results) {
                match r {
                    Ok(r) => publish_scored(
                        &shared,
                        &publisher,
                        &handles,
                        f,
                        &r,
                        pixel_threshold,
                        &model_name,
                    ),
                    Err(e) => {
                        // E.g. NaN in the model's output for this frame: nothing is published.
                        count_error(&handles, f);
                        errors.log(&e, "inference failed; this frame is not scored");
                    }
                }
            }
        }
    }
    info!("inference worker stopped");
}

/// Logs inference errors at most every 10 s.
#[derive(Default)]
struct ErrorLog {
    at: Option<Instant>,
}

impl ErrorLog {
    fn log(&mut self, e: &dyn std::fmt::Display, what: &str) {
        if self
            .at
            .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
        {
            error!(error = %e, "{what}");
            self.at = Some(Instant::now());
        }
    }
}

/// The latest frame of every camera that has one, waiting up to `max_wait` for more cameras
/// once the first frame is there (at most `max_batch` cameras are waited for).
fn gather_batch(
    handles: &[CamHandle],
    notify_frames: &FrameNotify,
    batching: &Batching,
) -> Vec<Frame> {
    let slots: Vec<Arc<LatestSlot>> = handles.iter().map(|h| h.slot.clone()).collect();
    let mut frames = notify_frames.take_any(&slots, Duration::from_millis(200));
    if frames.is_empty() {
        return frames;
    }
    let target = batching.max_batch.min(slots.len());
    if frames.len() < target && !batching.max_wait.is_zero() {
        let deadline = Instant::now() + batching.max_wait;
        while frames.len() < target {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let rest: Vec<Arc<LatestSlot>> = handles
                .iter()
                .filter(|h| !frames.iter().any(|f| f.camera == h.index))
                .map(|h| h.slot.clone())
                .collect();
            let more = notify_frames.take_any(&rest, deadline - now);
            if more.is_empty() {
                break;
            }
            frames.extend(more);
        }
    }
    frames
}

/// Counts a frame whose inference failed against its camera (if the frame is of the camera's
/// current instance).
fn count_error(handles: &[CamHandle], f: &Frame) {
    if let Some(h) = handles.iter().find(|h| h.index == f.camera) {
        let mut st = lock(&h.state);
        if st.index == f.camera {
            st.inference_errors += 1;
        }
    }
}

/// One scored frame or its error, with the pixel threshold it was scored at.
type FrameOutcome = (Result<Scored, crate::scorer::ScoreError>, f32);

/// Preprocesses and scores one batch; each frame's area is computed by the head at its
/// camera's pixel threshold. `None` when the whole batch failed (counted and logged).
fn score_chunk(
    scorer: &mut Scorer,
    chunk: &[Frame],
    handles: &[CamHandle],
    input: &mut Vec<f32>,
    errors: &mut ErrorLog,
) -> Option<Vec<FrameOutcome>> {
    let s = scorer.size();
    let n = chunk.len();
    input.resize(n * 3 * s * s, 0.0);
    let mut prepared = Ok(());
    for (i, f) in chunk.iter().enumerate() {
        prepared = prepared.and_then(|()| {
            scorer.prepare_frame(
                &f.data,
                f.width as usize,
                f.height as usize,
                f.stride,
                &mut input[i * 3 * s * s..(i + 1) * 3 * s * s],
            )
        });
    }
    let thresholds: Vec<f32> = chunk
        .iter()
        .map(|f| {
            handles
                .iter()
                .find(|h| h.index == f.camera)
                .map_or(DEFAULT_PIXEL_THRESHOLD, |h| lock(&h.state).pixel_threshold)
        })
        .collect();
    match prepared.and_then(|()| scorer.score_frames(&input[..n * 3 * s * s], &thresholds)) {
        Ok(results) => Some(results.into_iter().zip(thresholds).collect()),
        Err(e) => {
            for f in chunk {
                count_error(handles, f);
            }
            errors.log(&e, "inference failed; frames of this batch are not scored");
            None
        }
    }
}

/// Publishes one scored frame: the result, an alarm transition (recorded in the state
/// directory first), and a mask when the camera's gate admits one.
fn publish_scored(
    shared: &Shared,
    publisher: &PublisherHandle,
    handles: &[CamHandle],
    f: &Frame,
    r: &Scored,
    pixel_threshold: f32,
    model_name: &str,
) {
    let Some(h) = handles.iter().find(|h| h.index == f.camera) else {
        return;
    };
    let mut st = lock(&h.state);
    if st.index != f.camera {
        // A frame of the instance a reload just replaced: its numbering is gone.
        return;
    }
    let seq = st.seq_base + f.seq;
    st.next_seq = seq + 1;
    let anomaly = r.score >= st.threshold;
    let latency_ms = f.captured_at.elapsed().as_secs_f32() * 1e3;
    st.scored += 1;
    if f.ordinal >= st.frames_in_at_last_stats {
        st.scored_in_window += 1;
    }
    if st.latencies_ms.len() < 100_000 {
        st.latencies_ms.push(latency_ms);
    }
    // Trigger requests waiting for this frame are answered; a triggered camera streams nothing.
    if !shared.trigger.on_scored(&h.name, f, r.score, st.threshold) {
        return;
    }
    publisher.result(FrameResult {
        camera: h.name.to_string(),
        seq,
        ts_ms: f.capture_unix_ms,
        score: r.score,
        anomaly,
        threshold: st.threshold,
        map_max: r.map_max,
        area: r.area,
        latency_ms,
        model: model_name.to_owned(),
    });
    if let Some(t) = st.debouncer.update(anomaly) {
        info!(camera = %h.name, active = t.active(), seq, score = r.score, "alarm");
        shared.alarm_states.set(&h.name, t.active());
        publisher.alarm(Alarm {
            camera: h.name.to_string(),
            active: t.active(),
            seq,
            ts_ms: f.capture_unix_ms,
            score: r.score,
        });
    }
    let mask = st.mask;
    if mask.enabled && st.gate.admit(anomaly, Instant::now()) {
        let px = crate::head::render_mask(
            &r.map,
            r.size,
            r.size,
            mask.size,
            mask.kind,
            pixel_threshold,
        );
        match payload::mask_png(&h.name, seq, f.capture_unix_ms, mask.size, mask.size, &px) {
            Ok(png) => {
                publisher.mask(&h.name, png);
            }
            Err(e) => warn!(camera = %h.name, error = %e, "mask encoding failed"),
        }
    }
}
