//! Triggered inspection: a request on `<prefix>/<camera>/inspect` → exactly one result on
//! `<prefix>/<camera>/inspection` (the handshake for a PLC is in `docs/plc.md`).
//!
//! Input: trigger requests forwarded by the request connection ([`Inbound`], JSON
//! `{"meas_id": "…", "part_id": "…", "regions": […], "deadline_ms": N}`), scored frames from
//! the inference worker ([`Triggers::on_scored`]), the cameras' states. Output: one
//! [`Inspection`] per request, handed to the publisher's inspection disk queue (so it survives
//! a broker outage and a crash, re-sent `replayed: true`), and each camera's retained `ready`
//! flag.
//!
//! Frame selection: a request is answered by the first frame the worker scores among those
//! captured at or after the request's arrival plus `[trigger] settle_ms` (a frame overwritten
//! in the camera's latest-frame slot before the worker took it is not seen). Cameras in
//! `mode = "triggered"` score only such frames (the worker asks [`Triggers::wanted`]) and
//! publish no `result`/`alarm`/`mask`; cameras in `continuous` mode serve triggers from their
//! stream.
//!
//! Exactly one answer per request: `OK`/`NG`/`UNKNOWN` from the scored frame, `TIMEOUT` when no
//! frame was scored before the deadline (`deadline_ms`, else `[trigger] timeout_ms`), `ERROR`
//! with a `reason` for a request that cannot be served (bad field, unknown camera or region,
//! camera not online, `busy` beyond `max_pending` waiting requests per camera, daemon
//! stopping). A repeated `meas_id` on the same camera within `repeat_window_s` is answered with
//! the first result again (same `result_id`), or joins the request still waiting; only scored
//! results (`OK`/`NG`/`UNKNOWN`) are remembered, so a PLC may retry after `TIMEOUT`/`ERROR`.
//!
//! Failure modes: a payload that is not a JSON object or has no readable `meas_id` cannot be
//! answered (there is nothing to correlate): it is logged (at most one line per second) and
//! dropped. Every queue here is bounded (`max_pending`, `repeat_max`); nothing panics on input.
//!
//! MQTT 5 request/response: a request that carried a response topic (and correlation data) gets
//! the same answer there too ([`crate::mqtt::requests`], once, QoS 1); a repeat joining a
//! waiting request adds its own response topic. `ready` is `false` while the request connection
//! is not subscribed (a request published then would reach nobody).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Shared, lock, unix_ms};
use crate::camera::{CameraState, Frame};
use crate::config::{CameraMode, Config, MAX_TRIGGER_TIMEOUT_MS, TriggerConfig};
use crate::decision::Verdict;
use crate::mqtt::requests::{RequestLink, ResponseTo};
use crate::mqtt::{Inbound, PublisherHandle};
use crate::payload::{Inspection, InspectionVerdict, MAX_STRING_BYTES, sanitize};

/// Largest request payload served; a larger one (up to [`MAX_PARSED_BYTES`]) is answered
/// `ERROR` when its `meas_id` is readable.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// Largest payload even looked at for a `meas_id`.
const MAX_PARSED_BYTES: usize = 64 * 1024;
/// Longest `meas_id` / `part_id`.
pub const MAX_ID_LEN: usize = 64;
/// How often deadlines and `ready` flags are checked.
const TICK: Duration = Duration::from_millis(10);

/// One region's decision on a scored frame, as the worker made it.
#[derive(Debug, Clone)]
pub(super) struct Outcome {
    /// `None`: the implicit whole-frame region.
    pub(super) region: Option<String>,
    pub(super) score: f32,
    /// The region's T2 (NG at or above), if it has one.
    pub(super) threshold: Option<f32>,
    pub(super) verdict: Verdict,
}

/// How bad a verdict is: the answer for a frame is its worst region.
fn rank(v: Verdict) -> u8 {
    match v {
        Verdict::Ok => 0,
        Verdict::Unknown => 1,
        Verdict::Ng => 2,
    }
}

fn answer_verdict(v: Verdict) -> InspectionVerdict {
    match v {
        Verdict::Ok => InspectionVerdict::Ok,
        Verdict::Unknown => InspectionVerdict::Unknown,
        Verdict::Ng => InspectionVerdict::Ng,
    }
}

/// A request waiting for its frame.
#[derive(Debug, Clone)]
struct Pending {
    meas_id: String,
    part_id: Option<String>,
    at: Instant,
    at_unix_ms: u64,
    not_before: Instant,
    deadline: Instant,
    /// The named regions asked for (empty: every region of the camera).
    regions: Vec<String>,
    /// Requests with this `meas_id` (repeats while it waits), each answered.
    answers: u32,
    /// MQTT 5 response topics of those requests (each gets the answer too).
    responses: Vec<ResponseTo>,
}

#[derive(Default)]
struct Inner {
    cfg: TriggerConfig,
    modes: HashMap<String, CameraMode>,
    /// The named regions of each camera.
    region_names: HashMap<String, Vec<String>>,
    pending: HashMap<String, VecDeque<Pending>>,
    /// Scored results remembered for repeats, oldest first: ((camera, meas_id), when, result).
    done: VecDeque<((String, String), Instant, Inspection)>,
    /// The `ready` flag last handed to the publisher, per camera.
    ready_sent: HashMap<String, bool>,
    stopping: bool,
}

/// The trigger stage, shared by the worker (scored frames) and its own task (requests,
/// deadlines, `ready`).
pub(super) struct Triggers {
    inner: Mutex<Inner>,
    publisher: PublisherHandle,
    /// `<node>-<boot>-`: result ids are unique across restarts.
    id_prefix: String,
    next: AtomicU64,
    /// Requests answered, by kind (for logs and tests).
    answered: AtomicU64,
    /// Trigger → scored result latencies go here when `[metrics]` is set.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The request connection (MQTT 5 responses; whether requests can arrive), once set.
    link: std::sync::OnceLock<RequestLink>,
}

impl Triggers {
    pub(super) fn new(
        cfg: &Config,
        publisher: PublisherHandle,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Self {
        let t = Self {
            inner: Mutex::new(Inner::default()),
            publisher,
            id_prefix: format!("{}-{:x}-", cfg.node_id, unix_ms() / 1000),
            next: AtomicU64::new(1),
            answered: AtomicU64::new(0),
            metrics,
            link: std::sync::OnceLock::new(),
        };
        t.configure(cfg);
        t
    }

    /// Applies a (re)loaded configuration: modes and `[trigger]`. Requests waiting on a camera
    /// that is gone are answered `ERROR` (`camera removed`).
    pub(super) fn configure(&self, cfg: &Config) {
        let removed: Vec<(String, Pending)> = {
            let mut inner = lock(&self.inner);
            inner.cfg = cfg.trigger;
            inner.modes = cfg
                .cameras
                .iter()
                .map(|c| (c.name.clone(), c.mode))
                .collect();
            inner.region_names = cfg
                .cameras
                .iter()
                .map(|c| {
                    let names = c.regions.iter().filter_map(|r| r.name.clone()).collect();
                    (c.name.clone(), names)
                })
                .collect();
            let Inner {
                modes, ready_sent, ..
            } = &mut *inner;
            ready_sent.retain(|c, _| modes.contains_key(c));
            let gone: Vec<String> = inner
                .pending
                .keys()
                .filter(|c| !inner.modes.contains_key(*c))
                .cloned()
                .collect();
            let mut out = Vec::new();
            for c in gone {
                if let Some(q) = inner.pending.remove(&c) {
                    out.extend(q.into_iter().map(|p| (c.clone(), p)));
                }
            }
            out
        };
        for (camera, p) in removed {
            self.answer_error(&camera, &p, InspectionVerdict::Error, "camera removed");
        }
    }

    fn result_id(&self) -> String {
        format!(
            "{}{}",
            self.id_prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Sets the request connection (once, at start).
    pub(super) fn set_link(&self, link: RequestLink) {
        let _ = self.link.set(link);
    }

    /// Whether requests can arrive now (no request connection set: yes, for tests).
    fn listening(&self) -> bool {
        self.link
            .get()
            .is_none_or(|l| l.listening().load(Ordering::Relaxed))
    }

    /// Hands the answer to the publisher once per request (`answers`) and to each MQTT 5
    /// response topic.
    fn send(&self, i: Inspection, answers: u32, responses: &[ResponseTo]) {
        if let Some(link) = self.link.get() {
            for to in responses {
                link.respond(to, i.to_json(false));
            }
        }
        for _ in 0..answers.max(1) {
            self.answered.fetch_add(1, Ordering::Relaxed);
            self.publisher.inspection(i.clone());
        }
    }

    /// Answers a request that was not scored (`TIMEOUT` or `ERROR` with `reason`).
    fn answer_error(&self, camera: &str, p: &Pending, verdict: InspectionVerdict, reason: &str) {
        let i = Inspection {
            camera: camera.to_owned(),
            meas_id: p.meas_id.clone(),
            part_id: p.part_id.clone(),
            result_id: self.result_id(),
            verdict,
            reason: Some(reason.to_owned()),
            region: None,
            score: None,
            threshold: None,
            trigger_ts_ms: p.at_unix_ms,
            frame_ts_ms: None,
            done_ts_ms: unix_ms(),
            latency_ms: p.at.elapsed().as_secs_f32() * 1e3,
        };
        self.send(i, p.answers, &p.responses);
    }

    /// Whether the worker should score this frame of a camera (always for a continuous camera;
    /// for a triggered one only when a request waits for a frame captured at or after it).
    pub(super) fn wanted(&self, camera: &str, f: &Frame) -> bool {
        let inner = lock(&self.inner);
        if inner.modes.get(camera) != Some(&CameraMode::Triggered) {
            return true;
        }
        inner
            .pending
            .get(camera)
            .is_some_and(|q| q.iter().any(|p| p.not_before <= f.captured_at))
    }

    /// Whether `camera` streams (`continuous` mode: publish the per-frame result, alarm and
    /// mask).
    pub(super) fn streams(&self, camera: &str) -> bool {
        lock(&self.inner).modes.get(camera) != Some(&CameraMode::Triggered)
    }

    /// A frame of `camera` was scored (one [`Outcome`] per region): answers the requests it
    /// serves with the worst region's verdict (NG over UNKNOWN over OK), its score, threshold
    /// and, for a named region, its name.
    pub(super) fn on_scored(&self, camera: &str, f: &Frame, outcomes: &[Outcome]) {
        let worst_of = |regions: &[String]| {
            outcomes
                .iter()
                .filter(|o| {
                    regions.is_empty() || o.region.as_ref().is_some_and(|r| regions.contains(r))
                })
                .fold(None::<&Outcome>, |w, o| match w {
                    Some(w) if rank(w.verdict) >= rank(o.verdict) => Some(w),
                    _ => Some(o),
                })
        };
        let served = {
            let mut inner = lock(&self.inner);
            let mut served = Vec::new();
            if let Some(q) = inner.pending.get_mut(camera) {
                let mut i = 0;
                while i < q.len() {
                    if q[i].not_before <= f.captured_at {
                        if let Some(p) = q.remove(i) {
                            served.push(p);
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            served
        };
        for p in served {
            let Some(worst) = worst_of(&p.regions) else {
                self.answer_error(camera, &p, InspectionVerdict::Error, "no region scored");
                continue;
            };
            let i = Inspection {
                camera: camera.to_owned(),
                meas_id: p.meas_id.clone(),
                part_id: p.part_id.clone(),
                result_id: self.result_id(),
                verdict: answer_verdict(worst.verdict),
                reason: None,
                region: worst.region.clone(),
                score: Some(worst.score),
                threshold: worst.threshold,
                trigger_ts_ms: p.at_unix_ms,
                frame_ts_ms: Some(f.capture_unix_ms),
                done_ts_ms: unix_ms(),
                latency_ms: p.at.elapsed().as_secs_f32() * 1e3,
            };
            if let Some(m) = &self.metrics {
                m.observe_trigger_to_result(camera, p.at.elapsed());
            }
            self.remember(camera, &i);
            self.send(i, p.answers, &p.responses);
        }
    }

    /// Keeps a scored result for repeats of its `meas_id` (bounded by `repeat_max`).
    fn remember(&self, camera: &str, i: &Inspection) {
        let mut inner = lock(&self.inner);
        let (window, max) = (inner.cfg.repeat_window, inner.cfg.repeat_max);
        if window.is_zero() || max == 0 {
            return;
        }
        while inner.done.len() >= max {
            inner.done.pop_front();
        }
        inner.done.push_back((
            (camera.to_owned(), i.meas_id.clone()),
            Instant::now(),
            i.clone(),
        ));
    }

    /// Handles one request.
    fn on_request(&self, msg: Inbound, statuses: &HashMap<String, CameraState>) {
        let camera = msg.camera.clone();
        let req = match parse_request(&msg.payload) {
            Ok(r) => r,
            Err(Unanswerable(why)) => {
                log_limited(&camera, &why);
                return;
            }
        };
        let (timeout, settle, max_pending, window) = {
            let inner = lock(&self.inner);
            (
                inner.cfg.timeout,
                inner.cfg.settle,
                inner.cfg.max_pending,
                inner.cfg.repeat_window,
            )
        };
        let deadline = req.deadline_ms.map_or(timeout, |ms| {
            Duration::from_millis(ms.min(MAX_TRIGGER_TIMEOUT_MS))
        });
        let p = Pending {
            meas_id: req.meas_id,
            part_id: req.part_id,
            at: msg.at,
            at_unix_ms: msg.at_unix_ms,
            not_before: msg.at + settle,
            deadline: msg.at + deadline,
            regions: req.regions,
            answers: 1,
            responses: msg.response.into_iter().collect(),
        };
        if let Some(problem) = req.problem {
            self.answer_error(&camera, &p, InspectionVerdict::Error, &problem);
            return;
        }
        let mut inner = lock(&self.inner);
        if !inner.modes.contains_key(&camera) {
            drop(inner);
            self.answer_error(&camera, &p, InspectionVerdict::Error, "unknown camera");
            return;
        }
        let known = inner.region_names.get(&camera);
        if let Some(r) = p
            .regions
            .iter()
            .find(|r| !known.is_some_and(|k| k.contains(r)))
        {
            let reason = format!("unknown region '{}'", sanitize(r, MAX_STRING_BYTES));
            drop(inner);
            self.answer_error(&camera, &p, InspectionVerdict::Error, &reason);
            return;
        }
        // A repeat of a result still remembered: the same answer again.
        let now = Instant::now();
        while inner
            .done
            .front()
            .is_some_and(|(_, t, _)| now.duration_since(*t) > window)
        {
            inner.done.pop_front();
        }
        if let Some((_, _, i)) = inner
            .done
            .iter()
            .rev()
            .find(|((c, m), _, _)| *c == camera && *m == p.meas_id)
        {
            let i = i.clone();
            drop(inner);
            info!(camera, meas_id = %p.meas_id, result_id = %i.result_id, "repeated meas_id: the first result is sent again");
            self.send(i, 1, &p.responses);
            return;
        }
        let stopping = inner.stopping;
        let q = inner.pending.entry(camera.clone()).or_default();
        if let Some(w) = q.iter_mut().find(|w| w.meas_id == p.meas_id) {
            w.answers = w.answers.saturating_add(1);
            w.responses.extend(p.responses);
            return;
        }
        let online = matches!(statuses.get(&camera), Some(CameraState::Online));
        let reason = if stopping {
            Some("stopping")
        } else if !online {
            Some("camera offline")
        } else if q.len() >= max_pending {
            Some("busy")
        } else {
            None
        };
        if let Some(reason) = reason {
            drop(inner);
            self.answer_error(&camera, &p, InspectionVerdict::Error, reason);
            return;
        }
        q.push_back(p);
    }

    /// Answers `TIMEOUT` to the requests past their deadline.
    fn expire(&self, statuses: &HashMap<String, CameraState>) {
        let now = Instant::now();
        let expired: Vec<(String, Pending)> = {
            let mut inner = lock(&self.inner);
            let mut out = Vec::new();
            for (camera, q) in inner.pending.iter_mut() {
                let mut i = 0;
                while i < q.len() {
                    if q[i].deadline <= now {
                        if let Some(p) = q.remove(i) {
                            out.push((camera.clone(), p));
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            out
        };
        for (camera, p) in expired {
            let reason = match statuses.get(&camera) {
                Some(CameraState::Online) => "no frame scored before the deadline",
                _ => "camera offline",
            };
            self.answer_error(&camera, &p, InspectionVerdict::Timeout, reason);
        }
    }

    /// Each camera's `ready`: online, below `max_pending` waiting requests, and the request
    /// connection subscribed.
    fn ready(&self, statuses: &HashMap<String, CameraState>) {
        let listening = self.listening();
        let flags: Vec<(String, bool)> = {
            let mut inner = lock(&self.inner);
            let flags: Vec<(String, bool)> = inner
                .modes
                .keys()
                .map(|c| {
                    let online = matches!(statuses.get(c), Some(CameraState::Online));
                    let room = inner
                        .pending
                        .get(c)
                        .is_none_or(|q| q.len() < inner.cfg.max_pending);
                    (c.clone(), online && room && listening && !inner.stopping)
                })
                .filter(|(c, r)| inner.ready_sent.get(c) != Some(r))
                .collect();
            for (c, r) in &flags {
                inner.ready_sent.insert(c.clone(), *r);
            }
            flags
        };
        for (c, r) in flags {
            self.publisher.ready(&c, r);
        }
    }

    /// The daemon is stopping: every waiting request is answered `ERROR` (`stopping`) and new
    /// ones are refused.
    pub(super) fn stop(&self) {
        let all: Vec<(String, Pending)> = {
            let mut inner = lock(&self.inner);
            inner.stopping = true;
            inner
                .pending
                .drain()
                .flat_map(|(c, q)| q.into_iter().map(move |p| (c.clone(), p)))
                .collect()
        };
        for (camera, p) in all {
            self.answer_error(&camera, &p, InspectionVerdict::Error, "stopping");
        }
        let cams: Vec<String> = lock(&self.inner).modes.keys().cloned().collect();
        for c in cams {
            self.publisher.ready(&c, false);
        }
    }
}

/// The trigger stage's task: requests from the publisher, deadlines and `ready` every 10 ms.
pub(super) async fn serve(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Inbound>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                let statuses = lock(&shared.statuses).clone();
                shared.trigger.on_request(msg, &statuses);
                // Drain what else is waiting without re-reading the statuses each time.
                while let Ok(msg) = rx.try_recv() {
                    shared.trigger.on_request(msg, &statuses);
                }
            }
            _ = tick.tick() => {
                let statuses = lock(&shared.statuses).clone();
                shared.trigger.expire(&statuses);
                shared.trigger.ready(&statuses);
            }
        }
    }
}

/// A request that can not be answered (no readable `meas_id`): why.
#[derive(Debug, PartialEq)]
struct Unanswerable(String);

/// A parsed request; `problem` set when it is answerable but not servable.
#[derive(Debug, PartialEq)]
struct Request {
    meas_id: String,
    part_id: Option<String>,
    regions: Vec<String>,
    deadline_ms: Option<u64>,
    problem: Option<String>,
}

fn is_printable_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Parses and checks a request payload.
fn parse_request(payload: &[u8]) -> Result<Request, Unanswerable> {
    if payload.len() > MAX_PARSED_BYTES {
        return Err(Unanswerable(format!(
            "request of {} bytes (at most {MAX_REQUEST_BYTES}) ignored",
            payload.len()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| Unanswerable(format!("request is not JSON ({e}): ignored")))?;
    let Some(obj) = v.as_object() else {
        return Err(Unanswerable(
            "request is not a JSON object: ignored".to_owned(),
        ));
    };
    let meas_id = match obj.get("meas_id") {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => {
            return Err(Unanswerable(
                "request without a meas_id string: ignored".to_owned(),
            ));
        }
    };
    let mut problems: Vec<String> = Vec::new();
    if payload.len() > MAX_REQUEST_BYTES {
        problems.push(format!(
            "request of {} bytes exceeds {MAX_REQUEST_BYTES}",
            payload.len()
        ));
    }
    let meas_id = if meas_id.len() > MAX_ID_LEN || !is_printable_ascii(&meas_id) {
        problems.push(format!(
            "meas_id must be 1 to {MAX_ID_LEN} printable ASCII characters"
        ));
        sanitize(&meas_id, MAX_STRING_BYTES)
    } else {
        meas_id
    };
    let part_id = match obj.get("part_id") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s.len() <= MAX_ID_LEN && is_printable_ascii(s) => {
            Some(s.clone())
        }
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(_) => {
            problems.push(format!(
                "part_id must be a string of at most {MAX_ID_LEN} printable ASCII characters"
            ));
            None
        }
    };
    let deadline_ms = match obj.get("deadline_ms") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(ms) if (1..=MAX_TRIGGER_TIMEOUT_MS).contains(&ms) => Some(ms),
            _ => {
                problems.push(format!(
                    "deadline_ms must be an integer from 1 to {MAX_TRIGGER_TIMEOUT_MS}"
                ));
                None
            }
        },
    };
    // Region names are checked against the camera's regions when the request is served; an
    // empty list (or none) means every region of the camera.
    let mut regions = Vec::new();
    match obj.get("regions") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Array(names)) if names.len() <= 64 => {
            for n in names {
                match n.as_str() {
                    Some(s) => regions.push(s.to_owned()),
                    None => {
                        problems.push("regions must be a list of region names".to_owned());
                        break;
                    }
                }
            }
        }
        Some(_) => problems.push("regions must be a list of at most 64 region names".to_owned()),
    }
    Ok(Request {
        meas_id,
        part_id,
        regions,
        deadline_ms,
        problem: problems.into_iter().next(),
    })
}

/// Logs an unanswerable request, at most once a second.
fn log_limited(camera: &str, why: &str) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = unix_ms();
    let last = LAST.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 1000
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        warn!(
            camera = %sanitize(camera, MAX_STRING_BYTES),
            "trigger request on <prefix>/<camera>/inspect: {why}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_request_parses() {
        let r = parse_request(br#"{"meas_id":"M1"}"#).expect("ok");
        assert_eq!(r.meas_id, "M1");
        assert_eq!((r.part_id, r.deadline_ms, r.problem), (None, None, None));
        assert!(r.regions.is_empty());
        let r = parse_request(br#"{"meas_id":"M1","part_id":"P","deadline_ms":500,"regions":[]}"#)
            .expect("ok");
        assert_eq!(
            (r.part_id.as_deref(), r.deadline_ms),
            (Some("P"), Some(500))
        );
        assert_eq!(r.problem, None);
    }

    #[test]
    fn requests_without_a_readable_meas_id_are_unanswerable() {
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            b"{}",
            br#"{"meas_id":""}"#,
            br#"{"meas_id":{"a":1}}"#,
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_request(&vec![b' '; MAX_PARSED_BYTES + 1]).is_err());
    }

    #[test]
    fn bad_fields_are_answered_with_a_reason() {
        let long = "x".repeat(65);
        let cases = [
            (format!(r#"{{"meas_id":"{long}"}}"#), "meas_id must be"),
            (
                r#"{"meas_id":"M","part_id":[1]}"#.to_owned(),
                "part_id must be",
            ),
            (
                r#"{"meas_id":"M","deadline_ms":0}"#.to_owned(),
                "deadline_ms must be",
            ),
            (
                r#"{"meas_id":"M","deadline_ms":"5"}"#.to_owned(),
                "deadline_ms must be",
            ),
            (
                r#"{"meas_id":"M","regions":[1]}"#.to_owned(),
                "regions must be",
            ),
            (
                r#"{"meas_id":"M","regions":"left"}"#.to_owned(),
                "regions must be",
            ),
            (
                format!(r#"{{"meas_id":"M","pad":"{}"}}"#, "p".repeat(5000)),
                "exceeds 4096",
            ),
        ];
        for (payload, want) in cases {
            let r = parse_request(payload.as_bytes()).expect("answerable");
            let problem = r.problem.unwrap_or_default();
            assert!(problem.contains(want), "{payload:.80}: {problem}");
            assert!(r.meas_id.len() <= MAX_ID_LEN);
        }
    }

    #[test]
    fn the_worst_region_decides_the_answer() {
        assert!(rank(Verdict::Ng) > rank(Verdict::Unknown));
        assert!(rank(Verdict::Unknown) > rank(Verdict::Ok));
        assert_eq!(answer_verdict(Verdict::Ng), InspectionVerdict::Ng);
    }
}
