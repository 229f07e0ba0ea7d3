//! The streaming daemon (`anomalyclip-edge run`): cameras → inference worker → MQTT, with
//! stats, systemd integration (readiness, progress-gated watchdog, status line), SIGHUP reload
//! and one shutdown path.
//!
//! Threads: one per camera (GStreamer, [`crate::camera`]); one inference worker (blocking ONNX
//! Runtime + CPU head); a small tokio runtime for the publisher ([`crate::mqtt`]), signals,
//! stats, the watchdog and the optional servers: the live view ([`crate::live`], `[http]`) and
//! the Prometheus endpoint ([`crate::metrics`], `[metrics]`, its counters followed once a
//! second from the same totals as `stats`).
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
use crate::camera::{self, Camera, CameraState, FrameNotify, LatestSlot};
use crate::config::{self, CameraConfig, Config, ConfigErrors, MaskConfig};
use crate::engine::EngineOptions;
use crate::mqtt::{Publisher, PublisherError};
use crate::package::HashCheck;
use crate::scorer::{ScoreError, Scorer};
use crate::statedir::{StateDir, StateDirError};

mod alarm_state;
mod calibrated;
mod cameras;
mod commands;
mod control;
mod health;
mod info;
mod references;
mod regions;
mod trigger;
mod worker;

pub use alarm_state::ALARM_STATE_FILE;
pub use control::{Control, ControlHandle, Deadline, control};

use alarm_state::AlarmStates;
use cameras::Cameras;
use health::{build_stats, making_progress, metrics_snapshot, notify, stats_timer, status_line};

/// How long a clean stop may take for in-flight frames and the final MQTT messages.
pub const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// The part of [`STOP_DEADLINE`] kept for the publisher (flush queued alarms, publish every
/// camera `offline` and the node `stopped`, DISCONNECT) whatever the cameras and the worker took.
pub const PUBLISHER_STOP_RESERVE: Duration = Duration::from_millis(1500);

/// Test hook: while the file named by this variable exists, the inference worker stalls
/// (as a hung GPU or a deadlocked engine would), so tests can prove the watchdog stops.
pub const STALL_FILE_ENV: &str = "ANOMALYCLIP_TEST_STALL_FILE";

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
    pixel_threshold: f32,
    mask: MaskConfig,
    /// The regions scored on each frame (one implicit whole-frame region without
    /// `[[camera.region]]`), in the config's order.
    units: Vec<regions::Unit>,
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

/// A debouncer for `cfg`, restored to `raised` (the config validated the parameters; the
/// defaults stand in if not).
fn debouncer(cfg: &CameraConfig, raised: bool) -> Debouncer {
    let mut d = Debouncer::new(cfg.alarm)
        .unwrap_or_else(|_| Debouncer::new(Default::default()).expect("default debounce"));
    d.restore(raised);
    d
}

impl CamState {
    fn new(
        cfg: &CameraConfig,
        index: usize,
        raised: &dyn Fn(&str) -> bool,
        validity: &regions::Validity,
    ) -> Self {
        let units = cfg
            .regions
            .iter()
            .map(|r| {
                let key = regions::unit_key(&cfg.name, r.level());
                regions::Unit::new(
                    &cfg.name,
                    r,
                    debouncer(cfg, raised(&key)),
                    &cfg.mask,
                    validity,
                )
            })
            .collect();
        Self {
            index,
            seq_base: 0,
            next_seq: 0,
            pixel_threshold: cfg.pixel_threshold,
            mask: cfg.mask,
            units,
            scored: 0,
            frames_in_at_last_stats: 0,
            scored_in_window: 0,
            inference_errors: 0,
            latencies_ms: Vec::new(),
        }
    }

    /// Applies a reloaded `[[camera]]` entry. Regions are matched by name: a kept region keeps
    /// its debouncer (a raised alarm must still be cleared on MQTT, not forgotten) and takes the
    /// new thresholds, shape and calibration; new regions start clear; removed regions are
    /// returned (their unit keys) so that their retained topics can be cleared.
    fn apply(
        &mut self,
        old: &CameraConfig,
        new: &CameraConfig,
        validity: &regions::Validity,
    ) -> Vec<String> {
        self.pixel_threshold = new.pixel_threshold;
        let mut units = std::mem::take(&mut self.units);
        let mut next = Vec::with_capacity(new.regions.len());
        for r in &new.regions {
            match units.iter().position(|u| u.cfg.name == r.name) {
                Some(i) => {
                    let mut u = units.swap_remove(i);
                    u.reconfigure(&new.name, r, validity);
                    if new.alarm != old.alarm
                        && let Err(e) = u.debouncer.reconfigure(new.alarm)
                    {
                        warn!(region = %u.key, error = %e, "reload: alarm debounce not changed");
                    }
                    if new.mask != old.mask {
                        u.gate = crate::payload::MaskGate::new(
                            new.mask.only_on_anomaly,
                            new.mask.min_interval,
                        );
                    }
                    next.push(u);
                }
                None => next.push(regions::Unit::new(
                    &new.name,
                    r,
                    debouncer(new, false),
                    &new.mask,
                    validity,
                )),
            }
        }
        self.units = next;
        self.mask = new.mask;
        units.into_iter().map(|u| u.key).collect()
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
    /// The cameras the worker serves; replaced by a reload (read each round by the worker).
    cams: RwLock<Vec<CamHandle>>,
    /// The worker's stop: set by the stop path after the cameras have stopped (the daemon's
    /// shutdown token is cancelled first), so the worker finishes the frames in flight.
    stop: AtomicBool,
    /// Milliseconds since `started` when the worker last went round its loop.
    heartbeat_ms: AtomicU64,
    /// Milliseconds since `started` when the worker last scored a batch.
    scored_ms: AtomicU64,
    statuses: Mutex<HashMap<String, CameraState>>,
    alarm_states: AlarmStates,
    /// What a region's calibration must have been made for.
    validity: regions::Validity,
    /// Triggered inspection: requests waiting for a frame, answers ([`trigger`]).
    trigger: trigger::Triggers,
    /// The Prometheus metrics when `[metrics]` is set ([`crate::metrics`]).
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The Sparkplug B edge node when `[sparkplug]` is set ([`crate::sparkplug`]).
    sparkplug: Option<crate::sparkplug::Sparkplug>,
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
        precision: cfg.engine.precision,
    }
}

pub use calibrated::fingerprint as calibration_fingerprint;
pub use references::{
    Loaded as LoadedReference, bank_path as reference_bank_path, check as check_references,
    load as load_reference, region_key as reference_region_key,
};
pub use regions::Validity;

/// What the running model and engine are, for calibration fingerprints.
pub fn validity(cfg: &Config, scorer: &Scorer) -> regions::Validity {
    let m = &scorer.package().manifest;
    let file = |name: &str| m.files.get(name).cloned().unwrap_or_default();
    let info = scorer.engine().info();
    regions::Validity {
        state_dir: cfg.state_dir.clone(),
        model_sha256: file("model.onnx"),
        text_sha256: file("text.f32"),
        backend: info.backend.to_string(),
        // The precision of the model file the engine loaded; a TensorRT engine built with
        // `fp16 = true` runs in fp16 too.
        precision: if cfg.engine.fp16 && info.backend.to_string() == "tensorrt" {
            "fp16".into()
        } else {
            cfg.engine.precision.as_str().into()
        },
        input_size: scorer.size() as u32,
        bank: crate::reference::Fingerprint::for_package(scorer.package(), "", 0),
        max_bank_mb: cfg.model.max_bank_mb,
    }
}

/// Runs the daemon until `control`'s shutdown token is cancelled (`main` cancels it on
/// SIGTERM/SIGINT; a reload request re-reads `config_path`). Returns after a clean stop, also
/// when the stop was requested during start-up (checked between the start-up steps).
pub fn run(config_path: &Path, control: Control) -> Result<(), DaemonError> {
    let mut cfg = config::load_config(config_path)?;
    // Ours alone until we return: a second daemon on this state directory stops here.
    let _state_dir = StateDir::open(&cfg.state_dir)?;
    // What commands changed (thresholds, disabled cameras) applies over the file.
    let overrides = commands::load_overrides(&cfg.state_dir);
    let applied = overrides.apply(&mut cfg);
    for note in &applied.notes {
        info!("override: {note}");
    }
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
    rt.block_on(run_async(
        config_path.to_path_buf(),
        cfg,
        (overrides, applied.disabled),
        scorer,
        control,
    ))
}

/// What stays the same across reloads and commands, for [`reload`].
struct Fixed<'a> {
    config_path: &'a Path,
    shared: &'a Shared,
    publisher: &'a crate::mqtt::PublisherHandle,
    model_info: &'a info::ModelInfo,
    engine_name: &'a str,
    started_ms: u64,
}

/// A reload (SIGHUP, the region editor, a lasting command): the file re-read with the
/// overrides over it, cameras changed by plan, Sparkplug devices, the trigger stage and the
/// birth certificate brought up to date. `Err`: rejected, the running configuration stays.
fn reload(
    fixed: &Fixed<'_>,
    cameras: &mut Cameras,
    overrides: &crate::commands::Overrides,
    current: &mut Config,
) -> Result<(), String> {
    let res = cameras.reload(fixed.config_path, overrides, current);
    if let Some(s) = &fixed.shared.sparkplug {
        s.devices(crate::sparkplug::device_specs(&current.cameras));
    }
    fixed.shared.trigger.configure(current);
    fixed.publisher.info(info::birth(
        current,
        &cameras.disabled,
        fixed.model_info,
        fixed.engine_name,
        fixed.started_ms,
    ));
    res
}

async fn run_async(
    config_path: PathBuf,
    cfg: Config,
    (mut overrides, disabled): (crate::commands::Overrides, Vec<String>),
    scorer: Scorer,
    mut control: Control,
) -> Result<(), DaemonError> {
    let (publisher, pub_task) = Publisher::spawn(&cfg.mqtt, &cfg.node_id, &cfg.state_dir)?;
    let size = scorer.size();
    let model_name = scorer.package().manifest.name.clone();
    let engine_name = scorer.engine().info().backend.to_string();
    let validity = validity(&cfg, &scorer);
    let model_info = info::ModelInfo::new(&scorer.package().manifest);
    let started_ms = unix_ms();
    publisher.info(info::birth(
        &cfg,
        &disabled,
        &model_info,
        &engine_name,
        started_ms,
    ));
    let metrics = cfg
        .metrics
        .as_ref()
        .map(|_| Arc::new(crate::metrics::Metrics::new()));
    let sparkplug = match &cfg.sparkplug {
        Some(spb) => Some(
            crate::sparkplug::Sparkplug::spawn(
                spb,
                &cfg.mqtt,
                &cfg.node_id,
                &cfg.state_dir,
                &model_name,
            )
            .map_err(|e| DaemonError::Worker(format!("sparkplug: {e}")))?,
        ),
        None => None,
    };
    let (sparkplug, spb_task) = match sparkplug {
        Some((h, t)) => (Some(h), Some(t)),
        None => (None, None),
    };
    if let Some(s) = &sparkplug {
        s.devices(crate::sparkplug::device_specs(&cfg.cameras));
    }
    let shared = Arc::new(Shared {
        cams: RwLock::new(Vec::new()),
        stop: AtomicBool::new(false),
        heartbeat_ms: AtomicU64::new(0),
        scored_ms: AtomicU64::new(0),
        statuses: Mutex::new(HashMap::new()),
        alarm_states: AlarmStates::load(&cfg.state_dir, &cfg.cameras),
        validity,
        trigger: trigger::Triggers::new(&cfg, publisher.clone(), metrics.clone()),
        metrics,
        sparkplug,
        started: Instant::now(),
    });
    // Trigger requests and commands arrive on the request connection (MQTT 5, so that a
    // response topic can be honoured); it stops after the trigger stage's last answers.
    let (inbox_tx, inbox_rx) = tokio::sync::mpsc::channel(crate::mqtt::INBOX_CHANNEL);
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::channel::<crate::mqtt::requests::CommandIn>(
        crate::mqtt::requests::COMMAND_CHANNEL,
    );
    let link_stop = tokio_util::sync::CancellationToken::new();
    let (link, link_task) = crate::mqtt::requests::spawn(
        &cfg.mqtt,
        &cfg.node_id,
        crate::mqtt::requests::Sinks {
            inbox: inbox_tx,
            commands: cfg.commands.is_some().then(|| cmd_tx.clone()),
            publisher: publisher.clone(),
        },
        link_stop.clone(),
    )?;
    shared.trigger.set_link(link.clone());
    let trigger_task = tokio::spawn(trigger::serve(
        shared.clone(),
        inbox_rx,
        control.shutdown.clone(),
    ));
    let live = start_live(&cfg, &config_path, &shared, &control)
        .await
        .map_err(DaemonError::Runtime)?;
    start_metrics(&cfg, &shared, &control)
        .await
        .map_err(DaemonError::Runtime)?;
    let notify_frames = FrameNotify::new();
    let mut cameras = Cameras::new(
        size,
        notify_frames.clone(),
        publisher.clone(),
        shared.clone(),
    );
    cameras.start_all(&cfg.cameras, &disabled);
    // Commands (`[commands]`): payloads from `<prefix>/cmd` (the request connection), requests
    // from Sparkplug DCMD.
    let (spb_cmd_tx, mut spb_cmd_rx) = tokio::sync::mpsc::channel::<crate::commands::Request>(64);
    if cfg.commands.is_some() {
        if let Some(s) = &shared.sparkplug {
            s.set_commands(spb_cmd_tx.clone());
        }
        info!("commands on: <prefix>/cmd (acknowledged on <prefix>/cmd/ack)");
    }

    let worker = {
        let shared = shared.clone();
        let publisher = publisher.clone();
        let notify_frames = notify_frames.clone();
        let batching = worker::Batching {
            max_batch: cfg.engine.max_batch.max(1) as usize,
            max_wait: cfg.engine.max_wait,
        };
        let model_name = model_name.clone();
        let live = live.clone();
        std::thread::Builder::new()
            .name("ace-infer".into())
            .spawn(move || {
                worker::run(
                    shared,
                    scorer,
                    notify_frames,
                    publisher,
                    batching,
                    model_name,
                    live,
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
    // The metrics' counters follow the daemon's totals once a second (none without [metrics]).
    let mut metrics_tick = stats_timer(shared.metrics.as_ref().map(|_| Duration::from_secs(1)));

    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status_line(&shared, &publisher)),
    ]);
    info!(
        node = %current.node_id,
        cameras = cameras.running.len(),
        engine = %engine_name,
        watchdog = ?wd,
        "anomalyclip-edge running"
    );

    let fixed = Fixed {
        config_path: &config_path,
        shared: &shared,
        publisher: &publisher,
        model_info: &model_info,
        engine_name: &engine_name,
        started_ms,
    };
    let shutdown = control.shutdown.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => { info!("stopping"); break; }
            Some(()) = control.reload.recv() => {
                let stats_before = current.stats_interval;
                let _ = reload(&fixed, &mut cameras, &overrides, &mut current);
                if current.stats_interval != stats_before {
                    info!(interval = ?current.stats_interval, "reload: stats interval changed");
                    stats_tick = stats_timer(current.stats_interval);
                }
            }
            Some(cmd) = cmd_rx.recv() => {
                let stats_before = current.stats_interval;
                let ack = match crate::commands::parse(&cmd.payload) {
                    Ok(req) => run_command(&req, "mqtt", &fixed, &mut cameras, &mut overrides, &mut current, live.as_ref()),
                    Err(r) => {
                        warn!(id = r.id.as_deref().unwrap_or(""), reason = %r.reason, "command rejected");
                        crate::commands::Ack::rejected(&r, "mqtt")
                    }
                };
                if let Some(to) = &cmd.response {
                    link.respond(to, ack.to_json());
                }
                publisher.command_ack(ack.to_json());
                if current.stats_interval != stats_before {
                    stats_tick = stats_timer(current.stats_interval);
                }
            }
            Some(req) = spb_cmd_rx.recv() => {
                let stats_before = current.stats_interval;
                let ack = run_command(&req, "sparkplug", &fixed, &mut cameras, &mut overrides, &mut current, live.as_ref());
                publisher.command_ack(ack.to_json());
                if current.stats_interval != stats_before {
                    stats_tick = stats_timer(current.stats_interval);
                }
            }
            _ = stats_tick.tick() => {
                let stats = build_stats(&shared, &cameras.running, &engine_name, last_stats.elapsed());
                last_stats = Instant::now();
                publisher.stats(stats);
            }
            _ = metrics_tick.tick() => {
                if let Some(m) = &shared.metrics {
                    m.sync(&metrics_snapshot(&cameras.running, &publisher));
                }
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
    let cams: Vec<Running> = cameras.take_all();
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
    // Requests still waiting get their answer (`ERROR` stopping) before the publisher stops.
    let _ = trigger_task.await;
    let mut spb_stop = None;
    shared.trigger.stop();
    // The last answers' response-topic copies get a moment; then the request connection goes.
    link_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_millis(200), link_task).await;
    if let (Some(s), Some(task)) = (&shared.sparkplug, spb_task) {
        // NDEATH, acknowledged, before the plain publisher's last messages (in parallel).
        s.shutdown(deadline.left().saturating_sub(Duration::from_millis(250)));
        spb_stop = Some(task);
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
    if let Some(task) = spb_stop
        && tokio::time::timeout_at(deadline.instant().into(), task)
            .await
            .is_err()
    {
        warn!(
            straggler = "sparkplug",
            "sparkplug node still busy at the stop deadline"
        );
    }
    if let Some(live) = &live {
        live.stop();
    }
    info!("stopped");
    Ok(())
}

/// Carries out one command (and the reload a lasting one needs) and returns its
/// acknowledgement.
fn run_command(
    req: &crate::commands::Request,
    source: &'static str,
    fixed: &Fixed<'_>,
    cameras: &mut Cameras,
    overrides: &mut crate::commands::Overrides,
    current: &mut Config,
    live: Option<&crate::live::LiveHub>,
) -> crate::commands::Ack {
    let mut env = commands::Env {
        config_path: fixed.config_path,
        cameras,
        current,
        overrides,
        shared: fixed.shared,
        publisher: fixed.publisher,
        live,
    };
    let outcome = match commands::execute(req, &mut env) {
        Ok((detail, commands::After::Nothing)) => Ok(detail),
        Ok((detail, commands::After::Reload)) => reload(fixed, cameras, overrides, current)
            .map(|()| detail)
            .map_err(|e| format!("overrides written, but the reload was rejected: {e}")),
        Err(why) => Err(why),
    };
    commands::ack(req, source, outcome)
}

/// The checks `check-config` makes, on a config text that is not (yet) the file at `origin`:
/// the config with [`FsChecks::Full`], then the few-shot banks it names. One line per problem.
pub fn check_config_text(text: &str, origin: &str) -> Vec<String> {
    let problems = match config::parse_config(text, origin, config::FsChecks::Full) {
        Ok(cfg) => check_references(&cfg, origin),
        Err(e) => e.problems,
    };
    problems.iter().map(ToString::to_string).collect()
}

/// Starts the live view server when `[http]` is set (the port is bound before the daemon
/// reports ready: a taken port is a start-up error). `[http]` changes take effect at restart.
async fn start_live(
    cfg: &Config,
    config_path: &Path,
    shared: &Arc<Shared>,
    control: &Control,
) -> std::io::Result<Option<crate::live::LiveHub>> {
    let Some(http) = &cfg.http else {
        return Ok(None);
    };
    let hub = crate::live::LiveHub::new(http, &cfg.state_dir)?;
    let statuses: crate::live::StatusFn = {
        let shared = shared.clone();
        Arc::new(move || {
            // One lock at a time (the control loop takes them in its own order).
            let names: Vec<Arc<str>> = shared
                .cams
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|h| h.name.clone())
                .collect();
            let statuses = lock(&shared.statuses);
            names
                .into_iter()
                .map(|n| {
                    let status = statuses.get(n.as_ref()).map_or("starting", |s| s.as_str());
                    (n.to_string(), status.to_owned())
                })
                .collect()
        })
    };
    let editor = {
        let origin = config_path.display().to_string();
        let handle = control.handle();
        crate::live::EditorSetup {
            config_path: config_path.to_path_buf(),
            enabled: http.edit_config,
            validate: Arc::new(move |text: &str| check_config_text(text, &origin)),
            reload: Arc::new(move || handle.reload()),
            backup: cfg.state_dir.join("live").join("config.previous.toml"),
            state_dir: cfg.state_dir.clone(),
            reference_path: {
                let dir = cfg.state_dir.clone();
                Arc::new(move |camera: &str, region: &str| {
                    reference_bank_path(&dir, camera, (!region.is_empty()).then_some(region))
                })
            },
        }
    };
    crate::live::serve(
        http,
        hub.clone(),
        statuses,
        &cfg.node_id,
        Some(editor),
        control.shutdown.clone(),
    )
    .await
    .map_err(|e| std::io::Error::new(e.kind(), format!("http.listen {}: {e}", http.listen)))?;
    Ok(Some(hub))
}

/// Starts the Prometheus endpoint when `[metrics]` is set (bound before the daemon reports
/// ready: a taken port is a start-up error naming `metrics.listen`). `[metrics]` changes take
/// effect at restart.
async fn start_metrics(
    cfg: &Config,
    shared: &Arc<Shared>,
    control: &Control,
) -> std::io::Result<()> {
    let (Some(m), Some(metrics)) = (&cfg.metrics, &shared.metrics) else {
        return Ok(());
    };
    crate::metrics::serve(m.listen, metrics.clone(), control.shutdown.clone())
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("metrics.listen {}: {e}", m.listen)))?;
    Ok(())
}
