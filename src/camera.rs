//! Camera stage: one GStreamer pipeline per camera, delivering the latest decoded RGB frame.
//!
//! **Input**: a [`CameraSettings`] per camera: a [`Source`] (an `rtsp://`, `file://`,
//! `http(s)://` MJPEG or `/dev/videoN` URI, or a raw GStreamer pipeline description), an
//! optional frame-rate cap and GStreamer-side scale, and the watchdog/backoff timings.
//! Counters: [`CameraCounters`].
//!
//! **Output**: [`Frame`]s (RGB, rows padded to the GStreamer stride, with a per-camera
//! sequence number and a wall-clock capture time) placed in the camera's [`LatestSlot`].
//! The slot holds one frame: a new frame overwrites an unconsumed one and counts a drop
//! (full-policy *keep latest, count drops*). Every slot signals a shared [`FrameNotify`], so
//! one consumer can wait on all cameras at once ([`FrameNotify::take_any`]). Frames that
//! arrive faster than `max_fps` are skipped before the slot and counted as `skipped_rate`.
//! State changes ([`CameraState`]) are reported through a callback, on change only.
//!
//! **Failure modes**, each handled inside the camera's own thread so that a failing camera
//! never affects the others:
//! - the source cannot work as configured (unknown URI scheme, pipeline description that does
//!   not parse, missing element, no appsink named `sink`): [`CameraState::Error`] with a
//!   one-line reason and `retrying: false` (only a new configuration can fix it);
//! - a running pipeline fails (bus error, end of stream of a live source, no frame for
//!   `no_frame_timeout`): the pipeline is set to `Null`, the state becomes
//!   [`CameraState::Reconnecting`] and the camera retries with capped exponential backoff,
//!   forever, staying `Reconnecting` until a frame arrives;
//! - a running pipeline fails in a way that needs a human (missing decoder plugin, codec not
//!   found): [`CameraState::Error`] with `retrying: true`, retried every `backoff_max`;
//! - a `file://` source reaching its end is looped (flushing seek to the start), not reported;
//! - a panic in the camera thread becomes [`CameraState::Error`]; it never crosses threads.
//!
//! # Keyframe gate
//! A camera that streams continuously is joined mid-GOP at every (re)connect. An H.264/H.265
//! decoder fed the delta frames before the first keyframe outputs garbage (`avdec_h264`: uniform
//! gray frames that score as anomalies). So every video decoder in the pipeline (found by its
//! element class when `decodebin` adds it) gets a probe on its sink pad that drops buffers
//! flagged `DELTA_UNIT` until the first buffer without it (a keyframe), and one on its source
//! pad that drops decoded buffers flagged `CORRUPTED`; where the decoder has the properties,
//! `output-corrupt=false` (`avdec_*`) and `discard-corrupted-frames=true` are set. The gate is
//! per pipeline, i.e. per (re)connect. Dropped buffers are counted (`skipped_corrupt`) and never
//! reach the appsink, the slot or the status: the camera turns `Online` on its first *good*
//! frame. While the gate drops buffers the stream counts as alive for the watchdog, for at most
//! three times `no_frame_timeout` (a camera that never sends a keyframe then fails with that
//! reason and is retried). Raw sources (V4L2 raw, `videotestsrc`) have no decoder and no gate.
//!
//! # State machine
//! ```text
//!             first good frame                 first good frame
//! Starting ─────────────────▶ Online ◀──────────────────────────┐
//!    │                          │ bus error / EOS / watchdog     │
//!    │ attempt fails            ▼                                │
//!    └────────────────▶ Reconnecting ──(retry after backoff)─────┘ (forever)
//! config fault (any time the pipeline is built) ──▶ Error { retrying: false }, final
//! missing decoder at run time ──▶ Error { retrying: true }, retried every backoff_max
//! ```
//! Reported on change only, through the status callback; [`CameraState::wire`] maps a state to
//! the MQTT camera status ([`crate::payload::CameraStatus`]): `Starting` is not published,
//! `Online` → `online`, `Reconnecting` → `reconnecting`, `Error` → `error: <reason>`. The camera
//! never reports `offline` itself: that means the daemon stopped the camera (removed by a reload,
//! daemon stopping) and is published by the daemon and the publisher.
//!
//! `Online` is reported on the streaming thread *before* the first frame of the attempt is put
//! in the slot, so a consumer that forwards the status before scoring (the daemon does) always
//! publishes `online` before the first result of a connection.
//!
//! `n` counts consecutive failed attempts: an attempt fails when it ends without reaching
//! `Online`, or after being online for less than `stable_after`; one that stayed online at least
//! `stable_after` resets `n` to 0, so the first retry after a long-running stream is lost comes
//! after `backoff_initial`. Delay before the next attempt: `backoff_initial × 2^(n−1)` capped at
//! `backoff_max` (defaults 1, 1, 2, 4, 8, 16, 30, 30… s; configurable per camera, see
//! [`MIN_BACKOFF`]/[`MAX_BACKOFF`]). The watchdog also bounds how long an attempt may take to
//! deliver its first frame. With the defaults, a camera that goes away is `Reconnecting` within
//! moments (RTSP connection closed) or at most 10 s (silent network).
//!
//! # Pipelines
//! Every source ends in the same tail:
//! `videoconvert [! videoscale] ! video/x-raw,format=RGB[,width=W,height=H] !
//! appsink name=sink max-buffers=1 drop=true sync=…`. Live sources (RTSP, HTTP, V4L2) use
//! `sync=false`; `file://` and wrapped `pipeline` sources use `sync=true` so that a non-live
//! source plays at its natural rate instead of spinning a CPU core.
//!
//! # Timestamps
//! [`Frame::capture_unix_ms`] is the **wall clock at the moment the appsink callback pulled the
//! decoded sample**, not the sensor exposure time: encoding in the camera, network transfer,
//! the RTSP jitter buffer (which holds packets only to wait for missing or reordered ones, up
//! to `rtsp_latency`) and decoding happen before it (typically tens of milliseconds on a LAN).
//! It is not mapped from the PTS: IP cameras rarely send usable absolute time (RTCP sender
//! reports / ONVIF timestamps), and a PTS-derived time would be no closer to the exposure. [`Frame::captured_at`] is the same instant on
//! the monotonic clock, for latency measurements inside the process. [`Frame::pts`] carries
//! the buffer's presentation timestamp for diagnostics.
//!
//! # Cost
//! Each delivered frame is one copy of the RGB plane into a new `Vec` (6 MB for 1080p, about a
//! millisecond); frames skipped by `max_fps` are not copied. The copy decouples the
//! frame from GStreamer's buffer pools, so a consumer may hold frames as long as it likes.
//!
//! # Threads
//! Each [`Camera`] owns one supervisor thread that builds the pipeline, watches its bus (the
//! stage's only error channel), runs the no-frame watchdog and sleeps the backoff. The appsink
//! callback runs on GStreamer's streaming thread, never blocks and never panics: every failure
//! there is returned as a `gst::FlowError`, which GStreamer turns into a bus error.
//! [`Camera::stop`] stops the thread within a deadline ([`STOP_DEADLINE`]).

pub mod config;
mod pipeline;
mod runner;
mod slot;

use std::fmt;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use pipeline::redact_uri;
pub use slot::{Frame, FrameNotify, LatestSlot};

use crate::payload::CameraStatus;
use runner::Shared;

/// Default for [`CameraSettings::no_frame_timeout`].
pub const DEFAULT_NO_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`CameraSettings::backoff_initial`].
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Default for [`CameraSettings::backoff_max`].
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Smallest accepted [`CameraSettings::backoff_initial`] (and `backoff_max`).
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Largest accepted [`CameraSettings::backoff_max`] (and `backoff_initial`).
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Default for [`CameraSettings::stable_after`].
pub const DEFAULT_STABLE_AFTER: Duration = Duration::from_secs(10);
/// Default for [`CameraSettings::rtsp_latency`].
pub const DEFAULT_RTSP_LATENCY: Duration = Duration::from_millis(200);
/// How long [`Camera::stop`] waits for the camera thread before giving up on it.
pub const STOP_DEADLINE: Duration = Duration::from_secs(2);

/// Where a camera's frames come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `rtsp://`, `rtsps://`, `rtspt://` (IP camera, via `rtspsrc`), `file://` (a clip,
    /// looped at its end), `http://`/`https://` (an MJPEG `multipart/x-mixed-replace`
    /// stream) or `/dev/videoN` (V4L2).
    Uri(String),
    /// A GStreamer pipeline description (`gst-launch-1.0` syntax). If it contains an
    /// `appsink name=sink`, that element is used as is (its caps are forced to RGB, so the
    /// description must convert to RGB before it, and `max-buffers=1 drop=true` are forced).
    /// Otherwise the description must end in an element with a free video source pad, and the
    /// standard tail (`videoconvert ! … ! appsink name=sink sync=true`) is appended.
    Pipeline(String),
}

/// One camera, as configured. Build with [`CameraSettings::new`] and adjust the fields.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraSettings {
    /// Camera name, used in logs, thread names and status events. Must not be empty.
    pub name: String,
    /// Where the frames come from.
    pub source: Source,
    /// Deliver at most this many frames per second; faster frames are skipped before the slot
    /// (counted as `skipped_rate`). `None`: deliver every frame.
    pub max_fps: Option<f32>,
    /// Scale in GStreamer to `(width, height)` before delivery. `None`: native size.
    pub scale: Option<(u32, u32)>,
    /// A running pipeline that delivers no frame for this long is restarted (watchdog). Also
    /// bounds how long a (re)connection attempt may take to deliver its first frame.
    pub no_frame_timeout: Duration,
    /// Delay before the first retry; doubles with each consecutive failed attempt.
    pub backoff_initial: Duration,
    /// Upper bound of the retry delay.
    pub backoff_max: Duration,
    /// An attempt that stayed online at least this long resets the failure count (and thus the
    /// backoff); a shorter one counts as a failed attempt, so a flapping camera backs off.
    pub stable_after: Duration,
    /// `rtspsrc` jitter-buffer latency for RTSP sources.
    pub rtsp_latency: Duration,
}

impl CameraSettings {
    /// Settings with the documented defaults: no rate cap, native size, 10 s watchdog,
    /// backoff 1 s doubling to 30 s, stable after 10 s,
    /// 200 ms RTSP latency.
    pub fn new(name: impl Into<String>, source: Source) -> Self {
        Self {
            name: name.into(),
            source,
            max_fps: None,
            scale: None,
            no_frame_timeout: DEFAULT_NO_FRAME_TIMEOUT,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            stable_after: DEFAULT_STABLE_AFTER,
            rtsp_latency: DEFAULT_RTSP_LATENCY,
        }
    }

    /// Every problem of the settings other than the source.
    fn check_values(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.name.trim().is_empty() {
            problems.push("camera name must not be empty".to_owned());
        }
        if let Some(fps) = self.max_fps
            && !(fps.is_finite() && fps > 0.0)
        {
            problems.push(format!(
                "max_fps must be a positive number of frames per second, got {fps}"
            ));
        }
        if let Some((w, h)) = self.scale
            && (w == 0 || h == 0)
        {
            problems.push(format!("scale must be at least 1x1, got {w}x{h}"));
        }
        if self.no_frame_timeout.is_zero() {
            problems.push("no_frame_timeout must be greater than zero".to_owned());
        }
        for (what, value) in [
            ("backoff_initial", self.backoff_initial),
            ("backoff_max", self.backoff_max),
        ] {
            if !(MIN_BACKOFF..=MAX_BACKOFF).contains(&value) {
                problems.push(format!(
                    "{what} must be between {MIN_BACKOFF:?} and {MAX_BACKOFF:?}, got {value:?}"
                ));
            }
        }
        if self.backoff_max < self.backoff_initial {
            problems.push(format!(
                "backoff_max ({:?}) must not be below backoff_initial ({:?})",
                self.backoff_max, self.backoff_initial
            ));
        }
        problems
    }
}

/// A camera's internal state, reported on change only. [`CameraState::wire`] maps it to the one
/// MQTT camera status type, [`crate::payload::CameraStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CameraState {
    /// The first pipeline is being built and started (not published).
    Starting,
    /// Frames are arriving (set on the first good frame after each (re)start).
    Online,
    /// The pipeline failed; retrying with backoff, forever.
    Reconnecting,
    /// A fault that needs a human, with a one-line reason. `retrying: false`: a configuration
    /// fault (bad URI scheme, pipeline that does not parse, missing element); the camera thread
    /// has ended. `retrying: true`: a runtime fault (missing decoder), retried every
    /// `backoff_max`.
    Error {
        /// One line, URIs redacted.
        reason: String,
        /// Whether the camera keeps trying.
        retrying: bool,
    },
}

impl CameraState {
    /// Lowercase name without the reason: `starting`, `online`, `reconnecting`, `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Online => "online",
            Self::Reconnecting => "reconnecting",
            Self::Error { .. } => "error",
        }
    }

    /// The MQTT camera status for this state; `None` for `Starting` (nothing is published
    /// until the first attempt succeeds or fails).
    pub fn wire(&self) -> Option<CameraStatus> {
        match self {
            Self::Starting => None,
            Self::Online => Some(CameraStatus::Online),
            Self::Reconnecting => Some(CameraStatus::Reconnecting),
            Self::Error { reason, .. } => Some(CameraStatus::Error(reason.clone())),
        }
    }
}

impl fmt::Display for CameraState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Error { reason, retrying } => write!(
                f,
                "error: {reason}{}",
                if *retrying { " (retrying)" } else { "" }
            ),
            other => f.write_str(other.as_str()),
        }
    }
}

/// A status change of one camera, given to the status callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusEvent {
    /// The camera's index, as given to [`Camera::spawn`].
    pub camera: usize,
    /// The camera's name.
    pub name: Arc<str>,
    /// The new state.
    pub status: CameraState,
}

/// Receives state changes, in order. Called on the camera's own thread, or for `Online` on its
/// GStreamer streaming thread just before the first frame of an attempt enters the slot; must
/// return quickly and not block (forward into a channel).
pub type StatusCallback = Arc<dyn Fn(&StatusEvent) + Send + Sync>;

/// A snapshot of one camera's counters (the daemon turns them into the `stats` payload's
/// [`crate::payload::CameraStats`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CameraCounters {
    /// Current state.
    pub status: CameraState,
    /// Samples pulled from the appsink (before the rate cap).
    pub frames_in: u64,
    /// Samples skipped by the `max_fps` cap.
    pub skipped_rate: u64,
    /// Frames put into the slot (each got a sequence number).
    pub delivered: u64,
    /// Frames overwritten in the slot before a consumer took them (consumer overload).
    pub dropped: u64,
    /// Decoded frames discarded by the keyframe gate: decoded before the first keyframe of a
    /// connection, or flagged corrupt by the decoder. Never pulled, not in `frames_in`.
    pub skipped_corrupt: u64,
    /// Pipeline restarts after a failure.
    pub reconnects: u64,
    /// Time since the last sample was pulled; `None` before the first one.
    pub last_frame_age: Option<Duration>,
    /// The reason of the last failure, if any (kept after recovery).
    pub last_error: Option<String>,
}

/// Camera stage errors. Runtime failures of a running camera are not errors of this type:
/// they are states ([`CameraState`]) and counters.
#[derive(Debug, thiserror::Error)]
pub enum CameraError {
    /// `gst::init()` failed: GStreamer is not installed or not usable.
    #[error("gstreamer initialisation failed: {0} (is GStreamer 1.22 installed?)")]
    Init(String),
    /// The settings are invalid (a value out of range; the source is checked by the camera
    /// thread and reported as [`CameraState::Error`]).
    #[error("camera '{camera}': {problems}")]
    InvalidSettings {
        /// The camera's name.
        camera: String,
        /// Every problem, joined with `; `.
        problems: String,
    },
    /// The URI's scheme is not one the camera stage can open.
    #[error(
        "unsupported camera uri '{0}': use rtsp://, rtsps://, file://, http(s):// (MJPEG) or /dev/videoN, or give a pipeline"
    )]
    UnsupportedUri(String),
    /// The URI has a supported scheme but cannot work: no host, not `/dev/videoN`, a relative
    /// `file://` path.
    #[error("invalid camera uri: {0}")]
    Source(config::SourceError),
    /// The pipeline description does not parse, or names an element that is not installed.
    #[error("pipeline does not parse: {0}")]
    Parse(String),
    /// The pipeline has no usable `appsink name=sink`.
    #[error("pipeline sink: {0}")]
    Sink(String),
    /// The camera thread could not be started.
    #[error("failed to start camera thread: {0}")]
    Spawn(#[from] std::io::Error),
    /// The camera thread did not finish within [`STOP_DEADLINE`]; it was left running.
    #[error("camera '{0}' did not stop within {STOP_DEADLINE:?}; its thread was left behind")]
    StopTimeout(String),
}

/// Initialises GStreamer once for the process; later calls return the first result.
pub fn init() -> Result<(), CameraError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| gstreamer::init().map_err(|e| e.to_string()))
        .clone()
        .map_err(CameraError::Init)
}

/// A running camera: its supervisor thread, slot and counters. Dropping it stops it (like
/// [`Camera::stop`], ignoring the result).
pub struct Camera {
    shared: Arc<Shared>,
    stop_tx: Option<mpsc::Sender<()>>,
    /// Disconnected when the thread ends (a `Mutex` only to make `Camera` `Sync`).
    done_rx: Mutex<mpsc::Receiver<()>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Camera {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Camera")
            .field("index", &self.shared.index)
            .field("name", &self.shared.name)
            .field("status", &self.shared.status())
            .finish_non_exhaustive()
    }
}

impl Camera {
    /// Validates the settings, initialises GStreamer if needed and starts the camera thread.
    ///
    /// `index` identifies the camera in [`Frame::camera`] and [`StatusEvent::camera`]. The
    /// camera's slot signals `notify`; share one `notify` between the cameras a consumer
    /// waits on. A source that cannot work is not an error here: the camera reports
    /// [`CameraState::Error`] through `on_status`, so one bad camera never prevents the
    /// others from starting.
    pub fn spawn(
        index: usize,
        settings: CameraSettings,
        notify: Arc<FrameNotify>,
        on_status: StatusCallback,
    ) -> Result<Self, CameraError> {
        init()?;
        let name: Arc<str> = Arc::from(settings.name.as_str());
        // A source problem is reported as a status by the camera thread, so that one bad URI
        // does not stop the daemon; any other problem is the caller's (config validation
        // should have caught it).
        let problems = settings.check_values();
        if !problems.is_empty() {
            return Err(CameraError::InvalidSettings {
                camera: settings.name.clone(),
                problems: problems.join("; "),
            });
        }
        let slot = Arc::new(LatestSlot::new(notify));
        let shared = Arc::new(Shared::new(index, name, slot, on_status));
        let (stop_tx, stop_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        // Linux keeps 15 bytes of a thread name; a NUL byte would make `spawn` panic.
        let thread_name: String = format!("cam-{}", settings.name)
            .chars()
            .filter(|c| *c != '\0')
            .take(15)
            .collect();
        let thread = std::thread::Builder::new().name(thread_name).spawn({
            let shared = Arc::clone(&shared);
            move || {
                // Dropped when the thread ends, even by unwinding: tells `stop` it is done.
                let _done = done_tx;
                runner::run(shared, settings, stop_rx);
            }
        })?;
        Ok(Self {
            shared,
            stop_tx: Some(stop_tx),
            done_rx: Mutex::new(done_rx),
            thread: Some(thread),
        })
    }

    /// The index given to [`Camera::spawn`].
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// The camera's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The camera's latest-frame slot.
    pub fn slot(&self) -> &Arc<LatestSlot> {
        &self.shared.slot
    }

    /// The current state.
    pub fn status(&self) -> CameraState {
        self.shared.status()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CameraCounters {
        self.shared.stats()
    }

    /// Stops the camera: the thread sets its pipeline to `Null` and ends. Waits at most
    /// [`STOP_DEADLINE`] (normally a few tens of milliseconds); past it, the thread is left
    /// behind and named in the error.
    pub fn stop(mut self) -> Result<(), CameraError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), CameraError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // Dropping the sender wakes the thread wherever it waits (bus poll or backoff).
        self.stop_tx = None;
        if thread.thread().id() == std::thread::current().id() {
            // Dropped from its own status callback: it ends once the callback returns.
            return Ok(());
        }
        let started = Instant::now();
        let done = self
            .done_rx
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .recv_timeout(STOP_DEADLINE);
        match done {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if thread.join().is_err() {
                    tracing::error!(camera = %self.shared.name, "camera thread panicked");
                }
                tracing::debug!(camera = %self.shared.name, elapsed = ?started.elapsed(), "camera stopped");
                Ok(())
            }
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!(camera = %self.shared.name, "camera thread did not stop in time; leaving it behind");
                Err(CameraError::StopTimeout(self.shared.name.to_string()))
            }
        }
    }
}

impl Drop for Camera {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}
