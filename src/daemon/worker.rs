//! The inference worker (one thread, `ace-infer`): gather a batch of the latest frames across
//! cameras → crop each frame's regions (a camera without regions has one, the whole frame) →
//! score the crops as batches (preprocess, engine, head, and each region's few-shot bank when
//! it has one) → decide per region (OK / UNKNOWN /
//! NG) → publish each region's result, alarm transition and mask.
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

use super::regions::masked_stats;
use super::trigger::Outcome;
use super::{CamHandle, STALL_FILE_ENV, Shared, lock};
use crate::camera::{Frame, FrameNotify, LatestSlot};
use crate::decision::Verdict;
use crate::mqtt::PublisherHandle;
use crate::payload::{self, Alarm, FrameResult};
use crate::region::{PixelRect, RegionError};
use crate::scorer::{ScoreError, Scored, Scorer};

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
    live: Option<crate::live::LiveHub>,
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
        if frames.is_empty() {
            continue;
        }
        let jobs = plan_jobs(&frames, &handles, scorer.size());
        let mut outcomes: Vec<Option<Result<Scored, crate::scorer::ScoreError>>> =
            (0..jobs.len()).map(|_| None).collect();
        let mut failed = vec![false; frames.len()];
        let mut at = 0;
        for chunk in jobs.chunks(batching.max_batch.max(1)) {
            match score_chunk(
                &mut scorer,
                chunk,
                &frames,
                &mut input,
                shared.metrics.as_deref(),
            ) {
                Ok(results) => {
                    for (i, r) in results.into_iter().enumerate() {
                        if let Err(e) = &r {
                            // E.g. NaN in the model's output for this image: nothing is
                            // published for its region.
                            errors.log(e, "inference failed; this frame is not scored");
                            failed[chunk[i].frame] = true;
                        }
                        outcomes[at + i] = Some(r);
                    }
                }
                Err(e) => {
                    errors.log(&e, "inference failed; frames of this batch are not scored");
                    for j in chunk {
                        failed[j.frame] = true;
                    }
                }
            }
            at += chunk.len();
        }
        shared.scored_ms.store(shared.now_ms(), Ordering::Relaxed);
        for (fi, f) in frames.iter().enumerate() {
            if failed[fi] {
                count_error(&handles, f);
            }
            let scored: Vec<(&Job, Option<&Scored>)> = jobs
                .iter()
                .zip(&outcomes)
                .filter(|(j, _)| j.frame == fi)
                .map(|(j, o)| (j, o.as_ref().and_then(|r| r.as_ref().ok())))
                .collect();
            publish_frame(
                &shared,
                &publisher,
                &handles,
                f,
                &scored,
                &model_name,
                live.as_ref(),
            );
        }
        if let Some(l) = &live
            && let Some(job) = l.captures().reference_ready()
        {
            build_reference(&mut scorer, &shared, l, &job);
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

/// One image to score: a region's crop of a frame.
struct Job {
    /// Index of the frame in the batch.
    frame: usize,
    /// Index of the region in its camera's state.
    unit: usize,
    /// The crop; `Err` when the region does not fit this frame (nothing is scored for it).
    crop: Result<PixelRect, RegionError>,
    ignore: Option<Arc<[bool]>>,
    pixel_threshold: f32,
    /// The region's few-shot bank, if any.
    reference: Option<Arc<std::sync::Mutex<crate::reference::Reference>>>,
}

/// Builds a few-shot bank from a live-view reference capture with the worker's own encoder
/// (K encoder runs: inference waits meanwhile) and hands it back to the page.
fn build_reference(
    scorer: &mut Scorer,
    shared: &Shared,
    live: &crate::live::LiveHub,
    job: &crate::live::capture::ReferenceJob,
) {
    let t0 = Instant::now();
    let plane = 3 * scorer.size() * scorer.size();
    let mut input = vec![0.0f32; job.crops.len() * plane];
    let built = job
        .crops
        .iter()
        .enumerate()
        .try_for_each(|(k, c)| {
            scorer
                .prepare_frame(
                    &c.rgb,
                    c.w,
                    c.h,
                    c.w * 3,
                    &mut input[k * plane..(k + 1) * plane],
                )
                .map(|_| ())
        })
        .and_then(|()| {
            scorer.build_bank(
                &input,
                job.crops.len(),
                &job.key,
                shared.validity.max_bank_mb,
            )
        })
        .map_err(|e| e.to_string());
    match &built {
        Ok(b) => {
            info!(camera = %job.camera, region = %job.region, k = job.crops.len(), bytes = b.feature_bytes(), ms = t0.elapsed().as_millis() as u64, "live view: few-shot bank built (not yet accepted)")
        }
        Err(e) => {
            warn!(camera = %job.camera, region = %job.region, error = %e, "live view: few-shot bank not built")
        }
    }
    live.captures()
        .reference_built(&job.camera, &job.region, built);
}

/// The images of a batch of frames: one per region of each frame's camera.
fn plan_jobs(frames: &[Frame], handles: &[CamHandle], size: usize) -> Vec<Job> {
    let mut jobs = Vec::new();
    for (fi, f) in frames.iter().enumerate() {
        let Some(h) = handles.iter().find(|h| h.index == f.camera) else {
            continue;
        };
        let mut st = lock(&h.state);
        if st.index != f.camera {
            continue;
        }
        let pixel_threshold = st.pixel_threshold;
        for (ui, u) in st.units.iter_mut().enumerate() {
            let (crop, ignore) = match u.crop(f.width, f.height, size) {
                Ok((r, m)) => (Ok(r), m),
                Err(e) => (Err(e), None),
            };
            jobs.push(Job {
                frame: fi,
                unit: ui,
                crop,
                ignore,
                pixel_threshold,
                reference: u.reference.clone(),
            });
        }
    }
    jobs
}

/// Preprocesses the crops of `chunk` and scores them as one batch; each image's area is
/// computed by the head at its camera's pixel threshold. Jobs without a crop are not scored
/// (their entry is an error). `Err` when the whole batch failed. The inference (encoder and
/// head) of a batch that ran is timed into `metrics`.
fn score_chunk(
    scorer: &mut Scorer,
    chunk: &[Job],
    frames: &[Frame],
    input: &mut Vec<f32>,
    metrics: Option<&crate::metrics::Metrics>,
) -> Result<Vec<Result<Scored, ScoreError>>, ScoreError> {
    let s = scorer.size();
    let plane = 3 * s * s;
    let todo: Vec<(usize, &Job, PixelRect)> = chunk
        .iter()
        .enumerate()
        .filter_map(|(i, j)| j.crop.as_ref().ok().map(|r| (i, j, *r)))
        .collect();
    let n = todo.len();
    input.resize(n * plane, 0.0);
    for (k, (_, j, r)) in todo.iter().enumerate() {
        let f = &frames[j.frame];
        let offset = r.y as usize * f.stride + r.x as usize * 3;
        let data = f.data.get(offset..).ok_or_else(|| {
            ScoreError::Input(format!(
                "region crop {r:?} starts outside the {}x{} frame",
                f.width, f.height
            ))
        })?;
        scorer.prepare_frame(
            data,
            r.w as usize,
            r.h as usize,
            f.stride,
            &mut input[k * plane..(k + 1) * plane],
        )?;
    }
    let thresholds: Vec<f32> = todo.iter().map(|(_, j, _)| j.pixel_threshold).collect();
    let mut results: Vec<Result<Scored, ScoreError>> = chunk
        .iter()
        .map(|j| {
            Err(ScoreError::Input(match &j.crop {
                Err(e) => e.to_string(),
                Ok(_) => "not scored".into(),
            }))
        })
        .collect();
    if n > 0 {
        // Each region's bank (one frame per camera per batch: a bank is used once per batch;
        // the worker is the only one that locks them).
        let mut guards: Vec<Option<std::sync::MutexGuard<'_, crate::reference::Reference>>> = todo
            .iter()
            .map(|(_, j, _)| j.reference.as_deref().map(lock))
            .collect();
        let mut refs: Vec<Option<&mut crate::reference::Reference>> =
            guards.iter_mut().map(|g| g.as_deref_mut()).collect();
        let t0 = Instant::now();
        let scored =
            scorer.score_frames_with_references(&input[..n * plane], &thresholds, &mut refs)?;
        if let Some(m) = metrics {
            m.observe_inference(t0.elapsed());
        }
        for ((i, _, _), r) in todo.iter().zip(scored) {
            results[*i] = r;
        }
    }
    Ok(results)
}

/// Publishes one frame's regions: each region's result (a region whose crop did not fit the
/// frame gets an UNKNOWN result with `score` -1; one whose inference failed gets nothing, it is
/// counted as an inference error), alarm transition (recorded in the state directory first)
/// and a mask when the region's gate admits one.
fn publish_frame(
    shared: &Shared,
    publisher: &PublisherHandle,
    handles: &[CamHandle],
    f: &Frame,
    scored: &[(&Job, Option<&Scored>)],
    model_name: &str,
    live: Option<&crate::live::LiveHub>,
) {
    let Some(h) = handles.iter().find(|h| h.index == f.camera) else {
        return;
    };
    let mut st = lock(&h.state);
    if st.index != f.camera || scored.is_empty() {
        // A frame of the instance a reload just replaced: its numbering is gone.
        return;
    }
    let seq = st.seq_base + f.seq;
    st.next_seq = seq + 1;
    let mask = st.mask;
    let latency = f.captured_at.elapsed();
    let latency_ms = latency.as_secs_f32() * 1e3;
    let mut any = false;
    // A triggered camera streams nothing; its decisions answer the waiting trigger requests.
    let stream = shared.trigger.streams(&h.name);
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(scored.len());
    // The unit of each outcome (for the Sparkplug report's alarm states).
    let mut outcome_units: Vec<usize> = Vec::with_capacity(scored.len());
    // The live view: every region of the frame; maps copied only when it may draw them.
    let (want_live, want_ng) = live.map_or((false, false), |l| l.wants_maps(&h.name));
    let mut live_regions: Vec<crate::live::LiveRegion> = Vec::new();
    for (job, r) in scored {
        let Some(u) = st.units.get_mut(job.unit) else {
            continue;
        };
        let Some(r) = r else {
            if job.crop.is_ok() {
                // Inference failed for this image (e.g. NaN in the model's outputs): counted
                // and logged as an inference error, nothing is published for it.
                continue;
            }
            // The region does not fit this frame: the line is told (UNKNOWN), not left silent.
            u.crop_errors += 1;
            u.verdicts[Verdict::Unknown as usize] += 1;
            if let Some(m) = &shared.metrics {
                m.verdict(&h.name, u.cfg.name.as_deref(), Verdict::Unknown.as_str());
            }
            outcome_units.push(job.unit);
            outcomes.push(Outcome {
                region: u.cfg.name.clone(),
                score: f32::NAN,
                threshold: u.rule.t2(),
                verdict: Verdict::Unknown,
            });
            if live.is_some() {
                live_regions.push(crate::live::LiveRegion {
                    rect: None,
                    map: None,
                    map_size: 0,
                    ignore: None,
                    pixel_threshold: job.pixel_threshold,
                    verdict: Verdict::Unknown.into(),
                    score: -1.0,
                    threshold: u.rule.t2().unwrap_or(f32::NAN),
                    map_max: -1.0,
                });
            }
            if !stream {
                continue;
            }
            publisher.result(FrameResult {
                camera: h.name.to_string(),
                seq,
                ts_ms: f.capture_unix_ms,
                score: f32::NAN,
                anomaly: false,
                threshold: u.rule.t2().unwrap_or(f32::NAN),
                map_max: f32::NAN,
                area: f32::NAN,
                latency_ms,
                model: model_name.to_owned(),
                region: u.cfg.name.clone(),
                verdict: Verdict::Unknown.as_str(),
                score_norm: f32::NAN,
                cal: u.rule.cal_id().unwrap_or("").to_owned(),
            });
            continue;
        };
        any = true;
        let mut map_buf;
        let (map, map_max, area) = match &job.ignore {
            Some(ignore) => {
                map_buf = r.map.clone();
                let (max, area) = masked_stats(&mut map_buf, Some(ignore), job.pixel_threshold);
                (&map_buf[..], max, area)
            }
            None => (&r.map[..], r.map_max, r.area),
        };
        let d = u.decide(r.score, map_max);
        if let Some(live) = live
            && live.captures().any_running()
        {
            let value = u.cfg.statistic.value(r.score, map_max);
            live.captures()
                .sample(&h.name, u.cfg.name.as_deref().unwrap_or(""), value, || {
                    crate::live::capture::SampleContext {
                        fingerprint: super::calibrated::fingerprint(
                            &shared.validity,
                            &u.cfg,
                            &u.bank_id,
                        ),
                        debounce: {
                            let c = u.debouncer.config();
                            (c.raise_count, c.raise_window)
                        },
                        uses_calibration: u.cfg.calibrated,
                    }
                });
        }
        if let Some(live) = live
            && live.captures().any_reference()
        {
            let key = super::references::region_key(&u.cfg);
            live.captures().reference_sample(
                &h.name,
                u.cfg.name.as_deref().unwrap_or(""),
                &key,
                || {
                    // The region's crop of the frame, rows packed.
                    let r = job.crop.as_ref().ok()?;
                    let (x, y, w, hh) = (r.x as usize, r.y as usize, r.w as usize, r.h as usize);
                    let mut rgb = Vec::with_capacity(w * hh * 3);
                    for row in y..y + hh {
                        let at = row * f.stride + x * 3;
                        rgb.extend_from_slice(f.data.get(at..at + w * 3)?);
                    }
                    Some(crate::live::capture::Crop { rgb, w, h: hh })
                },
            );
        }
        let anomaly = d.verdict == Verdict::Ng;
        if let Some(m) = &shared.metrics {
            m.verdict(&h.name, u.cfg.name.as_deref(), d.verdict.as_str());
        }
        outcome_units.push(job.unit);
        outcomes.push(Outcome {
            region: u.cfg.name.clone(),
            score: r.score,
            threshold: u.rule.t2(),
            verdict: d.verdict,
        });
        if live.is_some() {
            let draw = want_live || (want_ng && anomaly);
            live_regions.push(crate::live::LiveRegion {
                rect: u.cfg.name.as_ref().and(job.crop.as_ref().ok().copied()),
                map: draw.then(|| map.to_vec()),
                map_size: r.size,
                ignore: job.ignore.clone(),
                pixel_threshold: job.pixel_threshold,
                verdict: d.verdict.into(),
                score: r.score,
                threshold: u.rule.t2().unwrap_or(f32::NAN),
                map_max,
            });
        }
        if !stream {
            continue;
        }
        publisher.result(FrameResult {
            camera: h.name.to_string(),
            seq,
            ts_ms: f.capture_unix_ms,
            score: r.score,
            anomaly,
            threshold: u.rule.t2().unwrap_or(f32::NAN),
            map_max,
            area,
            latency_ms,
            model: model_name.to_owned(),
            region: u.cfg.name.clone(),
            verdict: d.verdict.as_str(),
            score_norm: d.score_norm.unwrap_or(f32::NAN),
            cal: u.rule.cal_id().unwrap_or("").to_owned(),
        });
        if d.verdict != Verdict::Unknown {
            u.last = Some((seq, f.capture_unix_ms, r.score));
        }
        if d.verdict != Verdict::Unknown
            && let Some(t) = u.debouncer.update(anomaly)
        {
            alarm_transition(
                shared,
                publisher,
                &h.name,
                u,
                t.active(),
                (seq, f.capture_unix_ms, r.score),
            );
        }

        if mask.enabled && u.gate.admit(anomaly, Instant::now()) {
            let px = crate::head::render_mask(
                map,
                r.size,
                r.size,
                mask.size,
                mask.kind,
                job.pixel_threshold,
            );
            match payload::mask_png(&h.name, seq, f.capture_unix_ms, mask.size, mask.size, &px) {
                Ok(png) => {
                    publisher.mask(&u.key, png);
                }
                Err(e) => warn!(camera = %h.name, error = %e, "mask encoding failed"),
            }
        }
    }
    // A no-op for the encoder unless someone watches (or an NG frame is due for the gallery);
    // never waits.
    if let Some(live) = live
        && !live_regions.is_empty()
    {
        live.offer(&h.name, f, live_regions);
    }
    if let Some(spb) = &shared.sparkplug
        && !outcomes.is_empty()
    {
        let report: Vec<crate::sparkplug::RegionReport> = outcomes
            .iter()
            .zip(&outcome_units)
            .map(|(o, ui)| crate::sparkplug::RegionReport {
                region: o.region.clone(),
                verdict: o.verdict.as_str(),
                score: o.score,
                threshold: o.threshold,
                alarm: st.units.get(*ui).is_some_and(|u| u.debouncer.is_active()),
            })
            .collect();
        spb.frame(&h.name, &report);
    }
    shared.trigger.on_scored(&h.name, f, &outcomes);
    if !any {
        return;
    }
    st.scored += 1;
    if let Some(m) = &shared.metrics {
        m.frame_scored(&h.name);
        if stream {
            // The latency the results carry (`latency_ms`): capture → handed to the publisher.
            m.observe_capture_to_publish(&h.name, latency);
        }
    }
    if f.ordinal >= st.frames_in_at_last_stats {
        st.scored_in_window += 1;
    }
    if st.latencies_ms.len() < 100_000 {
        st.latencies_ms.push(latency_ms);
    }
}

/// Records and publishes an alarm transition of region `u` of `camera`: the log line, the
/// state file (before the message), the metric for a raise, the `alarm` message (disk-queued).
/// `frame` is the `seq`, capture time and score of the frame it is reported with. Used by the
/// worker and by an acknowledgement that clears a latched alarm.
pub(super) fn alarm_transition(
    shared: &Shared,
    publisher: &PublisherHandle,
    camera: &str,
    u: &super::regions::Unit,
    active: bool,
    (seq, ts_ms, score): (u64, u64, f32),
) {
    info!(
        camera = %camera,
        region = u.cfg.name.as_deref().unwrap_or(""),
        active,
        seq,
        score,
        "alarm"
    );
    shared.alarm_states.set(&u.key, active);
    if active && let Some(m) = &shared.metrics {
        m.alarm_raised(camera, u.cfg.name.as_deref());
    }
    publisher.alarm(Alarm {
        camera: camera.to_owned(),
        active,
        seq,
        ts_ms,
        score,
        region: u.cfg.name.clone(),
    });
}
