//! The streaming daemon (`anomalyclip-edge run`): cameras → inference worker → MQTT, with
//! stats, systemd integration (readiness, progress-gated watchdog, status line), SIGHUP reload
//! and one shutdown path.
//!
//! Threads: one per camera (GStreamer, [`crate::camera`]); one inference worker (blocking ONNX
//! Runtime + CPU head); a small tokio runtime for the publisher ([`crate::mqtt`]), signals,
//! stats and the watchdog.
//!
//! Edges and their full-policies: camera → worker: one latest-frame slot per camera (overwrite,
//! counted as dropped); worker → publisher: results and masks are latest-value data (dropped and
//! counted when the broker is away or the channel is full); alarms are never dropped (disk queue
//! in the state directory, replayed in order).
//!
//! Alarm state survives restarts: the last alarm state of each camera is kept in
//! `<state_dir>/alarm-state.v1.json` (written atomically at every transition), so an alarm raised
//! before a restart (its retained `active: true` still on the broker) is cleared by the new
//! process's first normal frames instead of staying raised for good.
//!
//! Camera statuses: the camera stage's [`CameraState`] is mapped to the one wire type
//! ([`payload::CameraStatus`], see [`CameraState::wire`]) and forwarded before the camera's first
//! frame reaches the worker, so `online` precedes the first result of each connection. A camera
//! removed by a reload is published `offline` once, then forgotten: the publisher clears its
//! retained topics ([`PublisherHandle::forget_camera`]) and its alarm state is dropped.
//!
//! Stats windows: `fps_in` counts the samples the camera received since the last report;
//! `fps_scored` counts those of them scored by the report (by sample ordinal,
//! [`camera::Frame::ordinal`]), so it never exceeds `fps_in`; a frame still in flight at the
//! report is not counted in any window's rate (the totals `frames_in` and `scored` are exact).
//!
//! Failure modes: a configuration, model or state-directory problem at start is an error (the
//! process exits 2 and systemd's `ExecStartPre=check-config` shows why) — among them a state
//! directory already locked by another daemon ([`crate::statedir`]); a camera or the broker
//! failing at run time is reported on MQTT and in the log, and the daemon keeps running.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};

use crate::alarm::Debouncer;
use crate::camera::{self, Camera, CameraSettings, CameraState, FrameNotify, LatestSlot};
use crate::config::{self, CameraConfig, Config, ConfigErrors, MaskConfig};
use crate::engine::EngineOptions;
use crate::mqtt::{Publisher, PublisherError, PublisherHandle};
use crate::package::HashCheck;
use crate::payload::{self, Alarm, CameraStats, FrameResult, MaskGate, Stats};
use crate::scorer::{DEFAULT_PIXEL_THRESHOLD, ScoreError, Scorer};
use crate::statedir::{self, StateDir, StateDirError};

mod control;
pub use control::{Control, ControlHandle, Deadline, control};

/// How long a clean stop may take for in-flight frames and the final MQTT messages.
pub const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// The part of [`STOP_DEADLINE`] kept for the publisher (flush queued alarms, publish every
/// camera `offline` and the node `stopped`, DISCONNECT) whatever the cameras and the worker took.
pub const PUBLISHER_STOP_RESERVE: Duration = Duration::from_millis(1500);

/// Test hook: while the file named by this variable exists, the inference worker stalls
/// (as a hung GPU or a deadlocked engine would), so tests can prove the watchdog stops.
pub const STALL_FILE_ENV: &str = "ANOMALYCLIP_TEST_STALL_FILE";

/// File in the state directory holding the last alarm state of each camera (JSON object,
/// camera name → raised).
pub const ALARM_STATE_FILE: &str = "alarm-state.v1.json";

/// The last alarm state of each camera, as the subscribers were told it, kept on disk.
struct AlarmStates {
    path: PathBuf,
    raised: Mutex<std::collections::BTreeMap<String, bool>>,
}

impl AlarmStates {
    /// Reads the file in `dir`; missing is empty, unreadable or corrupt is logged and empty.
    /// Only the cameras in `cameras` are kept.
    fn load(dir: &Path, cameras: &[CameraConfig]) -> Self {
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
        raised.retain(|name, _| cameras.iter().any(|c| c.name == *name));
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

    fn is_raised(&self, camera: &str) -> bool {
        lock(&self.raised).get(camera).copied().unwrap_or(false)
    }

    /// Records a transition and rewrites the file ([`statedir::replace_file`]: temporary file,
    /// fsync, rename; never through a symlink).
    fn set(&self, camera: &str, raised: bool) {
        let mut map = lock(&self.raised);
        map.insert(camera.to_owned(), raised);
        self.write(&map);
    }

    /// Forgets a camera removed by a reload (its retained alarm is cleared on the broker).
    fn forget(&self, camera: &str) {
        let mut map = lock(&self.raised);
        if map.remove(camera).is_some() {
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

/// Start-up errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("model: {0}")]
    Model(#[from] ScoreError),
    #[error("mqtt: {0}")]
    Publisher(#[from] PublisherError),
    #[error("camera: {0}")]
    Camera(#[from] camera::CameraError),
    #[error("{0}")]
    StateDir(#[from] StateDirError),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error("inference worker: {0}")]
    Worker(String),
}

/// Scoring settings and alarm state of one camera, changed in place by a reload. It outlives
/// the camera's pipeline: a reload that restarts the camera (new source or rate cap) hands it
/// to the new one, so the alarm state and the frame numbering carry on.
struct CamState {
    /// Index of the camera instance whose frames this state scores. A reload that restarts the
    /// camera gives it a new index; frames of the old instance still in flight are dropped.
    index: usize,
    /// Added to the camera instance's own frame numbers (which start at 0), so that `seq` keeps
    /// increasing for subscribers when a reload restarts the camera.
    seq_base: u64,
    /// One past the last `seq` scored.
    next_seq: u64,
    threshold: f32,
    pixel_threshold: f32,
    debouncer: Debouncer,
    mask: MaskConfig,
    gate: MaskGate,
    scored: u64,
    /// The stats window, in the camera instance's sample ordinals ([`camera::Frame::ordinal`]):
    /// it starts at the `frames_in` of the last report.
    frames_in_at_last_stats: u64,
    /// Frames scored whose ordinal is in the current window (so never more than the samples
    /// received in it).
    scored_in_window: u64,
    /// Frames of this camera in batches whose inference failed.
    inference_errors: u64,
    latencies_ms: Vec<f32>,
}

impl CamState {
    fn new(cfg: &CameraConfig, index: usize, raised: bool) -> Self {
        let mut debouncer = Debouncer::new(cfg.alarm)
            .unwrap_or_else(|_| Debouncer::new(Default::default()).expect("default debounce"));
        debouncer.restore(raised);
        Self {
            index,
            seq_base: 0,
            next_seq: 0,
            threshold: cfg.threshold,
            pixel_threshold: cfg.pixel_threshold,
            // The config validated the debounce parameters (defaults above if not).
            debouncer,
            mask: cfg.mask,
            gate: MaskGate::new(cfg.mask.only_on_anomaly, cfg.mask.min_interval),
            scored: 0,
            frames_in_at_last_stats: 0,
            scored_in_window: 0,
            inference_errors: 0,
            latencies_ms: Vec::new(),
        }
    }

    /// Applies a reloaded `[[camera]]` entry. A changed debounce keeps the alarm state (a
    /// raised alarm must still be cleared on MQTT, not forgotten with the old debouncer).
    fn apply(&mut self, old: &CameraConfig, new: &CameraConfig) {
        self.threshold = new.threshold;
        self.pixel_threshold = new.pixel_threshold;
        if new.alarm != old.alarm
            && let Err(e) = self.debouncer.reconfigure(new.alarm)
        {
            warn!(camera = %new.name, error = %e, "reload: alarm debounce not changed");
        }
        if new.mask != old.mask {
            self.mask = new.mask;
            self.gate = MaskGate::new(new.mask.only_on_anomaly, new.mask.min_interval);
        }
    }

    /// The camera was restarted as instance `index`: its frame numbers start again at 0.
    fn restarted(&mut self, index: usize) {
        self.index = index;
        self.seq_base = self.next_seq;
        self.frames_in_at_last_stats = 0;
        self.scored_in_window = 0;
    }
}

/// What the worker needs of a camera.
#[derive(Clone)]
struct CamHandle {
    index: usize,
    name: Arc<str>,
    slot: Arc<LatestSlot>,
    state: Arc<Mutex<CamState>>,
}

/// A running camera, owned by the control loop.
struct Running {
    cfg: CameraConfig,
    camera: Camera,
    handle: CamHandle,
}

/// State shared by the control loop and the worker.
struct Shared {
    cams: RwLock<Vec<CamHandle>>,
    stop: AtomicBool,
    /// Milliseconds since `started` when the worker last went round its loop.
    heartbeat_ms: AtomicU64,
    /// Milliseconds since `started` when the worker last scored a batch.
    scored_ms: AtomicU64,
    statuses: Mutex<HashMap<String, CameraState>>,
    alarm_states: AlarmStates,
    started: Instant,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sends an sd_notify message if running under systemd; never fails the caller.
fn notify(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some()
        && let Err(e) = sd_notify::notify(states)
    {
        warn!(error = %e, "sd_notify failed");
    }
}

/// Engine options from the config (the TensorRT engine cache lives in `<state_dir>/engines`).
pub fn engine_options(cfg: &Config) -> EngineOptions {
    EngineOptions {
        backend: cfg.engine.backend,
        threads: cfg.engine.threads as usize,
        ort_library: cfg.engine.ort_library.clone(),
        cache_dir: Some(cfg.state_dir.join("engines")),
        fp16: cfg.engine.fp16,
        max_batch: cfg.engine.max_batch.max(1) as usize,
        device_id: 0,
    }
}

/// Camera-stage settings from a `[[camera]]` entry; frames are scaled to the model's input
/// size in GStreamer.
fn camera_settings(cfg: &CameraConfig, size: usize) -> CameraSettings {
    cfg.settings(size as u32)
}

/// Runs the daemon until `control`'s shutdown token is cancelled (`main` cancels it on
/// SIGTERM/SIGINT; a reload request re-reads `config_path`). Returns after a clean stop, also
/// when the stop was requested during start-up (checked between the start-up steps).
pub fn run(config_path: &Path, control: Control) -> Result<(), DaemonError> {
    let cfg = config::load_config(config_path)?;
    // Ours alone until we return: a second daemon on this state directory stops here.
    let _state_dir = StateDir::open(&cfg.state_dir)?;
    camera::init()?;

    // The model first: a bad package fails before anything touches the broker.
    let scorer = Scorer::open(
        &cfg.model.package,
        HashCheck::UpTo(64 << 20),
        &engine_options(&cfg),
    )?
    .with_head(cfg.engine.head)?;
    if control.shutdown.is_cancelled() {
        info!("stop requested during start-up: stopping before connecting");
        return Ok(());
    }
    if scorer.package().manifest.tiny {
        warn!(
            package = %cfg.model.package.display(),
            "the model package holds random weights (a test model): its scores are meaningless for real detection"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ace-rt")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    rt.block_on(run_async(config_path.to_path_buf(), cfg, scorer, control))
}

async fn run_async(
    config_path: PathBuf,
    cfg: Config,
    scorer: Scorer,
    mut control: Control,
) -> Result<(), DaemonError> {
    let (publisher, pub_task) = Publisher::spawn(&cfg.mqtt, &cfg.node_id, &cfg.state_dir)?;
    let size = scorer.size();
    let model_name = scorer.package().manifest.name.clone();
    let engine_name = scorer.engine().info().backend.to_string();
    let shared = Arc::new(Shared {
        cams: RwLock::new(Vec::new()),
        stop: AtomicBool::new(false),
        heartbeat_ms: AtomicU64::new(0),
        scored_ms: AtomicU64::new(0),
        statuses: Mutex::new(HashMap::new()),
        alarm_states: AlarmStates::load(&cfg.state_dir, &cfg.cameras),
        started: Instant::now(),
    });
    let notify_frames = FrameNotify::new();
    let mut next_index = 0usize;
    let mut running: Vec<Running> = Vec::new();
    for c in &cfg.cameras {
        match start_camera(
            c,
            None,
            size,
            &mut next_index,
            &notify_frames,
            &publisher,
            &shared,
        ) {
            Ok(r) => running.push(r),
            Err(e) => {
                error!(camera = %c.name, error = %e, "camera could not start");
                publisher.camera_status(&c.name, payload::CameraStatus::Error(e.to_string()));
            }
        }
    }
    publish_handles(&shared, &running);

    let worker = {
        let shared = shared.clone();
        let publisher = publisher.clone();
        let notify_frames = notify_frames.clone();
        let max_batch = cfg.engine.max_batch.max(1) as usize;
        let max_wait = cfg.engine.max_wait;
        let model_name = model_name.clone();
        std::thread::Builder::new()
            .name("ace-infer".into())
            .spawn(move || {
                worker_loop(
                    shared,
                    scorer,
                    notify_frames,
                    publisher,
                    max_batch,
                    max_wait,
                    model_name,
                )
            })
            .map_err(DaemonError::Runtime)?
    };

    let mut current = cfg;
    let mut stats_tick = stats_timer(current.stats_interval);
    let wd = sd_notify::watchdog_enabled();
    let mut wd_tick = tokio::time::interval(
        wd.map(|d| d / 2)
            .unwrap_or(Duration::from_secs(5))
            .max(Duration::from_millis(50)),
    );
    let mut last_stats = Instant::now();

    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status_line(&shared, &publisher)),
    ]);
    info!(
        node = %current.node_id,
        cameras = running.len(),
        engine = %engine_name,
        watchdog = ?wd,
        "anomalyclip-edge running"
    );

    let shutdown = control.shutdown.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => { info!("stopping"); break; }
            Some(()) = control.reload.recv() => {
                let stats_before = current.stats_interval;
                reload(&config_path, &mut current, &mut running, size, &mut next_index,
                       &notify_frames, &publisher, &shared);
                if current.stats_interval != stats_before {
                    info!(interval = ?current.stats_interval, "reload: stats interval changed");
                    stats_tick = stats_timer(current.stats_interval);
                }
            }
            _ = stats_tick.tick() => {
                let stats = build_stats(&shared, &running, &engine_name, last_stats.elapsed());
                last_stats = Instant::now();
                publisher.stats(stats);
            }
            _ = wd_tick.tick() => {
                let line = status_line(&shared, &publisher);
                match wd {
                    Some(interval) if making_progress(&shared, &publisher, interval) => {
                        notify(&[sd_notify::NotifyState::Watchdog, sd_notify::NotifyState::Status(&line)]);
                    }
                    Some(_) => {
                        warn!("no progress within the watchdog interval: withholding WATCHDOG=1");
                        notify(&[sd_notify::NotifyState::Status(&line)]);
                    }
                    None => notify(&[sd_notify::NotifyState::Status(&line)]),
                }
            }
        }
    }

    // One shutdown path and one deadline: cameras first (in parallel), so no new frames
    // arrive; the worker finishes the batch in flight; the publisher gets what is left, and at
    // least PUBLISHER_STOP_RESERVE. A second signal quits at once (main).
    notify(&[sd_notify::NotifyState::Stopping]);
    let deadline = Deadline::after(STOP_DEADLINE);
    let stages = Deadline::after(STOP_DEADLINE.saturating_sub(PUBLISHER_STOP_RESERVE));
    let cams: Vec<Running> = std::mem::take(&mut running);
    let mut stoppers = Vec::new();
    for r in cams {
        let name = r.cfg.name.clone();
        let task = tokio::task::spawn_blocking(move || {
            if let Err(e) = r.camera.stop() {
                warn!(camera = %r.cfg.name, error = %e, "camera did not stop cleanly");
            }
        });
        stoppers.push((name, task));
    }
    for (name, task) in stoppers {
        if tokio::time::timeout_at(stages.instant().into(), task)
            .await
            .is_err()
        {
            warn!(straggler = %format!("camera {name}"), "camera still stopping at the stop deadline");
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    notify_frames.notify();
    let joined = tokio::task::spawn_blocking(move || worker.join());
    match tokio::time::timeout_at(stages.instant().into(), joined).await {
        Ok(Ok(Ok(()))) => {}
        Ok(_) => error!("inference worker ended abnormally"),
        Err(_) => warn!(
            straggler = "ace-infer",
            "inference worker still busy at the stop deadline"
        ),
    }
    // A quarter second of the budget for the publisher task to return after its own stop.
    publisher.shutdown(deadline.left().saturating_sub(Duration::from_millis(250)));
    if tokio::time::timeout_at(deadline.instant().into(), pub_task)
        .await
        .is_err()
    {
        warn!(
            straggler = "mqtt publisher",
            "publisher still busy at the stop deadline"
        );
    }
    info!("stopped");
    Ok(())
}

/// The stats timer: its first tick one period from now; a disabled report (`None`) never ticks.
fn stats_timer(every: Option<Duration>) -> tokio::time::Interval {
    let every = every.unwrap_or(Duration::from_secs(3600 * 24 * 365));
    tokio::time::interval_at(tokio::time::Instant::now() + every, every)
}

/// Starts camera `c` as a new instance. `carried`: the state and config of the instance it
/// replaces (reload with a new source or rate cap), so alarm state and numbering carry on.
fn start_camera(
    c: &CameraConfig,
    carried: Option<(Arc<Mutex<CamState>>, CameraConfig)>,
    size: usize,
    next_index: &mut usize,
    notify_frames: &Arc<FrameNotify>,
    publisher: &PublisherHandle,
    shared: &Arc<Shared>,
) -> Result<Running, camera::CameraError> {
    let index = *next_index;
    *next_index += 1;
    let cb: camera::StatusCallback = {
        let publisher = publisher.clone();
        let shared = shared.clone();
        Arc::new(move |ev: &camera::StatusEvent| {
            lock(&shared.statuses).insert(ev.name.to_string(), ev.status.clone());
            let Some(st) = ev.status.wire() else {
                return;
            };
            info!(camera = %ev.name, status = %ev.status, "camera status");
            publisher.camera_status(&ev.name, st);
        })
    };
    let camera = Camera::spawn(index, camera_settings(c, size), notify_frames.clone(), cb)?;
    let state = match carried {
        Some((state, old)) => {
            {
                let mut st = lock(&state);
                st.apply(&old, c);
                st.restarted(index);
            }
            state
        }
        None => Arc::new(Mutex::new(CamState::new(
            c,
            index,
            shared.alarm_states.is_raised(&c.name),
        ))),
    };
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

fn publish_handles(shared: &Shared, running: &[Running]) {
    let handles: Vec<CamHandle> = running.iter().map(|r| r.handle.clone()).collect();
    *shared.cams.write().unwrap_or_else(PoisonError::into_inner) = handles;
}

/// The inference worker: takes the latest frame of every camera that has one, batches up to
/// `max_batch` (waiting at most `max_wait` for more cameras), scores, publishes.
fn worker_loop(
    shared: Arc<Shared>,
    mut scorer: Scorer,
    notify_frames: Arc<FrameNotify>,
    publisher: PublisherHandle,
    max_batch: usize,
    max_wait: Duration,
    model_name: String,
) {
    let stall_file = std::env::var_os(STALL_FILE_ENV).map(PathBuf::from);
    let s = scorer.size();
    let mut input: Vec<f32> = Vec::new();
    let mut err_logged_at: Option<Instant> = None;
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
        let slots: Vec<Arc<LatestSlot>> = handles.iter().map(|h| h.slot.clone()).collect();
        let mut frames = notify_frames.take_any(&slots, Duration::from_millis(200));
        if frames.is_empty() {
            continue;
        }
        let target = max_batch.min(slots.len());
        if frames.len() < target && !max_wait.is_zero() {
            let deadline = Instant::now() + max_wait;
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
        for chunk in frames.chunks(max_batch) {
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
            // Each frame's area is computed by the head at its camera's pixel threshold.
            let thresholds: Vec<f32> = chunk
                .iter()
                .map(|f| {
                    handles
                        .iter()
                        .find(|h| h.index == f.camera)
                        .map_or(DEFAULT_PIXEL_THRESHOLD, |h| lock(&h.state).pixel_threshold)
                })
                .collect();
            let results = match prepared
                .and_then(|()| scorer.score_frames(&input[..n * 3 * s * s], &thresholds))
            {
                Ok(r) => r,
                Err(e) => {
                    for f in chunk {
                        if let Some(h) = handles.iter().find(|h| h.index == f.camera) {
                            let mut st = lock(&h.state);
                            if st.index == f.camera {
                                st.inference_errors += 1;
                            }
                        }
                    }
                    if err_logged_at.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        error!(error = %e, "inference failed; frames of this batch are not scored");
                        err_logged_at = Some(Instant::now());
                    }
                    continue;
                }
            };
            shared.scored_ms.store(shared.now_ms(), Ordering::Relaxed);
            for ((f, r), &pixel_threshold) in chunk.iter().zip(results).zip(&thresholds) {
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        // E.g. NaN in the model's output for this frame: nothing is published,
                        // the camera's inference_errors counts it.
                        if let Some(h) = handles.iter().find(|h| h.index == f.camera) {
                            let mut st = lock(&h.state);
                            if st.index == f.camera {
                                st.inference_errors += 1;
                            }
                        }
                        if err_logged_at.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            error!(error = %e, "inference failed; this frame is not scored");
                            err_logged_at = Some(Instant::now());
                        }
                        continue;
                    }
                };
                let Some(h) = handles.iter().find(|h| h.index == f.camera) else {
                    continue;
                };
                let mut st = lock(&h.state);
                if st.index != f.camera {
                    // A frame of the instance a reload just replaced: its numbering is gone.
                    continue;
                }
                let seq = st.seq_base + f.seq;
                st.next_seq = seq + 1;
                let anomaly = r.score >= st.threshold;
                let latency_ms = f.captured_at.elapsed().as_secs_f32() * 1e3;
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
                    model: model_name.clone(),
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
                    match payload::mask_png(
                        &h.name,
                        seq,
                        f.capture_unix_ms,
                        mask.size,
                        mask.size,
                        &px,
                    ) {
                        Ok(png) => {
                            publisher.mask(&h.name, png);
                        }
                        Err(e) => warn!(camera = %h.name, error = %e, "mask encoding failed"),
                    }
                }
                st.scored += 1;
                if f.ordinal >= st.frames_in_at_last_stats {
                    st.scored_in_window += 1;
                }
                if st.latencies_ms.len() < 100_000 {
                    st.latencies_ms.push(latency_ms);
                }
            }
        }
    }
    info!("inference worker stopped");
}

fn percentile(sorted: &[f32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)])
}

fn build_stats(shared: &Shared, running: &[Running], engine: &str, window: Duration) -> Stats {
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

/// Progress rule of the watchdog: the worker goes round its loop; if any camera is online, a
/// batch was scored within the interval; if the broker is connected and frames are scored, the
/// publisher got messages through. A broker or camera outage is reported, not restarted.
fn making_progress(shared: &Shared, publisher: &PublisherHandle, interval: Duration) -> bool {
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

fn status_line(shared: &Shared, publisher: &PublisherHandle) -> String {
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

/// SIGHUP: re-read and validate the config; apply camera settings in place, restart cameras
/// whose source, rate cap or retry backoff changed (their alarm state and `seq` numbering carry over), start
/// added ones, stop removed ones; keep the MQTT session. (The caller applies a changed stats
/// interval.) An invalid file is rejected and the running config stays.
#[allow(clippy::too_many_arguments)]
fn reload(
    path: &Path,
    current: &mut Config,
    running: &mut Vec<Running>,
    size: usize,
    next_index: &mut usize,
    notify_frames: &Arc<FrameNotify>,
    publisher: &PublisherHandle,
    shared: &Arc<Shared>,
) {
    let now = sd_notify::NotifyState::monotonic_usec_now();
    match &now {
        Ok(m) => notify(&[sd_notify::NotifyState::Reloading, m.clone()]),
        Err(_) => notify(&[sd_notify::NotifyState::Reloading]),
    }
    match config::load_config(path) {
        Err(e) => {
            for line in e.to_string().lines() {
                error!("reload rejected: {line}");
            }
            error!("reload rejected: keeping the running configuration");
        }
        Ok(new) => {
            for (what, changed) in [
                ("node_id", new.node_id != current.node_id),
                ("state_dir", new.state_dir != current.state_dir),
                ("[mqtt]", new.mqtt != current.mqtt),
                ("[model]", new.model != current.model),
                ("[engine]", new.engine != current.engine),
            ] {
                if changed {
                    warn!("reload: {what} changed; it takes effect at the next restart");
                }
            }
            // Removed cameras stop; re-sourced ones restart (keeping their alarm state and
            // numbering); new ones start; the rest change in place.
            let mut keep: Vec<Running> = Vec::new();
            let mut carried: HashMap<String, (Arc<Mutex<CamState>>, CameraConfig)> = HashMap::new();
            for r in running.drain(..) {
                match new.cameras.iter().find(|c| c.name == r.cfg.name) {
                    Some(c)
                        if c.source == r.cfg.source
                            && c.max_fps == r.cfg.max_fps
                            && c.retry == r.cfg.retry =>
                    {
                        lock(&r.handle.state).apply(&r.cfg, c);
                        keep.push(Running {
                            cfg: c.clone(),
                            ..r
                        });
                    }
                    other => {
                        info!(camera = %r.cfg.name, "reload: stopping camera");
                        if other.is_none() {
                            // Frames of it still in the worker are dropped, not published.
                            lock(&r.handle.state).index = usize::MAX;
                        }
                        let name = r.cfg.name.clone();
                        if let Err(e) = r.camera.stop() {
                            warn!(camera = %name, error = %e, "camera did not stop cleanly");
                        }
                        lock(&shared.statuses).remove(&name);
                        if other.is_none() {
                            // Stopped for good: `offline`, then its retained status and alarm
                            // are cleared and the publisher forgets it.
                            publisher.camera_status(&name, payload::CameraStatus::Offline);
                            publisher.forget_camera(&name);
                            shared.alarm_states.forget(&name);
                        } else {
                            carried.insert(name, (r.handle.state.clone(), r.cfg.clone()));
                        }
                    }
                }
            }
            for c in &new.cameras {
                if keep.iter().any(|r| r.cfg.name == c.name) {
                    continue;
                }
                info!(camera = %c.name, "reload: starting camera");
                let old = carried.remove(&c.name);
                match start_camera(c, old, size, next_index, notify_frames, publisher, shared) {
                    Ok(r) => keep.push(r),
                    Err(e) => {
                        error!(camera = %c.name, error = %e, "camera could not start");
                        publisher
                            .camera_status(&c.name, payload::CameraStatus::Error(e.to_string()));
                    }
                }
            }
            *running = keep;
            publish_handles(shared, running);
            let mut applied = new;
            applied.node_id = current.node_id.clone();
            applied.state_dir = current.state_dir.clone();
            applied.mqtt = current.mqtt.clone();
            applied.model = current.model.clone();
            applied.engine = current.engine.clone();
            *current = applied;
            info!(cameras = running.len(), "configuration reloaded");
        }
    }
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status_line(shared, publisher)),
    ]);
}
