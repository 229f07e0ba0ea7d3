//! Calibration captures started from the live view: the decision-statistic values of the next
//! N frames of one camera region, collected from the running daemon, turned into a proposed
//! calibration the engineer accepts (written to the state directory) or discards.
//!
//! Input: [`Captures::start`] (from the page: region, frames, rates, least interval); one
//! [`Captures::sample`] per region decision from the inference worker (a relaxed atomic load
//! and nothing else while no capture runs). Output: [`Captures::status`] for the page (progress,
//! then the proposal: T1/T2, the rates, the histogram, notes), [`Captures::take`] for accepting.
//! The values are exactly what the region decides with (same crop, ignore polygons, statistic and
//! few-shot bank), so the proposal equals what `anomalyclip-edge calibrate --frames N` computes
//! from the same frames ([`crate::calibration::calibrate`], source `camera`).
//!
//! Few-shot references the same way ([`Captures::start_reference`]): K crops of the region
//! copied from the next frames (the same crop the region scores), then the worker builds the bank
//! with its own encoder ([`Captures::reference_ready`] / [`Captures::reference_built`]: K encoder
//! runs, during which inference waits — seconds on a CPU with the full model), the page shows its
//! size and the engineer accepts it (written to `<state_dir>/reference/<camera>/<region>.bank`,
//! daemon reloaded) or discards it.
//!
//! Failure modes: bad options (frames outside 10..=100 000, rates as `calibrate` checks them) are
//! refused at start with one line; a region whose geometry, model or statistic changes during the
//! capture (a reload) ends the capture as failed with the reason; too few frames for the rate is
//! the calibration's own error, shown as the failure. One capture per region at a time; a
//! finished or failed one is replaced by the next start.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::calibration::{self, Calibration, Fingerprint, Options};

/// Frames a capture may ask for.
pub const FRAMES: std::ops::RangeInclusive<usize> = 10..=100_000;
/// Longest least-interval between two samples.
pub const MAX_INTERVAL_MS: u64 = 60_000;

/// What the page asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Region name; `""` (or absent) for a camera without regions.
    #[serde(default)]
    pub region: String,
    pub frames: usize,
    /// α: target false-NG rate per frame for T2.
    pub rate: f64,
    /// Rate for T1 (default 10·α, at most 0.5).
    #[serde(default)]
    pub unknown_rate: Option<f64>,
    /// Least time between two samples, in milliseconds (default 200, as `calibrate`).
    #[serde(default = "default_interval")]
    pub min_interval_ms: u64,
}

fn default_interval() -> u64 {
    200
}

#[derive(Debug, Clone)]
enum State {
    Running,
    Done(Box<Calibration>),
    Failed(String),
}

#[derive(Debug)]
struct Capture {
    target: usize,
    min_interval: Duration,
    rate: f64,
    unknown_rate: Option<f64>,
    last: Option<Instant>,
    values: Vec<f32>,
    fingerprint: Option<Fingerprint>,
    /// Whether the region decides with its calibration (`calibration = true`).
    uses_calibration: bool,
    started: Instant,
    state: State,
}

/// A capture as the page sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// `running`, `done` or `failed`.
    pub state: &'static str,
    pub n: usize,
    pub target: usize,
    pub elapsed_s: f64,
    /// The proposed calibration once done.
    pub proposal: Option<Calibration>,
    pub error: Option<String>,
    /// Whether the region decides with its calibration (else the proposal is written but not
    /// used until `calibration = true` is set for the region).
    pub uses_calibration: bool,
}

/// What a sample needs from the region (asked for only while a capture runs).
pub struct SampleContext {
    pub fingerprint: Fingerprint,
    /// The camera's alarm debounce, N of M.
    pub debounce: (u32, u32),
    pub uses_calibration: bool,
}

/// Good frames a reference capture may ask for (APRIL-GAN's K).
pub const REFERENCE_FRAMES: std::ops::RangeInclusive<usize> = 1..=16;

/// What the page asks for to build a few-shot bank.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceRequest {
    #[serde(default)]
    pub region: String,
    /// K: good frames in the bank.
    pub frames: usize,
    #[serde(default = "default_interval")]
    pub min_interval_ms: u64,
}

/// One region crop, RGB, rows of `w * 3` bytes.
#[derive(Debug, Clone)]
pub struct Crop {
    pub rgb: Vec<u8>,
    pub w: usize,
    pub h: usize,
}

/// A reference capture's crops, handed to the worker to build the bank.
#[derive(Debug)]
pub struct ReferenceJob {
    pub camera: String,
    pub region: String,
    /// The region's bank key (name and geometry, see `daemon::reference_region_key`).
    pub key: String,
    pub crops: Vec<Crop>,
}

#[derive(Debug)]
enum RefState {
    Running,
    /// All crops taken; the worker builds the bank.
    Building,
    Built(Box<crate::reference::Bank>),
    Failed(String),
}

#[derive(Debug)]
struct RefCapture {
    target: usize,
    min_interval: Duration,
    last: Option<Instant>,
    crops: Vec<Crop>,
    key: Option<String>,
    started: Instant,
    state: RefState,
}

/// A reference capture as the page sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ReferenceStatus {
    /// `running`, `building`, `done` or `failed`.
    pub state: &'static str,
    pub n: usize,
    pub target: usize,
    pub elapsed_s: f64,
    /// Once built: the bank's feature bytes.
    pub bytes: Option<u64>,
    pub error: Option<String>,
}

/// All captures of the daemon.
#[derive(Debug, Default)]
pub struct Captures {
    running: AtomicUsize,
    map: Mutex<HashMap<(String, String), Capture>>,
    /// Reference captures running or waiting to be built.
    ref_running: AtomicUsize,
    refs: Mutex<HashMap<(String, String), RefCapture>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Captures {
    /// Starts a capture for `camera`/`req.region`; `Err` (one line) for bad options or when one
    /// is already running for that region.
    pub fn start(&self, camera: &str, req: &StartRequest) -> Result<(), String> {
        if !FRAMES.contains(&req.frames) {
            return Err(format!(
                "frames {} is outside {}..={}",
                req.frames,
                FRAMES.start(),
                FRAMES.end()
            ));
        }
        if req.min_interval_ms > MAX_INTERVAL_MS {
            return Err(format!(
                "min_interval_ms {} is over {MAX_INTERVAL_MS}",
                req.min_interval_ms
            ));
        }
        let mut opts = Options::new(req.rate);
        if let Some(u) = req.unknown_rate {
            opts.unknown_rate = u;
        }
        opts.validate().map_err(|e| e.to_string())?;
        let needed = calibration::frames_needed(req.rate);
        if (req.frames as u64) < needed {
            return Err(format!(
                "a false-NG rate of {} per frame needs at least {needed} good frames ({} asked)",
                req.rate, req.frames
            ));
        }
        let mut map = lock(&self.map);
        let key = (camera.to_owned(), req.region.clone());
        if map
            .get(&key)
            .is_some_and(|c| matches!(c.state, State::Running))
        {
            return Err("a capture is already running for this region".into());
        }
        map.insert(
            key,
            Capture {
                target: req.frames,
                min_interval: Duration::from_millis(req.min_interval_ms),
                rate: req.rate,
                unknown_rate: req.unknown_rate,
                last: None,
                values: Vec::with_capacity(req.frames.min(10_000)),
                fingerprint: None,
                uses_calibration: false,
                started: Instant::now(),
                state: State::Running,
            },
        );
        self.running.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether any capture runs (the worker's fast path).
    pub fn any_running(&self) -> bool {
        self.running.load(Ordering::Relaxed) > 0
    }

    /// One region decision's statistic value. `context` is called only when a capture of this
    /// region is running.
    pub fn sample(
        &self,
        camera: &str,
        region: &str,
        value: f32,
        context: impl FnOnce() -> SampleContext,
    ) {
        if !self.any_running() {
            return;
        }
        let mut map = lock(&self.map);
        let Some(c) = map.get_mut(&(camera.to_owned(), region.to_owned())) else {
            return;
        };
        if !matches!(c.state, State::Running) || !value.is_finite() {
            return;
        }
        let now = Instant::now();
        if c.last
            .is_some_and(|t| now.duration_since(t) < c.min_interval)
        {
            return;
        }
        let ctx = context();
        match &c.fingerprint {
            None => {
                c.fingerprint = Some(ctx.fingerprint.clone());
                c.uses_calibration = ctx.uses_calibration;
            }
            Some(fp) => {
                if let Some(why) = fp.mismatch(&ctx.fingerprint) {
                    c.state = State::Failed(format!(
                        "the region changed during the capture ({why}): start again"
                    ));
                    self.running.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        c.last = Some(now);
        c.values.push(value);
        if c.values.len() < c.target {
            return;
        }
        let mut opts = Options::new(c.rate);
        if let Some(u) = c.unknown_rate {
            opts.unknown_rate = u;
        }
        opts.debounce = Some(ctx.debounce);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        c.state = match calibration::calibrate(
            &c.values,
            &opts,
            ctx.fingerprint,
            camera,
            region,
            "camera",
            now_ms,
        ) {
            Ok(cal) => State::Done(Box::new(cal)),
            Err(e) => State::Failed(e.to_string()),
        };
        self.running.fetch_sub(1, Ordering::Relaxed);
    }

    /// The capture of `camera`/`region`, if any.
    pub fn status(&self, camera: &str, region: &str) -> Option<Status> {
        let map = lock(&self.map);
        let c = map.get(&(camera.to_owned(), region.to_owned()))?;
        let (state, proposal, error) = match &c.state {
            State::Running => ("running", None, None),
            State::Done(cal) => ("done", Some((**cal).clone()), None),
            State::Failed(e) => ("failed", None, Some(e.clone())),
        };
        Some(Status {
            state,
            n: c.values.len(),
            target: c.target,
            elapsed_s: c.started.elapsed().as_secs_f64(),
            proposal,
            error,
            uses_calibration: c.uses_calibration,
        })
    }

    /// Removes a finished capture and returns its calibration (for accepting it).
    pub fn take(&self, camera: &str, region: &str) -> Option<Calibration> {
        let mut map = lock(&self.map);
        let key = (camera.to_owned(), region.to_owned());
        if matches!(map.get(&key).map(|c| &c.state), Some(State::Done(_)))
            && let Some(Capture {
                state: State::Done(cal),
                ..
            }) = map.remove(&key)
        {
            return Some(*cal);
        }
        None
    }

    /// Starts a reference capture for `camera`/`req.region`.
    pub fn start_reference(&self, camera: &str, req: &ReferenceRequest) -> Result<(), String> {
        if !REFERENCE_FRAMES.contains(&req.frames) {
            return Err(format!(
                "frames {} is outside {}..={}",
                req.frames,
                REFERENCE_FRAMES.start(),
                REFERENCE_FRAMES.end()
            ));
        }
        if req.min_interval_ms > MAX_INTERVAL_MS {
            return Err(format!(
                "min_interval_ms {} is over {MAX_INTERVAL_MS}",
                req.min_interval_ms
            ));
        }
        let mut refs = lock(&self.refs);
        let key = (camera.to_owned(), req.region.clone());
        if refs
            .get(&key)
            .is_some_and(|c| matches!(c.state, RefState::Running | RefState::Building))
        {
            return Err("a reference capture is already running for this region".into());
        }
        refs.insert(
            key,
            RefCapture {
                target: req.frames,
                min_interval: Duration::from_millis(req.min_interval_ms),
                last: None,
                crops: Vec::with_capacity(req.frames),
                key: None,
                started: Instant::now(),
                state: RefState::Running,
            },
        );
        self.ref_running.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether any reference capture runs or waits to be built (the worker's fast path).
    pub fn any_reference(&self) -> bool {
        self.ref_running.load(Ordering::Relaxed) > 0
    }

    /// Offers one region crop of a scored frame: `crop` is called only when a reference
    /// capture of this region takes it. `key` is the region's bank key: a different key than
    /// the first sample's (a reload moved the region) fails the capture.
    pub fn reference_sample(
        &self,
        camera: &str,
        region: &str,
        key: &str,
        crop: impl FnOnce() -> Option<Crop>,
    ) {
        if !self.any_reference() {
            return;
        }
        let mut refs = lock(&self.refs);
        let Some(c) = refs.get_mut(&(camera.to_owned(), region.to_owned())) else {
            return;
        };
        if !matches!(c.state, RefState::Running) {
            return;
        }
        let now = Instant::now();
        if c.last
            .is_some_and(|t| now.duration_since(t) < c.min_interval)
        {
            return;
        }
        match &c.key {
            None => c.key = Some(key.to_owned()),
            Some(k) if k != key => {
                c.state =
                    RefState::Failed("the region changed during the capture: start again".into());
                self.ref_running.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            Some(_) => {}
        }
        let Some(crop) = crop() else { return };
        c.last = Some(now);
        c.crops.push(crop);
        if c.crops.len() >= c.target {
            c.state = RefState::Building;
        }
    }

    /// A capture whose crops are all taken, for the worker to build (its state stays
    /// `building` until [`Captures::reference_built`]).
    pub fn reference_ready(&self) -> Option<ReferenceJob> {
        if !self.any_reference() {
            return None;
        }
        let mut refs = lock(&self.refs);
        let ((camera, region), c) = refs
            .iter_mut()
            .find(|(_, c)| matches!(c.state, RefState::Building) && !c.crops.is_empty())?;
        Some(ReferenceJob {
            camera: camera.clone(),
            region: region.clone(),
            key: c.key.clone().unwrap_or_default(),
            crops: std::mem::take(&mut c.crops),
        })
    }

    /// The worker's answer for a [`ReferenceJob`]: the bank, or why it could not be built.
    pub fn reference_built(
        &self,
        camera: &str,
        region: &str,
        bank: Result<crate::reference::Bank, String>,
    ) {
        let mut refs = lock(&self.refs);
        if let Some(c) = refs.get_mut(&(camera.to_owned(), region.to_owned()))
            && matches!(c.state, RefState::Building)
        {
            c.state = match bank {
                Ok(b) => RefState::Built(Box::new(b)),
                Err(e) => RefState::Failed(e),
            };
            self.ref_running.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The reference capture of `camera`/`region`, if any.
    pub fn reference_status(&self, camera: &str, region: &str) -> Option<ReferenceStatus> {
        let refs = lock(&self.refs);
        let c = refs.get(&(camera.to_owned(), region.to_owned()))?;
        let (state, bytes, error) = match &c.state {
            RefState::Running => ("running", None, None),
            RefState::Building => ("building", None, None),
            RefState::Built(b) => ("done", Some(b.feature_bytes()), None),
            RefState::Failed(e) => ("failed", None, Some(e.clone())),
        };
        Some(ReferenceStatus {
            state,
            n: if matches!(c.state, RefState::Running) {
                c.crops.len()
            } else {
                c.target
            },
            target: c.target,
            elapsed_s: c.started.elapsed().as_secs_f64(),
            bytes,
            error,
        })
    }

    /// Removes a built reference capture and returns its bank (for accepting it).
    pub fn take_reference(&self, camera: &str, region: &str) -> Option<crate::reference::Bank> {
        let mut refs = lock(&self.refs);
        let key = (camera.to_owned(), region.to_owned());
        if matches!(refs.get(&key).map(|c| &c.state), Some(RefState::Built(_)))
            && let Some(RefCapture {
                state: RefState::Built(b),
                ..
            }) = refs.remove(&key)
        {
            return Some(*b);
        }
        None
    }

    /// Drops the reference capture of `camera`/`region`; whether there was one.
    pub fn discard_reference(&self, camera: &str, region: &str) -> bool {
        let removed = lock(&self.refs).remove(&(camera.to_owned(), region.to_owned()));
        if let Some(c) = &removed
            && matches!(c.state, RefState::Running | RefState::Building)
        {
            self.ref_running.fetch_sub(1, Ordering::Relaxed);
        }
        removed.is_some()
    }

    /// Drops the capture of `camera`/`region` (running or not); whether there was one.
    pub fn discard(&self, camera: &str, region: &str) -> bool {
        let removed = lock(&self.map).remove(&(camera.to_owned(), region.to_owned()));
        if let Some(c) = &removed
            && matches!(c.state, State::Running)
        {
            self.running.fetch_sub(1, Ordering::Relaxed);
        }
        removed.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(rect: &str) -> Fingerprint {
        Fingerprint {
            model_sha256: "m".into(),
            text_sha256: "t".into(),
            backend: "cpu".into(),
            precision: "fp32".into(),
            input_size: 112,
            rect: rect.into(),
            ignore_sha256: String::new(),
            statistic: "global".into(),
            reference: String::new(),
        }
    }

    fn ctx(rect: &str) -> SampleContext {
        SampleContext {
            fingerprint: fp(rect),
            debounce: (3, 5),
            uses_calibration: true,
        }
    }

    fn req(frames: usize) -> StartRequest {
        StartRequest {
            region: "r".into(),
            frames,
            rate: 0.05,
            unknown_rate: None,
            min_interval_ms: 0,
        }
    }

    #[test]
    fn a_capture_collects_then_proposes_what_calibrate_computes() {
        let c = Captures::default();
        c.sample("cam", "r", 0.5, || panic!("no capture: no context asked"));
        c.start("cam", &req(40)).expect("start");
        assert!(c.start("cam", &req(40)).is_err(), "one at a time");
        let values: Vec<f32> = (0..40).map(|i| 0.2 + 0.01 * i as f32).collect();
        for v in &values {
            c.sample("cam", "r", *v, || ctx("full"));
            c.sample("cam", "other", 0.9, || panic!("other region"));
        }
        c.sample("cam", "r", f32::NAN, || ctx("full"));
        let s = c.status("cam", "r").expect("status");
        assert_eq!((s.state, s.n, s.target), ("done", 40, 40));
        let p = s.proposal.expect("proposal");
        let mut opts = Options::new(0.05);
        opts.debounce = Some((3, 5));
        let direct = calibration::calibrate(&values, &opts, fp("full"), "cam", "r", "camera", 0)
            .expect("calibrate");
        assert_eq!(
            (p.t1, p.t2, p.alarm_rate),
            (direct.t1, direct.t2, direct.alarm_rate)
        );
        assert!(!c.any_running());
        assert_eq!(c.take("cam", "r").map(|x| x.t2), Some(direct.t2));
        assert!(c.status("cam", "r").is_none());
    }

    #[test]
    fn a_reference_capture_takes_k_crops_hands_them_to_the_worker_once_and_fails_on_a_moved_region()
    {
        let c = Captures::default();
        let req = |frames| ReferenceRequest {
            region: "r".into(),
            frames,
            min_interval_ms: 0,
        };
        assert!(c.start_reference("cam", &req(0)).is_err());
        assert!(c.start_reference("cam", &req(17)).is_err());
        c.start_reference("cam", &req(2)).expect("start");
        assert!(c.start_reference("cam", &req(2)).is_err(), "one at a time");
        let crop = || {
            Some(Crop {
                rgb: vec![1; 12],
                w: 2,
                h: 2,
            })
        };
        c.reference_sample("cam", "r", "key", crop);
        assert!(c.reference_ready().is_none(), "1 of 2");
        c.reference_sample("cam", "r", "key", crop);
        c.reference_sample("cam", "r", "key", || panic!("no third crop"));
        let job = c.reference_ready().expect("ready");
        assert_eq!((job.crops.len(), job.key.as_str()), (2, "key"));
        assert!(c.reference_ready().is_none(), "handed out once");
        assert_eq!(
            c.reference_status("cam", "r").map(|s| s.state),
            Some("building")
        );
        c.reference_built("cam", "r", Err("no encoder".into()));
        let s = c.reference_status("cam", "r").expect("status");
        assert_eq!(
            (s.state, s.error.as_deref()),
            ("failed", Some("no encoder"))
        );
        assert!(!c.any_reference());
        assert!(c.take_reference("cam", "r").is_none());
        c.start_reference("cam", &req(3))
            .expect("a failed one is replaced");
        c.reference_sample("cam", "r", "key", crop);
        c.reference_sample("cam", "r", "moved", crop);
        assert_eq!(
            c.reference_status("cam", "r").map(|s| s.state),
            Some("failed")
        );
        assert!(!c.any_reference());
    }

    #[test]
    fn a_region_changed_mid_capture_fails_it_and_bad_options_are_refused() {
        let c = Captures::default();
        c.start("cam", &req(20)).expect("start");
        c.sample("cam", "r", 0.3, || ctx("a"));
        c.sample("cam", "r", 0.3, || ctx("b"));
        let s = c.status("cam", "r").expect("status");
        assert_eq!(s.state, "failed");
        assert!(s.error.unwrap_or_default().contains("changed"));
        assert!(!c.any_running());
        assert!(c.start("cam", &req(5)).unwrap_err().contains("frames 5"));
        let mut r = req(20);
        r.rate = 0.001;
        assert!(c.start("cam", &r).unwrap_err().contains("999"));
        r.rate = 1.5;
        assert!(c.start("cam", &r).is_err());
        c.start("cam", &req(20))
            .expect("a failed capture is replaced");
        assert!(c.discard("cam", "r"));
        assert!(!c.any_running());
    }
}
